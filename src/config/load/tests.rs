//! Tests of `parse`: the contract example, defaults, every error at once, env fallbacks, secrets.

use std::io::Write;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::{AllUnhealthy, Balance, SourceConfig};

/// The `[Config (TOML) — contract]` example of ARCHITECTURE.md, verbatim.
const ARCHITECTURE_EXAMPLE: &str = r##"[nginx]
output = "/etc/nginx/conf.d/upstreamd.conf"  # the include file upstreamd owns (required)
pid_file = "/run/nginx.pid"                  # the master to signal
test_command = ["nginx", "-t", "-q"]          # run after writing a changed file, before signalling; [] disables
reload_command = []                           # run this instead of SIGHUP, e.g. ["systemctl", "reload", "nginx"]
template = "/etc/upstreamd/upstream.conf.j2"  # optional; the built-in templates/upstream.conf.j2 otherwise
settle = "250ms"                              # after a change, wait this long for more before applying
min_reload_interval = "2s"                    # at most one reload per interval; changes in between coalesce

[admin]
listen = "127.0.0.1:9187"                     # optional: / (status page) /healthz /readyz /status /metrics

[[upstream]]
name = "kotaemon"                             # nginx upstream name, [A-Za-z0-9_]+
balance = "sticky"                            # round_robin (default) | least_conn | ip_hash | hash | random | sticky
hash_key = "$cookie_session"                  # with balance = "hash": rendered `hash KEY consistent;`
affinity_cookie = "kh_affinity"               # with balance = "sticky": cookie-or-client-address consistent hash (shared/KOTAEMON.md)
keepalive = 32                                # upstream keepalive connections; 0 = none
on_all_unhealthy = "fail_open"                # fail_open | fail_closed

[upstream.health]
enabled = true
path = "/queue/status"                        # default "/health"; real Kotaemon has no /health (shared/KOTAEMON.md)
expect_status = "200-399"
expect_body = "\"msg\":\"estimation\""        # optional substring the body must contain
interval = "2s"
timeout = "1s"
rise = 2
fall = 3

[[upstream.source]]
kind = "static"
servers = ["10.0.0.11:7860", { address = "10.0.0.12:7860", weight = 3 }, "10.0.0.13:7860"]

[[upstream.source]]
kind = "consul"
url = "http://127.0.0.1:8500"                 # default: $CONSUL_HTTP_ADDR, then this
service = "kotaemon"
tags = ["prod"]                               # all must match
wait = "60s"                                  # blocking-query wait
# token: $CONSUL_HTTP_TOKEN or token_file = "/etc/upstreamd/consul.token"; never logged

[[upstream.source]]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379"]
prefix = "/services/kotaemon/"
"##;

const MINIMAL: &str = r#"
[nginx]
output = "/tmp/upstreamd.conf"

[[upstream]]
name = "app"

[[upstream.source]]
kind = "static"
servers = ["127.0.0.1:8080"]
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

