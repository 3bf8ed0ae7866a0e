//! What changed between two include files, read from their `server` lines: the change
//! description of the log, whether a change is urgent (it only takes servers out of
//! rotation), and the addresses a file on disk already serves (the shrink guard's baseline
//! when nothing else is known).
//!
//! Pure text in, values out. Comparing files rather than remembered states means the
//! baseline is always what nginx was last given: the file on disk, which a failed apply
//! puts back.

use std::collections::BTreeMap;

/// The placeholder nginx needs in an empty upstream; not a server anyone registered.
const PLACEHOLDER: &str = "127.0.0.1:1";

/// One `server` line of an upstream block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLine {
    /// The line carries `down`.
    pub down: bool,
    /// Its other parameters (`weight=3`, `backup`, …), in order.
    pub params: Vec<String>,
}

/// The servers of every upstream block of a file: upstream name → address → line.
pub type Servers = BTreeMap<String, BTreeMap<String, ServerLine>>;

/// Splits nginx config text into words and the punctuation `{`, `}`, `;`. Comments are
/// dropped; a quoted string is one word (it may hold `;`, as the sticky `map` blocks do).
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty() {
            out.push(std::mem::take(word));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' if word.is_empty() => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                word.push(c);
                let mut escaped = false;
                for q in chars.by_ref() {
                    word.push(q);
                    if escaped {
                        escaped = false;
                    } else if q == '\\' {
                        escaped = true;
                    } else if q == c {
                        break;
                    }
                }
            }
            '{' | '}' | ';' => {
                flush(&mut word, &mut out);
                out.push(c.to_string());
            }
            c if c.is_whitespace() => flush(&mut word, &mut out),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The `server` lines of every `upstream` block of `text`. Anything that is not such a line
/// is ignored; the empty-upstream placeholder (`server 127.0.0.1:1 down;`) is left out.
pub fn parse_servers(text: &str) -> Servers {
    let mut servers = Servers::new();
    // The statement being read, and the enclosing blocks (their first two words).
    let mut words: Vec<String> = Vec::new();
    let mut blocks: Vec<(String, String)> = Vec::new();
    for t in tokens(text) {
        match t.as_str() {
            "{" => {
                let mut w = std::mem::take(&mut words).into_iter();
                blocks.push((w.next().unwrap_or_default(), w.next().unwrap_or_default()));
            }
            "}" => {
                words.clear();
                blocks.pop();
            }
            ";" => {
                let statement = std::mem::take(&mut words);
                let Some((kind, name)) = blocks.last() else {
                    continue;
                };
                if kind != "upstream" {
                    continue;
                }
                let upstream = servers.entry(name.clone()).or_default();
                if let [first, address, params @ ..] = statement.as_slice() {
                    if first != "server" {
                        continue;
                    }
                    let down = params.iter().any(|p| p == "down");
                    if down && address == PLACEHOLDER {
                        continue;
                    }
                    let params = params.iter().filter(|p| *p != "down").cloned().collect();
                    upstream.insert(address.clone(), ServerLine { down, params });
                }
            }
            _ => words.push(t),
        }
    }
    servers
}

/// A one-line summary of what changed from `before` (the file on disk; `None` when there is
/// none) to `after`, for the log and `/status`: `kotaemon: +10.0.0.3:7860, kotaemon:
/// 10.0.0.2:7860 down, kotaemon: -10.0.0.4:7860`.
pub fn describe(before: Option<&Servers>, after: &Servers) -> String {
    let Some(before) = before else {
        return "first file".into();
    };
    let empty = BTreeMap::new();
    let mut parts = Vec::new();
    for (name, servers) in after {
        let old = before.get(name).unwrap_or(&empty);
        for (address, line) in servers {
            match old.get(address) {
                None => parts.push(format!(
                    "{name}: +{address}{}",
                    if line.down { " (down)" } else { "" }
                )),
                Some(prev) if prev.down != line.down => parts.push(format!(
                    "{name}: {address} {}",
                    if line.down { "down" } else { "up" }
                )),
                Some(_) => {}
            }
        }
        for address in old.keys().filter(|a| !servers.contains_key(*a)) {
            parts.push(format!("{name}: -{address}"));
        }
    }
    for name in before.keys().filter(|n| !after.contains_key(*n)) {
        parts.push(format!("upstream {name} removed"));
    }
    if parts.is_empty() {
        "attributes only".into()
    } else {
        parts.join(", ")
    }
}

/// Whether going from `before` to `after` only takes servers out of rotation: at least one
/// server is removed or newly `down`, and nothing is added, brought up, or changed in its
/// other parameters. Such a change is applied without waiting for `settle`.
pub fn is_urgent(before: &Servers, after: &Servers) -> bool {
    if after.keys().any(|n| !before.contains_key(n)) {
        return false;
    }
    let empty = BTreeMap::new();
    let mut took_out = false;
    for (name, old) in before {
        let new = after.get(name).unwrap_or(&empty);
        for (address, line) in new {
            match old.get(address) {
                None => return false,
                Some(prev) if prev.params != line.params || (prev.down && !line.down) => {
                    return false
                }
                Some(prev) => took_out |= !prev.down && line.down,
            }
        }
        took_out |= old.keys().any(|a| !new.contains_key(a));
    }
    took_out
}

