//! Plain HTTP on fresh connections, the admin server's `/status` and `/metrics`, and the
//! kernel's view of listening sockets (/proc/net/tcp).

use std::time::Duration;

use super::wait_for;

/// A minimal HTTP/1.1 GET on a new connection (so nginx balances each request anew).
pub fn http_get(authority: &str, path: &str, timeout: Duration) -> Option<(u16, String)> {
    http_request(authority, "GET", path, "", timeout)
}

/// A minimal HTTP/1.1 request with a body on a new connection: (status, body).
pub fn http_request(
    authority: &str,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    http_exchange(authority, method, path, &[], body, timeout).map(|(s, _, b)| (s, b))
}

/// A minimal HTTP/1.1 request with extra header lines (`"Name: value"`) and a body, on a new
/// connection: (status, response head, body).
pub fn http_exchange(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
    timeout: Duration,
) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(authority).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    Some((status, head, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET /status` from the admin server, as JSON.
pub fn admin_status(admin: &str) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("GET http://{admin}/status failed"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `GET /metrics` from the admin server.
pub fn admin_metrics(admin: &str) -> String {
    http_get(admin, "/metrics", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("GET http://{admin}/metrics failed"))
        .1
}

/// The value of one series in Prometheus text, e.g. `upstreamd_reloads_total{result="ok"}`;
/// 0 when absent (a counter never bumped is not exposed).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `upstreamd_reloads_total{result="RESULT"}` from the daemon's `/metrics`; 0 while the admin
/// server is not up yet.
pub fn reloads_counted(admin: &str, result: &str) -> f64 {
    let text = http_get(admin, "/metrics", Duration::from_secs(15))
        .map(|(_, body)| body)
        .unwrap_or_default();
    metric(
        &text,
        &format!("upstreamd_reloads_total{{result=\"{result}\"}}"),
    )
}

/// Waits until `upstreamd_reloads_total{result="RESULT"}` is exactly `n`.
pub fn wait_reloads(admin: &str, result: &str, n: f64) {
    wait_reloads_until(admin, result, &format!("= {n}"), |v| v == n);
}

/// Waits until `upstreamd_reloads_total{result="RESULT"}` is `n` or more.
pub fn wait_reloads_at_least(admin: &str, result: &str, n: f64) {
    wait_reloads_until(admin, result, &format!(">= {n}"), |v| v >= n);
}

fn wait_reloads_until(admin: &str, result: &str, what: &str, ok: impl Fn(f64) -> bool) {
    wait_for(
        &format!("upstreamd_reloads_total{{result=\"{result}\"}} {what}"),
        Duration::from_secs(15),
        || ok(reloads_counted(admin, result)),
    );
}

/// The local addresses listening on TCP `port`, from /proc/net/tcp and tcp6 (hex as the
/// kernel prints them, e.g. `0100007F` for 127.0.0.1).
pub fn listening_on(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((addr, p)) = local.split_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16) == Ok(port) {
                found.push(addr.to_owned());
            }
        }
    }
    found
}

/// How many connections wait in the accept queue of the socket listening on 127.0.0.1:`port`
/// (`rx_queue` of a listening socket in /proc/net/tcp); None when nothing listens there.
pub fn accept_queue(port: u16) -> Option<u32> {
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
            let (addr, p) = local.split_once(':')?;
            let listening = *state == "0A" && addr == "0100007F";
            (listening && u16::from_str_radix(p, 16) == Ok(port))
                .then(|| u32::from_str_radix(queues.split_once(':')?.1, 16).ok())
                .flatten()
        })
}