fn errors(text: &str) -> Vec<(String, String)> {
    match parse(text, &no_env) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(ConfigErrors(list)) => list.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

/// The single error of `text`, as `path: message`.
fn one_error(text: &str) -> String {
    match parse(text, &no_env) {
        Ok(config) => panic!("expected an error, got {config:#?}"),
        Err(errs) => {
            assert_eq!(errs.0.len(), 1, "expected one error, got {errs:#?}");
            errs.to_string()
        }
    }
}

/// `MINIMAL` with its upstream's lines replaced by `upstream` (which must include a source).
fn with_upstream(upstream: &str) -> String {
    format!("[nginx]\noutput = \"/tmp/upstreamd.conf\"\n\n[[upstream]]\n{upstream}\n")
}

const ONE_STATIC: &str = "[[upstream.source]]\nkind = \"static\"\nservers = [\"127.0.0.1:8080\"]\n";

fn secret_file(content: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(content.as_bytes()).expect("write temp file");
    f
}

#[test]
fn the_architecture_example_parses_once_hash_key_is_dropped() {
    // The example lists every key; `hash_key` belongs to balance = "hash", not to its "sticky".
    let text = ARCHITECTURE_EXAMPLE.replace("hash_key = \"$cookie_session\"", "");
    let config = parse(&text, &no_env).expect("the example is valid");
    assert_eq!(
        config.nginx.output,
        Path::new("/etc/nginx/conf.d/upstreamd.conf")
    );
    assert_eq!(
        config.nginx.template.as_deref(),
        Some(Path::new("/etc/upstreamd/upstream.conf.j2"))
    );
    assert_eq!(config.nginx.settle, Duration::from_millis(250));
    assert_eq!(
        config.admin.listen,
        Some("127.0.0.1:9187".parse().expect("address"))
    );
    let [u] = &config.upstreams[..] else {
        panic!("one upstream: {:#?}", config.upstreams)
    };
    assert_eq!(
        (u.name.as_str(), u.balance, u.affinity_cookie.as_str()),
        ("kotaemon", Balance::Sticky, "kh_affinity")
    );
    assert_eq!(u.health.path, "/queue/status");
    assert_eq!(
        u.health.expect_body.as_deref(),
        Some("\"msg\":\"estimation\"")
    );
    assert_eq!((u.health.rise, u.health.fall), (2, 3));
    let [SourceConfig::Static(st), SourceConfig::Consul(consul), SourceConfig::Etcd(etcd)] =
        &u.sources[..]
    else {
        panic!("static, consul, etcd: {:#?}", u.sources)
    };
    let servers: Vec<(String, Option<u32>, &str)> = st
        .servers
        .iter()
        .map(|e| (e.address.to_string(), e.attrs.weight, e.origin.as_str()))
        .collect();
    assert_eq!(
        servers,
        [
            ("10.0.0.11:7860".to_owned(), None, "servers[0]"),
            ("10.0.0.12:7860".to_owned(), Some(3), "servers[1]"),
            ("10.0.0.13:7860".to_owned(), None, "servers[2]"),
        ]
    );
    assert_eq!(
        (consul.service.as_str(), consul.tags.clone()),
        ("kotaemon", vec!["prod".to_owned()])
    );
    assert_eq!(consul.wait, Duration::from_secs(60));
    assert_eq!(consul.token, None);
    assert_eq!(etcd.prefix, "/services/kotaemon/");
}

#[test]
fn the_verbatim_architecture_example_parses() {
    let config = parse(ARCHITECTURE_EXAMPLE, &no_env).expect("the documented example is valid");
    assert_eq!(config.upstreams[0].balance, Balance::Sticky);
    assert_eq!(config.upstreams[0].affinity_cookie, "kh_affinity");
}

#[test]
fn defaults_are_those_documented_on_the_fields() {
    let config = parse(MINIMAL, &no_env).expect("minimal config is valid");
    let n = &config.nginx;
    assert_eq!(n.pid_file, Path::new("/run/nginx.pid"));
    assert_eq!(n.test_command, ["nginx", "-t", "-q"]);
    assert!(n.reload_command.is_empty());
    assert_eq!((n.template.clone(), n.state_dir.clone()), (None, None));
    assert_eq!(
        (n.settle, n.min_reload_interval, n.confirm_timeout),
        (
            Duration::from_millis(250),
            Duration::from_secs(2),
            Duration::from_secs(5)
        )
    );
    assert_eq!(config.admin.listen, None);
    let u = &config.upstreams[0];
    assert_eq!(
        (u.balance, u.hash_key.clone(), u.affinity_cookie.as_str()),
        (Balance::RoundRobin, None, "upstreamd_affinity")
    );
    assert_eq!(
        (u.keepalive, u.on_all_unhealthy),
        (32, AllUnhealthy::FailOpen)
    );
    assert_eq!(
        (u.max_shrink, u.shrink_hold),
        (0.5, Duration::from_secs(30))
    );
    let h = &u.health;
    assert!(h.enabled);
    assert_eq!(
        (
            h.path.as_str(),
            h.expect_status,
            h.expect_body.clone(),
            h.host.clone()
        ),
        ("/health", (200, 399), None, None)
    );
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (Duration::from_secs(2), Duration::from_secs(1), 2, 3)
    );
    assert_eq!(
        (h.fast_interval, h.down_interval),
        (Duration::from_millis(500), Duration::from_secs(2))
    );
    assert_eq!(n.error_log, None);
    assert_eq!(n.max_old_generations, 0);
}

#[test]
fn source_defaults_are_those_documented_on_the_fields() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\n\
         [[upstream.source]]\nkind = \"etcd\"\nprefix = \"/app/\"\n",
    );
    let config = parse(&text, &no_env).expect("valid");
    let [SourceConfig::Consul(c), SourceConfig::Etcd(e)] = &config.upstreams[0].sources[..] else {
        panic!()
    };
    assert_eq!(c.url, "http://127.0.0.1:8500");
    assert_eq!(
        (c.tags.len(), c.datacenter.clone(), c.wait, c.token.clone()),
        (0, None, Duration::from_secs(60), None)
    );
    assert_eq!(e.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!((e.username.clone(), e.password.clone()), (None, None));
    assert_eq!(
        (e.connect_timeout, e.request_timeout),
        (Duration::from_secs(5), Duration::from_secs(5))
    );
}

