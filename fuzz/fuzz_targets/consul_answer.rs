//! The Consul answer parser on arbitrary bytes (the `/v1/health/service` JSON body); whatever
//! parses is rendered under some balancing method and its shape checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upstreamd::sources::consul::parse_answer;
use upstreamd_fuzz::{render_and_check, upstream};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let tags = if pick & 0x80 != 0 {
        vec!["prod".to_owned()]
    } else {
        Vec::new()
    };
    let Ok((endpoints, _skipped)) = parse_answer(body, &tags) else {
        return;
    };
    render_and_check(&[(upstream(pick, pick & 0x40 != 0), endpoints)], pick);
});
