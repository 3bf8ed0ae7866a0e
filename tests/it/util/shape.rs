//! The shape of a file the built-in template renders, checked line by line.
//!
//! Shared by the property tests in `tests/it/injection.rs` and the fuzz targets in `fuzz/`
//! (include it with `#[path = ".../tests/it/util/shape.rs"] mod shape;`). Every line must be
//! one of the lines the template can produce, with the variable parts limited to what the
//! typed values allow; braces must nest one deep and balance; and the number of `upstream`
//! blocks and `server` lines must be the number the caller fed in. So a registry string that
//! added a directive, a server, a brace or a line break would fail here.

use std::sync::OnceLock;

use regex::Regex;

/// `[A-Za-z0-9_]+`: upstream names and cookie names.
const WORD: &str = r"[A-Za-z0-9_]+";
/// A replica's affinity id: 16 lower-case hex digits.
const ID: &str = r"[0-9a-f]{16}";
/// An address as `Address`'s `Display` prints it: IPv4, bracketed IPv6, lower-case RFC 1123
/// hostname; then a port.
const ADDRESS: &str = r"(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*):[0-9]{1,5}";

/// What a rendered file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// `upstream NAME {` blocks, per-replica groups of sticky upstreams included.
    pub upstreams: usize,
    /// `server` lines, placeholders and per-replica groups included.
    pub servers: usize,
}