const SIX_PROBLEMS: &str = r#"
[nginx]
settle = 250

[[upstream]]
name = "kota-emon"
balance = "sticky"

[upstream.health]
path = "/queue/status"
intervall = "2s"

[[upstream.source]]
kind = "static"
servers = ["10.0.0.1:7860", "10.0.0.2", { address = "10.0.0.3:7860", backup = true }]
"#;

#[test]
fn one_bad_file_reports_every_problem_with_its_key_path() {
    let err = parse(SIX_PROBLEMS, &no_env).expect_err("six problems");
    assert_eq!(
        err.to_string(),
        [
            "nginx.output: required key is missing",
            "nginx.settle: a bare number has no unit: write the duration as a string such as \"250s\" or \"250ms\" (e.g. \"2s\")",
            "upstream[0].name: upstream name \"kota-emon\" must match [A-Za-z0-9_]+",
            "upstream[0].health: unknown key `intervall` (did you mean `interval`?)",
            "upstream[0].source[0].servers[1]: address \"10.0.0.2\" must be IPv4:port, [IPv6]:port or hostname:port",
            "upstream[0].source[0].servers[2].backup: nginx refuses backup servers with balance = \"sticky\"",
        ]
        .join("\n")
    );
}

#[test]
fn a_toml_syntax_error_is_one_error_with_line_and_column() {
    let errs = errors("[nginx]\noutput = \"/x\"\nsettle = \n");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, "");
    assert!(
        errs[0]
            .1
            .starts_with("TOML syntax error at line 3, column 10: "),
        "{}",
        errs[0].1
    );
}

#[test]
fn consul_url_falls_back_to_consul_http_addr_with_a_scheme_added() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\n",
    );
    let env = |k: &str| match k {
        "CONSUL_HTTP_ADDR" => Some("10.1.2.3:8500".to_owned()),
        "CONSUL_HTTP_TOKEN" => Some(" s3cr3t-token \n".to_owned()),
        _ => None,
    };
    let config = parse(&text, &env).expect("valid");
    let SourceConfig::Consul(c) = &config.upstreams[0].sources[0] else {
        panic!()
    };
    assert_eq!(c.url, "http://10.1.2.3:8500");
    assert_eq!(c.token, Some(crate::config::Secret("s3cr3t-token".into())));

    let https =
        |k: &str| (k == "CONSUL_HTTP_ADDR").then(|| "https://consul.internal:8501/".to_owned());
    let config = parse(&text, &https).expect("valid");
    let SourceConfig::Consul(c) = &config.upstreams[0].sources[0] else {
        panic!()
    };
    assert_eq!(
        (c.url.as_str(), c.token.clone()),
        ("https://consul.internal:8501", None)
    );
}

#[test]
fn an_explicit_consul_url_and_token_file_win_over_the_environment() {
    let token = secret_file("from-file\n");
    let text = with_upstream(&format!(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\n\
         url = \"http://consul:8500\"\ntoken_file = {:?}\n",
        token.path().display().to_string()
    ));
    let env = |k: &str| Some(format!("env-{k}"));
    let config = parse(&text, &env).expect("valid");
    let SourceConfig::Consul(c) = &config.upstreams[0].sources[0] else {
        panic!()
    };
    assert_eq!(c.url, "http://consul:8500");
    assert_eq!(c.token, Some(crate::config::Secret("from-file".into())));
}

#[test]
fn a_bad_consul_http_addr_is_reported_at_the_url_key() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\n",
    );
    let env = |k: &str| (k == "CONSUL_HTTP_ADDR").then(|| "unix:///tmp/consul.sock".to_owned());
    let errs = errors_with(&text, &env);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, "upstream[0].source[0].url");
    assert!(
        errs[0]
            .1
            .starts_with("from $CONSUL_HTTP_ADDR (\"unix:///tmp/consul.sock\")"),
        "{}",
        errs[0].1
    );
}

