//! The etcd entry parser (all three layouts) on arbitrary keys and values; whatever parses is
//! rendered under some balancing method and its shape checked.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use upstreamd::sources::etcd::parse_entry;
use upstreamd_fuzz::{render_and_check, upstream};

const PREFIX: &str = "/services/kotaemon/";

#[derive(Debug, Arbitrary)]
struct Input {
    balance: u8,
    fail_closed: bool,
    seed: u8,
    entries: Vec<(String, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    let endpoints: Vec<_> = input
        .entries
        .iter()
        .filter_map(|(key, value)| parse_entry(&format!("{PREFIX}{key}"), PREFIX, value).ok())
        .collect();
    render_and_check(
        &[(upstream(input.balance, input.fail_closed), endpoints)],
        input.seed,
    );
});