struct Grammar {
    server: Regex,
    lines: Vec<(&'static str, Regex)>,
}

fn grammar() -> &'static Grammar {
    static G: OnceLock<Grammar> = OnceLock::new();
    G.get_or_init(|| {
        let w = WORD;
        let line = |kind: &'static str, re: String| (kind, Regex::new(&format!("^{re}$")).unwrap());
        Grammar {
            server: Regex::new(&format!(
                r"^    server {ADDRESS}(?: weight=[0-9]{{1,4}})?(?: max_fails=[0-9]{{1,4}})?(?: fail_timeout=[0-9]{{1,5}}s)?(?: backup)?(?: down)?;$"
            ))
            .unwrap(),
            lines: vec![
                line("blank", String::new()),
                line(
                    "comment",
                    r"# Managed by upstreamd: changes here are overwritten\. Source of truth: the registry\.".into(),
                ),
                line(
                    "comment",
                    format!(r"# {w}: affinity that names the replica\. The {w} cookie holds the id of the replica"),
                ),
                line(
                    "comment",
                    r"# that served the client; the id of a replica that is up routes to it, anything else to the".into(),
                ),
                line(
                    "comment",
                    r"# consistent hash on the cookie \(on the client address until there is one: a first response".into(),
                ),
                line(
                    "comment",
                    r"# sets a random value, so that browsers behind one address spread, then the replica's id\)\.".into(),
                ),
                line(
                    "comment",
                    format!(r"# In the location: proxy_pass http://\${w}_affinity_route;"),
                ),
                line(
                    "comment",
                    format!(r"# and: add_header Set-Cookie \${w}_affinity_cookie always;"),
                ),
                line(
                    "comment",
                    r"    # Nothing is registered; nginx refuses an empty upstream\.".into(),
                ),
                line(
                    "comment",
                    r"# Many replica ids: the map hash sized for them \(nginx's default warns from about 200\)\.".into(),
                ),
                line("http", r"map_hash_bucket_size 128;".into()),
                line("http", r"map_hash_max_size [0-9]{4,7};".into()),
                line(
                    "comment",
                    r"    # Every endpoint fails its health check: on_all_unhealthy = (?:fail_open|fail_closed)\.".into(),
                ),
                line("open", format!(r"map \$cookie_{w} \${w}_affinity_(?:route|key) \{{")),
                line("open", format!(r"map \$upstream_addr \${w}_affinity_last \{{")),
                line("open", format!(r"map \${w}_affinity_last \${w}_affinity_served \{{")),
                line(
                    "open",
                    format!(r#"map "\$cookie_{w}:\${w}_affinity_served" \${w}_affinity_cookie \{{"#),
                ),
                line("map", format!(r"    default {w};")),
                line("map route", format!(r"    ({ID}) ({w}__({ID}));")),
                line("map", r#"    ""      \$remote_addr;"#.into()),
                line("map", format!(r"    default \$cookie_{w};")),
                line("map", r#"    "~\(\[\^ \]\+\)\$" \$1;"#.into()),
                line("map", r#"    default "";"#.into()),
                line("map", format!(r#"    "{ADDRESS}" {ID};"#)),
                line("map", r#"    "~:\$"   "";"#.into()),
                line(
                    "map",
                    format!(r#"    "~\^:"   "{w}=\$request_id; Path=/; HttpOnly; SameSite=Lax";"#),
                ),
                line("map", r#"    "~\^\(\[0-9a-f\]\+\):\\1\$" "";"#.into()),
                line(
                    "map",
                    format!(r#"    default "{w}=\${w}_affinity_served; Path=/; HttpOnly; SameSite=Lax";"#),
                ),
                line("open", format!(r"upstream {w} \{{")),
                line("directive", format!(r"    zone {w} [0-9]+k;")),
                line("directive", r"    least_conn;".into()),
                line("directive", r"    ip_hash;".into()),
                line("directive", r"    hash [$A-Za-z0-9_.:-]+ consistent;".into()),
                line("directive", r"    random two least_conn;".into()),
                line("directive", r"    keepalive [0-9]+;".into()),
                line("close", r"\}".into()),
            ],
        }
    })
}

/// Checks `text` against the template's grammar and the expected counts; the error names the
/// first offending line.
pub fn check(text: &str, expected: Expected) -> Result<(), String> {
    let g = grammar();
    let (mut depth, mut upstreams, mut servers) = (0usize, 0usize, 0usize);
    let (mut targets, mut defined) = (Vec::new(), std::collections::BTreeSet::new());
    if text.contains('\r') || text.contains('\0') {
        return Err("the file holds a carriage return or a NUL".into());
    }
    for (n, l) in text.split('\n').enumerate() {
        let at = |why: &str| format!("line {}: {why}: {l:?}", n + 1);
        let kind = if l.trim_start().starts_with("server ") {
            if !g.server.is_match(l) {
                return Err(at("a server line outside the strict grammar"));
            }
            servers += 1;
            "server"
        } else {
            match g.lines.iter().find(|(_, re)| re.is_match(l)) {
                Some((kind, re)) => {
                    if *kind == "map route" {
                        let c = re.captures(l).expect("the line matched");
                        if c[1] != c[3] {
                            return Err(at("an affinity id routing to another id's group"));
                        }
                        targets.push(c[2].to_owned());
                    }
                    kind
                }
                None => return Err(at("a line the template cannot produce")),
            }
        };
        if kind != "comment" && !kind.starts_with("map") && l.matches(';').count() > 1 {
            return Err(at("more than one `;`"));
        }
        match kind {
            "open" => {
                if depth != 0 {
                    return Err(at("a block opened inside a block"));
                }
                depth = 1;
                if let Some(name) = l
                    .strip_prefix("upstream ")
                    .and_then(|r| r.strip_suffix(" {"))
                {
                    upstreams += 1;
                    defined.insert(name.to_owned());
                }
            }
            "close" => {
                if depth != 1 {
                    return Err(at("a `}` closing nothing"));
                }
                depth = 0;
            }
            "blank" | "comment" => {}
            "http" if depth == 0 => {}
            "http" => return Err(at("an http-level directive inside a block")),
            _ if depth != 1 => return Err(at("a directive outside a block")),
            _ => {}
        }
        if l.matches('{').count() + l.matches('}').count() > 1 {
            return Err(at("more than one brace"));
        }
    }
    if depth != 0 {
        return Err("a block is left open at the end".into());
    }
    if let Some(t) = targets.iter().find(|t| !defined.contains(*t)) {
        return Err(format!(
            "an affinity id routes to `{t}`, which no upstream block defines"
        ));
    }
    let found = Expected { upstreams, servers };
    if found != expected {
        return Err(format!("expected {expected:?}, found {found:?}"));
    }
    Ok(())
}

/// Panics unless `text` has the template's shape with `expected` counts, and its `server`
/// lines name exactly the addresses in `addresses` (the placeholder `127.0.0.1:1 down;` of an
/// empty upstream aside, unless it is one of them).
pub fn assert_renders(
    text: &str,
    expected: Expected,
    addresses: &std::collections::BTreeSet<String>,
) {
    if let Err(e) = check(text, expected) {
        panic!("{e}\n---- rendered:\n{text}");
    }
    let named: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("    server "))
        .filter(|l| !l.starts_with("127.0.0.1:1 down;") || addresses.contains("127.0.0.1:1"))
        .map(|l| l.split([' ', ';']).next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(&named, addresses, "server lines vs endpoints\n{text}");
}