fn errors_with(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    match parse(text, env) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(ConfigErrors(list)) => list.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

#[test]
fn tokens_and_passwords_never_appear_in_debug_output() {
    let token = secret_file("consul-token-XYZZY\n");
    let password = secret_file("etcd-password-PLUGH");
    let text = with_upstream(&format!(
        "name = \"app\"\n\
         [[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\ntoken_file = {:?}\n\
         [[upstream.source]]\nkind = \"etcd\"\nprefix = \"/app/\"\nusername = \"root\"\npassword_file = {:?}\n",
        token.path().display().to_string(),
        password.path().display().to_string()
    ));
    let config = parse(&text, &no_env).expect("valid");
    let [SourceConfig::Consul(c), SourceConfig::Etcd(e)] = &config.upstreams[0].sources[..] else {
        panic!()
    };
    assert_eq!(
        c.token.as_ref().map(|s| s.0.as_str()),
        Some("consul-token-XYZZY")
    );
    assert_eq!(
        e.password.as_ref().map(|s| s.0.as_str()),
        Some("etcd-password-PLUGH")
    );
    let debug = format!("{config:?} {config:#?}");
    assert!(
        !debug.contains("XYZZY") && !debug.contains("PLUGH"),
        "{debug}"
    );

    let from_env = parse(
        &with_upstream(
            "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\n",
        ),
        &|k: &str| (k == "CONSUL_HTTP_TOKEN").then(|| "env-token-FROTZ".to_owned()),
    )
    .expect("valid");
    assert!(!format!("{from_env:?}").contains("FROTZ"));
}

#[test]
fn unreadable_or_empty_secret_files_are_errors_that_do_not_quote_them() {
    let empty = secret_file("  \n");
    let text = with_upstream(&format!(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\ntoken_file = {:?}\n\
         [[upstream.source]]\nkind = \"etcd\"\nprefix = \"/p/\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n",
        empty.path().display().to_string()
    ));
    let errs = errors(&text);
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "upstream[0].source[0].token_file",
            "upstream[0].source[1].password_file"
        ]
    );
    assert!(errs[0].1.ends_with("is empty"), "{}", errs[0].1);
    assert!(
        errs[1].1.starts_with("failed to read `/nonexistent/pw`"),
        "{}",
        errs[1].1
    );
}

#[test]
fn keys_of_another_source_kind_are_unknown_keys() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\nprefix = \"/app/\"\nservise = \"x\"\n",
    );
    let mut errs = errors(&text);
    errs.sort();
    assert_eq!(
        errs,
        [
            (
                "upstream[0].source[0]".to_owned(),
                "unknown key `prefix` (it belongs to kind = \"etcd\", not \"consul\")".to_owned()
            ),
            (
                "upstream[0].source[0]".to_owned(),
                "unknown key `servise` (did you mean `service`?)".to_owned()
            ),
        ]
    );
}

#[test]
fn every_key_listed_for_a_kind_is_read_by_that_kind() {
    for (kind, keys) in crate::config::sources::KIND_KEYS {
        let lines: Vec<String> = keys.iter().map(|k| format!("{k} = 1")).collect();
        let text = with_upstream(&format!(
            "name = \"app\"\n[[upstream.source]]\nkind = \"{kind}\"\n{}\n",
            lines.join("\n")
        ));
        let unknown: Vec<_> = errors(&text)
            .into_iter()
            .filter(|(_, m)| m.starts_with("unknown key"))
            .collect();
        assert!(unknown.is_empty(), "kind {kind}: {unknown:?}");
    }
}

#[test]
fn an_unknown_kind_lists_the_known_ones_and_nothing_else_about_that_source() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consull\"\nservice = \"app\"\n",
    );
    assert_eq!(
        one_error(&text),
        "upstream[0].source[0].kind: \"consull\" is not one of static, consul, etcd (did you mean `consul`?)"
    );
    let text = with_upstream("name = \"app\"\n[[upstream.source]]\nservers = []\n");
    assert_eq!(
        one_error(&text),
        "upstream[0].source[0].kind: required key is missing"
    );
}

#[test]
fn hash_key_is_required_with_hash_and_checked_for_safe_characters() {
    let missing = with_upstream(&format!("name = \"app\"\nbalance = \"hash\"\n{ONE_STATIC}"));
    assert!(
        one_error(&missing).starts_with("upstream[0].hash_key: required with balance = \"hash\"")
    );
    let bad = with_upstream(&format!(
        "name = \"app\"\nbalance = \"hash\"\nhash_key = \"$x; return 200\"\n{ONE_STATIC}"
    ));
    assert!(
        one_error(&bad).starts_with("upstream[0].hash_key: \"$x; return 200\" may only contain")
    );
    let good = with_upstream(&format!(
        "name = \"app\"\nbalance = \"hash\"\nhash_key = \"$cookie_session\"\n{ONE_STATIC}"
    ));
    let config = parse(&good, &no_env).expect("valid");
    assert_eq!(
        config.upstreams[0].hash_key.as_deref(),
        Some("$cookie_session")
    );
}

