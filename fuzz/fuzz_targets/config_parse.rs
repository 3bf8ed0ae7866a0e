//! The config loader on arbitrary text; whatever loads is rendered and its shape checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upstreamd::config;
use upstreamd_fuzz::{render_and_check, static_endpoints};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `token_file` and `password_file` are read while loading: file I/O (a FIFO would block),
    // not parsing. Leave them out.
    if text.contains("_file") {
        return;
    }
    let env = |k: &str| (k == "CONSUL_HTTP_TOKEN").then(|| "s3cr3t".to_owned());
    let Ok(cfg) = config::parse(text, &env) else {
        return;
    };
    let upstreams: Vec<_> = cfg
        .upstreams
        .into_iter()
        .map(|u| {
            let e = static_endpoints(&u);
            (u, e)
        })
        .collect();
    render_and_check(&upstreams, data.len() as u8);
});
