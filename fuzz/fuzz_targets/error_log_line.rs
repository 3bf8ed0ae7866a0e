//! nginx error-log lines, arbitrary bytes and near-real lines alike: the parser never panics,
//! never reads past its bound, and whatever it finds came from nginx's own `upstream` field.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use upstreamd::feedback::parse::{parse_line, Target, MAX_LINE};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Wrapped in a real line's prefix when set, so the fuzzer reaches the field parsing.
    framed: bool,
    bytes: Vec<u8>,
}

const PREFIX: &[u8] = b"2026/11/30 12:15:21 [error] 8504#8504: *1 ";

fuzz_target!(|input: Input| {
    let mut line = Vec::new();
    if input.framed {
        line.extend_from_slice(PREFIX);
    }
    line.extend_from_slice(&input.bytes);
    let Some(signal) = parse_line(&line) else {
        return;
    };
    assert!(line.len() <= MAX_LINE, "read a line over the bound");
    let text = std::str::from_utf8(&line).expect("only UTF-8 lines are read");
    let field = text
        .find(", upstream: \"")
        .expect("a signal needs nginx's upstream field");
    if let Target::Upstream(name) = &signal.target {
        assert!(text[field..].contains(&format!("://{name}")), "{text:?}");
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    }
});