#[test]
fn affinity_cookie_is_a_word_and_accepted_with_any_balance() {
    let bad = with_upstream(&format!(
        "name = \"app\"\nbalance = \"sticky\"\naffinity_cookie = \"a=b\"\n{ONE_STATIC}"
    ));
    assert_eq!(
        one_error(&bad),
        "upstream[0].affinity_cookie: cookie name \"a=b\" must match [A-Za-z0-9_]+"
    );
    let misplaced = with_upstream(&format!(
        "name = \"app\"\naffinity_cookie = \"kh\"\n{ONE_STATIC}"
    ));
    assert!(parse(&misplaced, &no_env).is_ok());
}

#[test]
fn backup_servers_are_refused_with_every_hashing_balance() {
    for balance in ["hash", "ip_hash", "random", "sticky"] {
        let key = if balance == "hash" {
            "hash_key = \"$remote_addr\"\n"
        } else {
            ""
        };
        let text = with_upstream(&format!(
            "name = \"app\"\nbalance = \"{balance}\"\n{key}[[upstream.source]]\nkind = \"static\"\n\
             servers = [{{ address = \"10.0.0.1:80\", backup = true }}, \"10.0.0.2:80\"]\n"
        ));
        assert_eq!(
            one_error(&text),
            format!("upstream[0].source[0].servers[0].backup: nginx refuses backup servers with balance = \"{balance}\"")
        );
    }
    let ok = with_upstream(
        "name = \"app\"\nbalance = \"least_conn\"\n[[upstream.source]]\nkind = \"static\"\n\
         servers = [{ address = \"10.0.0.1:80\", backup = true }, \"10.0.0.2:80\"]\n",
    );
    assert!(
        parse(&ok, &no_env).expect("valid").upstreams[0]
            .sources
            .len()
            == 1
    );
}

#[test]
fn server_tables_carry_validated_attributes() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"static\"\nservers = [\
         { address = \"App-1.Internal:80\", weight = 3, max_fails = 2, fail_timeout = \"10s\", down = true }]\n",
    );
    let config = parse(&text, &no_env).expect("valid");
    let SourceConfig::Static(s) = &config.upstreams[0].sources[0] else {
        panic!()
    };
    let e = &s.servers[0];
    assert_eq!(e.address.to_string(), "app-1.internal:80");
    assert_eq!(
        (
            e.attrs.weight,
            e.attrs.max_fails,
            e.attrs.fail_timeout,
            e.attrs.down
        ),
        (Some(3), Some(2), Some(10), true)
    );

    let bad = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"static\"\nservers = [\
         { address = \"10.0.0.1:80\", weight = 0, wieght = 2 }, 7, { weight = 1 }]\n",
    );
    assert_eq!(
        errors(&bad),
        [
            (
                "upstream[0].source[0].servers[0].weight".to_owned(),
                "weight = \"0\" must be a whole number from 1 to 1000".to_owned()
            ),
            (
                "upstream[0].source[0].servers[0]".to_owned(),
                "unknown key `wieght` (did you mean `weight`?)".to_owned()
            ),
            (
                "upstream[0].source[0].servers[1]".to_owned(),
                "expected \"host:port\" or a table with `address`, found the integer 7".to_owned()
            ),
            (
                "upstream[0].source[0].servers[2].address".to_owned(),
                "required key is missing".to_owned()
            ),
        ]
    );
}

#[test]
fn duplicate_upstream_names_and_duplicate_servers_are_refused() {
    let text = format!(
        "[nginx]\noutput = \"/x\"\n\
         [[upstream]]\nname = \"app\"\n{ONE_STATIC}\
         [[upstream]]\nname = \"app\"\n[[upstream.source]]\nkind = \"static\"\n\
         servers = [\"10.0.0.1:80\", \"10.0.0.2:80\", {{ address = \"10.0.0.1:80\" }}]\n"
    );
    assert_eq!(
        errors(&text),
        [
            (
                "upstream[1].name".to_owned(),
                "upstream name \"app\" is already used by upstream[0]".to_owned()
            ),
            (
                "upstream[1].source[0].servers[2]".to_owned(),
                "address 10.0.0.1:80 is already listed at servers[0]".to_owned()
            ),
        ]
    );
}