/// Whether `after` takes any server of `before` out of rotation (removed, or newly `down`),
/// whatever else it changes: such a change must not wait behind old worker generations.
pub fn takes_any_out(before: &Servers, after: &Servers) -> bool {
    let empty = BTreeMap::new();
    before.iter().any(|(name, old)| {
        let new = after.get(name).unwrap_or(&empty);
        old.iter()
            .any(|(address, prev)| !prev.down && new.get(address).map_or(true, |line| line.down))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(servers: &[&str]) -> String {
        let mut text = String::from(
            "# Managed by upstreamd\nmap $cookie_k $k_affinity_cookie {\n    \"\" \"k=$request_id; Path=/; HttpOnly\";\n    default \"\";\n}\n\nupstream kotaemon {\n    zone kotaemon 64k;\n",
        );
        if servers.is_empty() {
            text.push_str("    # Nothing is registered.\n    server 127.0.0.1:1 down;\n");
        }
        for s in servers {
            text.push_str(&format!("    server {s};\n"));
        }
        text.push_str("    keepalive 32;\n}\n");
        text
    }

    fn parsed(servers: &[&str]) -> Servers {
        parse_servers(&file(servers))
    }

    #[test]
    fn the_server_lines_of_each_upstream_are_read_and_nothing_else() {
        let s = parsed(&["10.0.0.2:80 weight=3 backup", "10.0.0.3:80 down"]);
        let k = &s["kotaemon"];
        assert_eq!(k.len(), 2);
        assert_eq!(
            k["10.0.0.2:80"],
            ServerLine {
                down: false,
                params: vec!["weight=3".into(), "backup".into()]
            }
        );
        assert!(k["10.0.0.3:80"].down && k["10.0.0.3:80"].params.is_empty());
        assert_eq!(s.len(), 1, "map blocks are not upstreams: {s:?}");
    }

    #[test]
    fn the_empty_upstream_placeholder_is_no_server() {
        let s = parsed(&[]);
        assert!(s["kotaemon"].is_empty());
        assert!(parse_servers("").is_empty());
        assert!(parse_servers("not { nginx").is_empty());
    }

    #[test]
    fn eleven_servers_replaced_by_the_placeholder_are_eleven_removals() {
        let eleven: Vec<String> = (2..13).map(|i| format!("127.0.0.{i}:80")).collect();
        let eleven: Vec<&str> = eleven.iter().map(String::as_str).collect();
        let said = describe(Some(&parsed(&eleven)), &parsed(&[]));
        assert_eq!(said.matches(": -127.0.0.").count(), 11, "{said}");
        assert!(is_urgent(&parsed(&eleven), &parsed(&[])));
    }

    #[test]
    fn a_change_that_adds_and_removes_takes_a_server_out_and_an_addition_alone_does_not() {
        let before = parsed(&["10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80 down"]);
        let mixed = parsed(&["10.0.0.2:80", "10.0.0.5:80"]);
        assert!(takes_any_out(&before, &mixed));
        assert!(!is_urgent(&before, &mixed));
        let down = parsed(&[
            "10.0.0.2:80 down",
            "10.0.0.3:80 weight=2",
            "10.0.0.4:80 down",
        ]);
        assert!(takes_any_out(&before, &down));
        let grown = parsed(&[
            "10.0.0.2:80 weight=3",
            "10.0.0.3:80",
            "10.0.0.4:80",
            "10.0.0.6:80",
        ]);
        assert!(!takes_any_out(&before, &grown));
        let dropped_a_down_one = parsed(&["10.0.0.2:80", "10.0.0.3:80"]);
        assert!(!takes_any_out(&before, &dropped_a_down_one));
    }

    #[test]
    fn only_a_missing_file_is_a_first_file() {
        assert_eq!(describe(None, &parsed(&["10.0.0.2:80"])), "first file");
        assert_eq!(
            describe(Some(&parsed(&[])), &parsed(&["10.0.0.2:80"])),
            "kotaemon: +10.0.0.2:80"
        );
    }

    #[test]
    fn the_description_names_additions_flips_and_removals_against_the_file() {
        let before = parsed(&["10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80 down"]);
        let after = parsed(&["10.0.0.2:80 down", "10.0.0.4:80", "10.0.0.5:80 down"]);
        assert_eq!(
            describe(Some(&before), &after),
            "kotaemon: 10.0.0.2:80 down, kotaemon: 10.0.0.4:80 up, kotaemon: +10.0.0.5:80 (down), kotaemon: -10.0.0.3:80"
        );
        let weights = parsed(&["10.0.0.2:80 weight=2", "10.0.0.3:80", "10.0.0.4:80 down"]);
        assert_eq!(describe(Some(&before), &weights), "attributes only");
    }

    #[test]
    fn removals_and_new_downs_are_urgent() {
        let before = parsed(&["10.0.0.2:80", "10.0.0.3:80"]);
        assert!(is_urgent(
            &before,
            &parsed(&["10.0.0.2:80 down", "10.0.0.3:80"])
        ));
        assert!(is_urgent(&before, &parsed(&["10.0.0.3:80"])));
        assert!(is_urgent(&before, &parsed(&["10.0.0.2:80 down"])));
    }

    #[test]
    fn additions_recoveries_attribute_changes_and_no_change_are_not_urgent() {
        let before = parsed(&["10.0.0.2:80", "10.0.0.3:80 down"]);
        for after in [
            &["10.0.0.2:80", "10.0.0.3:80 down"][..],
            &["10.0.0.2:80", "10.0.0.3:80"],
            &["10.0.0.2:80", "10.0.0.3:80 down", "10.0.0.4:80"],
            &["10.0.0.2:80 weight=5", "10.0.0.3:80 down"],
            // One goes down while another comes up: the whole change coalesces.
            &["10.0.0.2:80 down", "10.0.0.3:80"],
            // A removal together with an addition.
            &["10.0.0.4:80"],
        ] {
            assert!(!is_urgent(&before, &parsed(after)), "{after:?}");
        }
        assert!(!is_urgent(&Servers::new(), &parsed(&["10.0.0.2:80"])));
    }
}
