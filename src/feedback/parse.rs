//! Reading one line of nginx's error log: does it report an upstream failure, and where?
//!
//! Pure and bounded: lines longer than [`MAX_LINE`] are never looked at (nginx itself cuts
//! error-log lines at 2048 bytes, `NGX_MAX_ERROR_STR`). Checked against nginx 1.22.1's own
//! lines (`error_log … error`):
//!
//! ```text
//! 2026/11/30 12:15:21 [error] 8504#8504: *1 connect() failed (111: Connection refused) while connecting to upstream, client: 127.0.0.1, server: , request: "GET /a HTTP/1.1", upstream: "http://127.0.0.9:17999/a", host: "127.0.0.1:18181"
//! 2026/11/30 12:15:22 [error] 8504#8504: *5 upstream timed out (110: Connection timed out) while reading response header from upstream, client: 127.0.0.1, server: , request: "GET /h HTTP/1.1", upstream: "http://127.0.0.10:17998/h", host: "127.0.0.1:18181"
//! 2026/11/30 12:15:22 [error] 8504#8504: *7 upstream prematurely closed connection while reading response header from upstream, client: …, upstream: "http://127.0.0.11:17997/c", host: …
//! 2026/11/30 12:15:23 [error] 8504#8504: *9 no live upstreams while connecting to upstream, client: …, upstream: "http://kotaemon/", host: …
//! ```
//!
//! The message must *start* with one of the four failures, so a client cannot forge one in
//! its request line, and the first `, upstream: "` after it is nginx's own field: since nginx
//! 1.21.1 a request line cannot hold spaces, and the client-controlled fields that could
//! (`referrer`) come after it. A forged line could at worst bring a probe forward: the
//! probe, not the log, decides.

use crate::model::Address;

/// Lines longer than this are skipped whole (nginx writes at most 2048 bytes per line).
pub const MAX_LINE: usize = 4096;

/// The upstream failures that bring a probe forward, as nginx words them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `upstream timed out (110: …) while …`: connect, send or read timed out.
    TimedOut,
    /// `connect() failed (111: Connection refused) while connecting to upstream`.
    ConnectFailed,
    /// `upstream prematurely closed connection while …`.
    PrematurelyClosed,
    /// `no live upstreams while connecting to upstream`: every server of the group failed.
    NoLiveUpstreams,
}

/// The message openings nginx uses for each failure.
const FAILURES: [(&str, Failure); 4] = [
    ("upstream timed out", Failure::TimedOut),
    ("connect() failed", Failure::ConnectFailed),
    (
        "upstream prematurely closed connection",
        Failure::PrematurelyClosed,
    ),
    ("no live upstreams", Failure::NoLiveUpstreams),
];

/// Who the failure is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One server, by the address nginx connected to.
    Endpoint(Address),
    /// A whole upstream group, by name (`no live upstreams`: no server was tried).
    Upstream(String),
}

/// An upstream failure nginx reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// What went wrong.
    pub failure: Failure,
    /// Where.
    pub target: Target,
}

/// The upstream failure `line` reports, if it is one of the four (see the module doc) and
/// names a server address or an upstream group; `None` for any other line, and for lines
/// longer than [`MAX_LINE`].
pub fn parse_line(line: &[u8]) -> Option<Signal> {
    if line.len() > MAX_LINE {
        return None;
    }
    let line = std::str::from_utf8(line).ok()?;
    let message = message(line)?;
    let failure = FAILURES
        .iter()
        .find(|(text, _)| message.starts_with(text))
        .map(|&(_, f)| f)?;
    let (_, after) = message.split_once(", upstream: \"")?;
    let url = &after[..after.find('"')?];
    let (scheme, rest) = url.split_once("://")?;
    if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let target = match failure {
        Failure::NoLiveUpstreams => {
            let name_ok = !authority.is_empty()
                && authority
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            Target::Upstream(name_ok.then(|| authority.to_owned())?)
        }
        _ => Target::Endpoint(authority.parse().ok()?),
    };
    Some(Signal { failure, target })
}