#[test]
fn health_values_are_checked_against_what_a_probe_can_send() {
    let text = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\npath = \"/a b\"\nexpect_status = \"399-200\"\nrise = 0\nfall = 101\n\
         interval = \"5ms\"\ntimeout = \"0s\"\nexpect_body = \"\"\n{ONE_STATIC}"
    ));
    let paths: Vec<String> = errors(&text).into_iter().map(|(p, _)| p).collect();
    let h = "upstream[0].health";
    assert_eq!(
        paths,
        [
            "path",
            "expect_status",
            "expect_body",
            "interval",
            "timeout",
            "rise",
            "fall"
        ]
        .map(|k| format!("{h}.{k}"))
    );
    for path in ["health", "/a;b", "/{x}", "/\"q\"", "/tab\t"] {
        let text = with_upstream(&format!(
            "name = \"app\"\n[upstream.health]\npath = {path:?}\n{ONE_STATIC}"
        ));
        assert!(
            one_error(&text).starts_with("upstream[0].health.path: "),
            "{path:?} should be refused"
        );
    }
    let single = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\nexpect_status = \"204\"\n{ONE_STATIC}"
    ));
    assert_eq!(
        parse(&single, &no_env).expect("valid").upstreams[0]
            .health
            .expect_status,
        (204, 204)
    );
}

#[test]
fn probe_paces_default_from_the_interval() {
    let text = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\ninterval = \"300ms\"\ntimeout = \"100ms\"\n{ONE_STATIC}"
    ));
    let h = parse(&text, &no_env).expect("valid").upstreams[0]
        .health
        .clone();
    assert_eq!(
        (h.fast_interval, h.down_interval),
        (Duration::from_millis(300), Duration::from_millis(300))
    );
    let text = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
         fast_interval = \"200ms\"\ndown_interval = \"5s\"\n{ONE_STATIC}"
    ));
    let h = parse(&text, &no_env).expect("valid").upstreams[0]
        .health
        .clone();
    assert_eq!(
        (h.fast_interval, h.down_interval),
        (Duration::from_millis(200), Duration::from_secs(5))
    );
}

#[test]
fn probe_paces_out_of_order_are_all_refused_at_once() {
    let text = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
         fast_interval = \"2s\"\ndown_interval = \"900ms\"\nrise = 0\n{ONE_STATIC}"
    ));
    assert_eq!(
        errors(&text),
        [
            (
                "upstream[0].health.fast_interval".to_owned(),
                "fast_interval (2s) must not be longer than interval (1s)".to_owned()
            ),
            (
                "upstream[0].health.down_interval".to_owned(),
                "down_interval (900ms) must not be shorter than interval (1s)".to_owned()
            ),
            (
                "upstream[0].health.rise".to_owned(),
                errors(&with_upstream(&format!(
                    "name = \"app\"\n[upstream.health]\nrise = 0\n{ONE_STATIC}"
                )))[0]
                    .1
                    .clone()
            ),
        ]
    );
    let text = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\nfast_interval = \"5ms\"\n{ONE_STATIC}"
    ));
    assert!(one_error(&text).starts_with("upstream[0].health.fast_interval: "));
}

#[test]
fn a_timeout_longer_than_the_interval_is_refused_and_says_so() {
    let text = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\ninterval = \"1s\"\ntimeout = \"3s\"\n{ONE_STATIC}"
    ));
    assert_eq!(
        one_error(&text),
        "upstream[0].health.timeout: timeout (3s) must not be longer than interval (1s)"
    );
    let text = with_upstream(&format!(
        "name = \"app\"\n[upstream.health]\ninterval = \"500ms\"\n{ONE_STATIC}"
    ));
    assert_eq!(
        one_error(&text),
        "upstream[0].health.timeout: timeout (1s, the default) must not be longer than interval (500ms)"
    );
}

#[test]
fn numbers_and_commands_are_checked_against_their_ranges() {
    let text = format!(
        "[nginx]\noutput = \"/x\"\ntest_command = [\"nginx\", \"\"]\nreload_command = \"systemctl reload nginx\"\n\
         [admin]\nlisten = \"localhost:9187\"\n\
         [[upstream]]\nname = \"app\"\nkeepalive = 10001\nmax_shrink = 1.5\non_all_unhealthy = \"fail_closd\"\n{ONE_STATIC}"
    );
    assert_eq!(
        errors(&text),
        [
            (
                "nginx.test_command[1]".to_owned(),
                "must not be empty".to_owned()
            ),
            (
                "nginx.reload_command".to_owned(),
                "expected an array, found the string \"systemctl reload nginx\"".to_owned()
            ),
            (
                "admin.listen".to_owned(),
                "\"localhost:9187\" is not an IP address and port such as \"127.0.0.1:9187\""
                    .to_owned()
            ),
            (
                "upstream[0].keepalive".to_owned(),
                "must be a whole number from 0 to 10000 (found 10001)".to_owned()
            ),
            (
                "upstream[0].on_all_unhealthy".to_owned(),
                "\"fail_closd\" is not one of fail_open, fail_closed (did you mean `fail_closed`?)"
                    .to_owned()
            ),
            (
                "upstream[0].max_shrink".to_owned(),
                "must be a number from 0 to 1 (found 1.5)".to_owned()
            ),
        ]
    );
}

#[test]
fn etcd_credentials_and_client_certificates_come_in_pairs() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"etcd\"\nprefix = \"\"\nusername = \"u\"\n\
         key_file = \"/k\"\nendpoints = []\n",
    );
    let mut errs = errors(&text);
    errs.sort();
    let s = "upstream[0].source[0]";
    assert_eq!(
        errs,
        [
            (
                format!("{s}.endpoints"),
                "must list at least one endpoint (default: [\"http://127.0.0.1:2379\"])".to_owned()
            ),
            (format!("{s}.key_file"), "needs `cert_file` too".to_owned()),
            (format!("{s}.prefix"), "must not be empty".to_owned()),
            (
                format!("{s}.username"),
                "needs `password_file` too".to_owned()
            ),
        ]
    );
}

#[test]
fn missing_upstreams_and_sources_are_reported() {
    assert_eq!(
        one_error("[nginx]\noutput = \"/x\"\n"),
        "upstream: at least one `[[upstream]]` is required"
    );
    assert_eq!(
        one_error(&with_upstream("name = \"app\"\n")),
        "upstream[0].source: at least one `[[upstream.source]]` is required"
    );
    assert_eq!(
        one_error("[nginx]\noutput = \"/x\"\n[upstream]\nname = \"app\"\n"),
        "upstream: expected an array of tables (`[[upstream]]` sections), found a table"
    );
    assert_eq!(
        one_error(&format!("{MINIMAL}\n[nginxx]\n")),
        "unknown key `nginxx` (did you mean `nginx`?)"
    );
}

/// Lines that reach deep into the walker when shuffled together.
const FRAGMENTS: &[&str] = &[
    "[nginx]",
    "output = \"/x\"",
    "settle = 3",
    "settle = \"1h\"",
    "[admin]",
    "listen = \"[::1]:0\"",
    "[[upstream]]",
    "name = \"a\"",
    "balance = \"hash\"",
    "balance = \"sticky\"",
    "hash_key = \"$x\"",
    "max_shrink = nan",
    "keepalive = -1",
    "[upstream.health]",
    "expect_status = \"599-100\"",
    "expect_status = 99999999999",
    "interval = \"0s\"",
    "timeout = 1.5",
    "[[upstream.source]]",
    "kind = \"static\"",
    "kind = \"etcd\"",
    "kind = \"consul\"",
    "servers = [\"1.2.3.4:5\", { address = \"[::1]:9\", backup = true, weight = 1e300 }, [], {}]",
    "servers = { a = 1 }",
    "endpoints = [\"http://\", 1]",
    "fail_timeout = 1979-05-27T07:32:00Z",
    "upstream = 1",
    "source = []",
    "a.b.c = 1",
];

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_text(text in "\\PC*") {
        // Only the absence of a panic is under test; the result itself is arbitrary.
        let _ = parse(&text, &no_env);
    }

    #[test]
    fn parse_never_panics_on_shuffled_config_lines(picks in proptest::collection::vec(0..FRAGMENTS.len(), 0..40)) {
        let text: Vec<&str> = picks.iter().map(|i| FRAGMENTS[*i]).collect();
        let env = |k: &str| (k == "CONSUL_HTTP_ADDR").then(|| "::1".to_owned());
        // Only the absence of a panic is under test; the result itself is arbitrary.
        let _ = parse(&text.join("\n"), &env);
    }
}

#[test]
fn a_bare_host_and_port_consul_url_means_http() {
    let text = with_upstream(
        "name = \"app\"\n[[upstream.source]]\nkind = \"consul\"\nservice = \"app\"\nurl = \"127.0.0.1:8500\"\n",
    );
    let config = parse(&text, &no_env).expect("valid");
    let SourceConfig::Consul(c) = &config.upstreams[0].sources[0] else {
        panic!()
    };
    assert_eq!(c.url, "http://127.0.0.1:8500");
}

#[test]
fn a_relative_output_is_refused() {
    let text = MINIMAL.replace("/tmp/upstreamd.conf", "upstreamd.conf");
    let e = one_error(&text);
    assert!(
        e.starts_with("nginx.output: \"upstreamd.conf\" is a relative path"),
        "{e}"
    );
}