/// The message of an `[error]`-or-worse line: the text after `LEVEL] PID#TID: *CONN `.
fn message(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once("] ")?;
    let (pid, rest) = rest.split_once(": ")?;
    if !pid.bytes().all(|b| b.is_ascii_digit() || b == b'#') {
        return None;
    }
    let rest = rest.strip_prefix('*')?;
    let (conn, message) = rest.split_once(' ')?;
    conn.bytes().all(|b| b.is_ascii_digit()).then_some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PREFIX: &str = "2026/11/30 12:15:21 [error] 8504#8504: *1 ";
    const TAIL: &str = ", client: 127.0.0.1, server: , request: \"GET /a HTTP/1.1\", upstream: \"http://127.0.0.9:17999/a\", host: \"127.0.0.1:18181\"";

    fn line(message: &str) -> String {
        format!("{PREFIX}{message}{TAIL}")
    }

    fn endpoint(failure: Failure) -> Option<Signal> {
        Some(Signal {
            failure,
            target: Target::Endpoint("127.0.0.9:17999".parse().unwrap()),
        })
    }

    #[test]
    fn reads_the_four_failures_of_nginx_1_22() {
        let cases = [
            (
                "connect() failed (111: Connection refused) while connecting to upstream",
                Failure::ConnectFailed,
            ),
            (
                "upstream timed out (110: Connection timed out) while reading response header from upstream",
                Failure::TimedOut,
            ),
            (
                "upstream prematurely closed connection while reading response header from upstream",
                Failure::PrematurelyClosed,
            ),
        ];
        for (message, failure) in cases {
            assert_eq!(
                parse_line(line(message).as_bytes()),
                endpoint(failure),
                "{message}"
            );
        }
    }

    #[test]
    fn no_live_upstreams_names_the_group() {
        let text = format!(
            "{PREFIX}no live upstreams while connecting to upstream, client: 127.0.0.1, server: , request: \"GET / HTTP/1.1\", upstream: \"http://kotaemon/\", host: \"x\""
        );
        assert_eq!(
            parse_line(text.as_bytes()),
            Some(Signal {
                failure: Failure::NoLiveUpstreams,
                target: Target::Upstream("kotaemon".into()),
            })
        );
    }

    #[test]
    fn reads_ipv6_peers_and_other_schemes() {
        let text = format!(
            "{PREFIX}upstream timed out (110: Connection timed out) while connecting to upstream, client: ::1, server: x, request: \"GET / HTTP/1.1\", upstream: \"grpc://[::1]:8001\", host: \"x\""
        );
        assert_eq!(
            parse_line(text.as_bytes()).map(|s| s.target),
            Some(Target::Endpoint("[::1]:8001".parse().unwrap()))
        );
    }

    #[test]
    fn lines_that_are_not_upstream_failures_say_nothing() {
        for text in [
            "2026/11/30 12:15:21 [notice] 8504#8504: signal 1 (SIGHUP) received from 9, reconfiguring".to_owned(),
            format!("{PREFIX}client sent invalid request while reading client request line, client: 127.0.0.1, server: , request: \"GET /x HTTP/1.1\""),
            format!("{PREFIX}open() \"/srv/x\" failed (2: No such file or directory){TAIL}"),
            // A 4xx from the backend is not logged at all; a client that closes early is.
            format!("{PREFIX}client prematurely closed connection while reading upstream{TAIL}"),
            String::new(),
            "upstream timed out".to_owned(),
        ] {
            assert_eq!(parse_line(text.as_bytes()), None, "{text}");
        }
    }

    #[test]
    fn a_failure_text_forged_in_the_request_line_is_not_a_failure() {
        let text = format!(
            "{PREFIX}open() \"/x\" failed (2: No such file or directory), client: 1.2.3.4, server: , request: \"GET /upstream%20timed%20out HTTP/1.1\", upstream: \"http://127.0.0.9:17999/\", host: \"x\""
        );
        assert_eq!(parse_line(text.as_bytes()), None);
    }

    #[test]
    fn a_referrer_cannot_name_another_endpoint() {
        let text = format!(
            "{PREFIX}upstream timed out (110: Connection timed out) while reading upstream{TAIL}, referrer: \"x\", upstream: \"http://10.9.9.9:80/\""
        );
        assert_eq!(parse_line(text.as_bytes()), endpoint(Failure::TimedOut));
    }

    #[test]
    fn peers_that_are_not_addresses_and_bad_group_names_are_ignored() {
        for upstream in [
            "unix:/run/app.sock",
            "http://unix:/run/app.sock:/x",
            "http://",
            "://127.0.0.1:80/",
            "http://127.0.0.1/",
            "http://127.0.0.1:0/",
        ] {
            let text = format!(
                "{PREFIX}connect() failed (111: Connection refused) while connecting to upstream, client: 1.2.3.4, upstream: \"{upstream}\", host: \"x\""
            );
            assert_eq!(parse_line(text.as_bytes()), None, "{upstream}");
        }
        let bad_group = format!(
            "{PREFIX}no live upstreams while connecting to upstream, client: 1.2.3.4, upstream: \"http://a-b/\""
        );
        assert_eq!(parse_line(bad_group.as_bytes()), None);
    }

    #[test]
    fn lines_longer_than_the_bound_are_not_read() {
        let mut text =
            line("upstream timed out (110: Connection timed out) while connecting to upstream");
        assert!(parse_line(text.as_bytes()).is_some());
        text.push_str(&" ".repeat(MAX_LINE));
        assert_eq!(parse_line(text.as_bytes()), None);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            // Only the absence of a panic is under test.
            let _ = parse_line(&bytes);
        }

        #[test]
        fn whatever_follows_a_real_failure_the_peer_is_nginxs_field(extra in "\\PC{0,200}") {
            let text = format!("{}{extra}", line("connect() failed (111: Connection refused) while connecting to upstream"));
            prop_assert_eq!(parse_line(text.as_bytes()), endpoint(Failure::ConnectFailed));
        }
    }
}