#[test]
fn admin_limits_have_defaults_and_are_checked() {
    let config = parse(MINIMAL, &no_env).unwrap();
    assert_eq!(config.admin.max_connections, 64);
    assert_eq!(config.admin.header_read_timeout, Duration::from_secs(5));
    let text = format!("[admin]\nmax_connections = 8\nheader_read_timeout = \"1s\"\n{MINIMAL}");
    let config = parse(&text, &no_env).unwrap();
    assert_eq!(
        (
            config.admin.max_connections,
            config.admin.header_read_timeout
        ),
        (8, Duration::from_secs(1))
    );
    let text = format!("[admin]\nmax_connections = 0\n{MINIMAL}");
    assert!(one_error(&text).starts_with("admin.max_connections: "));
}

#[test]
fn a_config_file_larger_than_the_bound_is_refused_without_reading_it_whole() {
    let e = super::load_file(std::path::Path::new("/dev/zero")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "failed to read `/dev/zero`: it is larger than 16 MiB"
    );
}

#[test]
fn a_port_followed_by_a_word_is_an_address_error_not_a_port_error() {
    let text = with_upstream(&format!(
        "name = \"app\"\n{}",
        ONE_STATIC.replace("127.0.0.1:8080", "10.0.0.1:7860 down")
    ));
    let e = one_error(&text);
    assert!(
        e.ends_with(
            "address \"10.0.0.1:7860 down\" must be IPv4:port, [IPv6]:port or hostname:port"
        ),
        "{e}"
    );
}

#[test]
fn the_affinity_secret_file_keys_the_replica_ids_and_must_be_long_enough() {
    let id = |text: &str| {
        let u = &parse(text, &no_env).expect("valid").upstreams[0];
        u.affinity_key.id(&"10.0.0.1:80".parse().unwrap())
    };
    let long = secret_file("0123456789abcdef0123456789abcdef\n");
    let other = secret_file("fedcba9876543210fedcba9876543210\n");
    let with = |f: &tempfile::NamedTempFile| {
        with_upstream(&format!(
            "name = \"app\"\nbalance = \"sticky\"\naffinity_secret_file = \"{}\"\n{ONE_STATIC}",
            f.path().display()
        ))
    };
    let without = with_upstream(&format!(
        "name = \"app\"\nbalance = \"sticky\"\n{ONE_STATIC}"
    ));
    assert_eq!(id(&with(&long)), id(&with(&long)));
    assert_ne!(id(&with(&long)), id(&with(&other)));
    assert_ne!(id(&with(&long)), id(&without));

    let short = secret_file("too short\n");
    let err = one_error(&with(&short));
    assert!(
        err.starts_with("upstream[0].affinity_secret_file: `")
            && err.ends_with(
                "holds fewer than 16 bytes; write a random secret such as `openssl rand -hex 32`"
            ),
        "{err}"
    );
    assert!(
        !err.contains("too short"),
        "the secret is never quoted: {err}"
    );
}

#[test]
fn a_bad_fail_timeout_says_a_duration_is_accepted_and_quotes_once() {
    let text = with_upstream(&format!(
        "name = \"app\"\n{}",
        ONE_STATIC.replace(
            "\"127.0.0.1:8080\"",
            "{ address = \"127.0.0.1:8080\", fail_timeout = \"10x\" }"
        )
    ));
    let e = one_error(&text);
    assert!(
        e.ends_with("fail_timeout = \"10x\" must be whole seconds from 0 to 86400, or a duration in whole seconds such as \"10s\""),
        "{e}"
    );
}

#[test]
fn an_upstream_named_like_a_sticky_replica_group_is_refused() {
    let text = format!(
        "[nginx]\noutput = \"/tmp/x.conf\"\n[[upstream]]\nname = \"app\"\nbalance = \"sticky\"\n{ONE_STATIC}\
         [[upstream]]\nname = \"app__0123456789abcdef\"\n{ONE_STATIC}"
    );
    assert_eq!(
        one_error(&text),
        "upstream[1].name: upstream name \"app__0123456789abcdef\" is reserved for a replica group of the sticky upstream \"app\""
    );
    let fine = text.replace("balance = \"sticky\"\n", "");
    assert!(parse(&fine, &no_env).is_ok());
}

#[test]
fn max_old_generations_is_read_and_bounded() {
    let text = |n: &str| {
        format!(
            "[nginx]\noutput = \"/tmp/upstreamd.conf\"\nmax_old_generations = {n}\n\n[[upstream]]\nname = \"app\"\n{ONE_STATIC}"
        )
    };
    let config = parse(&text("3"), &no_env).expect("valid");
    assert_eq!(config.nginx.max_old_generations, 3);
    assert_eq!(
        errors(&text("1001")),
        vec![(
            "nginx.max_old_generations".to_owned(),
            "must be a whole number from 0 to 1000 (found 1001)".to_owned()
        )]
    );
}
