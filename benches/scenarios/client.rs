//! A small HTTP/1.1 client over tokio TCP streams: keep-alive connections, responses with
//! Content-Length or chunked bodies, and a paced (open-loop) load generator built on them.
//!
//! Why not wrk: wrk 4.1 only counts a timeout when the late answer finally arrives, and never
//! abandons a request that gets none. A replica that accepts and never answers (`hang`, the
//! fail-slow scenario) behind `proxy_read_timeout 3600s` would swallow wrk's connections one
//! by one and the load would stop, which is the very event under test. This client gives up
//! on a request after a deadline, as a user does, keeps a record per request (when it was
//! due, how long it took, what came back, which replica answered) for time windows, and sends
//! at a fixed rate whatever the answers do.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout_at;

/// One response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The body ended as framed (Content-Length reached, or the last chunk seen).
    pub complete: bool,
    /// The server will close the connection.
    pub close: bool,
}

/// Why a request failed below HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect.
    Connect,
    /// The connection was closed or reset before any byte of the answer, on a connection that
    /// had already carried a request (the keep-alive race a reload opens).
    ResetOnReuse,
    /// The same on a fresh connection.
    Reset,
    /// The answer could not be parsed.
    Protocol,
}

/// A keep-alive connection with its read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pub requests: u32,
}

impl Conn {
    pub async fn connect(addr: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
            requests: 0,
        })
    }

    /// Whether the server closed this idle connection (a decent client checks before reusing
    /// one, as browsers and hyper do; only a close that races the request is a failure).
    pub fn closed_by_peer(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Ok(0) => true,
            // An idle keep-alive connection has nothing to say; bytes here are a protocol error.
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }

    /// Sends `request` and reads one response.
    pub async fn send(&mut self, request: &[u8]) -> std::result::Result<Response, Failure> {
        let reused = self.requests > 0;
        self.requests += 1;
        let early = if reused {
            Failure::ResetOnReuse
        } else {
            Failure::Reset
        };
        if self.stream.write_all(request).await.is_err() {
            return Err(early);
        }
        self.read_response(early).await
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn read_response(&mut self, early: Failure) -> std::result::Result<Response, Failure> {
        // Headers.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            match self.fill().await {
                Ok(0) | Err(_) if self.buf.is_empty() => return Err(early),
                Ok(0) | Err(_) => return Err(Failure::Protocol),
                Ok(_) => {}
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or(Failure::Protocol)?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let close = header("connection").is_some_and(|v| v.contains("close"));
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = header("content-length").and_then(|v| v.parse::<usize>().ok());

        let (body, complete) = if chunked {
            self.read_chunked().await
        } else if let Some(length) = length {
            while self.buf.len() < length {
                match self.fill().await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let complete = self.buf.len() >= length;
            let take = length.min(self.buf.len());
            (self.buf.drain(..take).collect(), complete)
        } else if status == 204 || status == 304 {
            (Vec::new(), true)
        } else {
            // Until the connection closes.
            while let Ok(n) = self.fill().await {
                if n == 0 {
                    break;
                }
            }
            (std::mem::take(&mut self.buf), true)
        };
        Ok(Response {
            status,
            body,
            complete,
            close: close || !complete,
        })
    }

    /// A chunked body: the data, and whether the last (zero) chunk arrived.
    async fn read_chunked(&mut self) -> (Vec<u8>, bool) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                match self.fill().await {
                    Ok(0) | Err(_) => return (body, false),
                    Ok(_) => {}
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let Ok(size) =
                usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            else {
                return (body, false);
            };
            self.buf.drain(..line_end + 2);
            // The chunk's data and its CRLF (for the last chunk: the final CRLF).
            while self.buf.len() < size + 2 {
                match self.fill().await {
                    Ok(0) | Err(_) => {
                        let take = size.min(self.buf.len());
                        body.extend(self.buf.drain(..take));
                        return (body, false);
                    }
                    Ok(_) => {}
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return (body, true);
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A GET request's bytes.
pub fn get_request(path: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: upstreamd-bench\r\n{extra_headers}\r\n"
    )
    .into_bytes()
}

/// Which stand-in replica answered `GET /` on `addr` for a fresh cookie (`probe-{k}`), or
/// `None` after a short pause when nothing usable answered.
pub async fn served_by(addr: &str, k: u64) -> Option<String> {
    let cookie = format!("Cookie: kh_affinity=probe-{k}\r\n");
    match get_once(addr, "/", &cookie, Duration::from_secs(2)).await {
        Ok((200, body)) => body
            .trim()
            .strip_prefix("kotaemon-standin ")
            .map(str::to_owned),
        _ => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        }
    }
}

/// One GET on a fresh connection: (status, body).
pub async fn get_once(
    addr: &str,
    path: &str,
    extra_headers: &str,
    within: Duration,
) -> Result<(u16, String)> {
    let deadline = tokio::time::Instant::now() + within;
    let attempt = async {
        let mut conn = Conn::connect(addr).await.context("connect")?;
        let request = get_request(path, &format!("Connection: close\r\n{extra_headers}"));
        match conn.send(&request).await {
            Ok(r) => Ok((r.status, String::from_utf8_lossy(&r.body).into_owned())),
            Err(f) => bail!("GET {path}: {f:?}"),
        }
    };
    match timeout_at(deadline, attempt).await {
        Ok(r) => r,
        Err(_) => bail!("GET http://{addr}{path}: no answer within {within:?}"),
    }
}

/// What a request of the load came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 2xx–4xx with a complete body.
    Ok,
    /// A 5xx from nginx (502, 504…).
    Status5xx,
    /// No complete answer within the client timeout.
    Timeout,
    Connect,
    ResetOnReuse,
    Reset,
    /// The body was cut short, or could not be parsed.
    Aborted,
}

impl Outcome {
    pub fn is_error(self) -> bool {
        self != Outcome::Ok
    }
}

/// One request of the load.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    /// When it was due, in seconds since the load started.
    pub due: f64,
    /// From due to the end of the answer (or the failure), in seconds.
    pub latency: f64,
    pub outcome: Outcome,
    /// Index of the replica that answered (from the body of `GET /`), if any.
    pub replica: Option<usize>,
}

/// A paced load: `rate` requests per second for `duration`, spread over `users` virtual users,
/// each with its own affinity cookie and keep-alive connections.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: String,
    pub rate: f64,
    pub duration: Duration,
    pub users: usize,
    pub timeout: Duration,
    /// Replica names, to tell from `GET /` who answered.
    pub replicas: Vec<String>,
}

/// The records of one load run.
pub struct LoadRun {
    /// Wall-clock time (Unix seconds) when the load started, to line up with nginx's log.
    pub started_unix: f64,
    pub recs: Vec<Rec>,
    /// Idle keep-alive connections found closed by nginx before reuse (not failures).
    pub stale_dropped: u64,
}

type Pool = Arc<Mutex<Vec<Conn>>>;

/// Runs the load to completion: every request is sent on time and either answered or given up
/// after `timeout`, so this returns within `duration + timeout` (plus a connect's worth).
pub async fn run_load(spec: LoadSpec) -> LoadRun {
    let started_unix = unix_now();
    let start = tokio::time::Instant::now();
    let total = (spec.rate * spec.duration.as_secs_f64()).round() as u64;
    let users = spec.users.max(1);
    let pools: Vec<Pool> = (0..users).map(|_| Pool::default()).collect();
    let requests: Vec<Arc<Vec<u8>>> = (0..users)
        .map(|u| {
            Arc::new(get_request(
                "/",
                &format!("Cookie: kh_affinity=user-{u}\r\n"),
            ))
        })
        .collect();
    let names: Arc<BTreeMap<String, usize>> = Arc::new(
        spec.replicas
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect(),
    );
    let stale = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut recs = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / spec.rate);
        tokio::time::sleep_until(due).await;
        let user = (i as usize) % users;
        let (pool, request, names, stale, addr) = (
            Arc::clone(&pools[user]),
            Arc::clone(&requests[user]),
            Arc::clone(&names),
            Arc::clone(&stale),
            spec.addr.clone(),
        );
        let deadline = due + spec.timeout;
        tasks.spawn(async move {
            let result = timeout_at(deadline, one(&addr, &pool, &request, &stale)).await;
            let latency = (tokio::time::Instant::now() - due).as_secs_f64();
            let (outcome, replica) = match result {
                Err(_) => (Outcome::Timeout, None),
                Ok(Err(f)) => (
                    match f {
                        Failure::Connect => Outcome::Connect,
                        Failure::ResetOnReuse => Outcome::ResetOnReuse,
                        Failure::Reset => Outcome::Reset,
                        Failure::Protocol => Outcome::Aborted,
                    },
                    None,
                ),
                Ok(Ok(r)) if !r.complete => (Outcome::Aborted, None),
                Ok(Ok(r)) if r.status >= 500 => (Outcome::Status5xx, None),
                Ok(Ok(r)) => {
                    let body = String::from_utf8_lossy(&r.body);
                    let name = body
                        .trim()
                        .strip_prefix("kotaemon-standin ")
                        .unwrap_or_default();
                    (Outcome::Ok, names.get(name).copied())
                }
            };
            Rec {
                due: (due - start).as_secs_f64(),
                latency,
                outcome,
                replica,
            }
        });
        // Collect finished requests as we go, so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            // A request task cannot panic short of a bug here; a lost record would show as a
            // shortfall in the request count of the report.
            if let Ok(rec) = done {
                recs.push(rec);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(rec) = done {
            recs.push(rec);
        }
    }
    recs.sort_by(|a, b| a.due.total_cmp(&b.due));
    LoadRun {
        started_unix,
        recs,
        stale_dropped: stale.load(std::sync::atomic::Ordering::Relaxed),
    }
}

async fn one(
    addr: &str,
    pool: &Mutex<Vec<Conn>>,
    request: &[u8],
    stale: &std::sync::atomic::AtomicU64,
) -> std::result::Result<Response, Failure> {
    let mut conn = loop {
        let idle = pool.lock().expect("pool lock").pop();
        match idle {
            Some(mut c) => {
                if !c.closed_by_peer() {
                    break c;
                }
                stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            None => break Conn::connect(addr).await.map_err(|_| Failure::Connect)?,
        }
    };
    let response = conn.send(request).await?;
    if !response.close {
        pool.lock().expect("pool lock").push(conn);
    }
    Ok(response)
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// One request on a fresh connection: (status, body). `body` is sent with a Content-Length.
pub async fn request_once(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
    within: Duration,
) -> Result<(u16, String)> {
    let deadline = tokio::time::Instant::now() + within;
    let attempt = async {
        let mut conn = Conn::connect(addr).await.context("connect")?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        );
        match conn.send(request.as_bytes()).await {
            Ok(r) => Ok((r.status, String::from_utf8_lossy(&r.body).into_owned())),
            Err(f) => bail!("{method} {path}: {f:?}"),
        }
    };
    match timeout_at(deadline, attempt).await {
        Ok(r) => r,
        Err(_) => bail!("{method} http://{addr}{path}: no answer within {within:?}"),
    }
}

/// How one chat (a Gradio queue join, then its SSE data stream) ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatOutcome {
    /// Every token, `process_completed` with the whole answer, `close_stream`, a clean end.
    Intact,
    /// The data request reached a replica that does not hold the session (affinity broken).
    SessionLost,
    /// The stream ended early or its answer was not whole.
    Broken,
    /// The join failed (status or transport).
    JoinFailed,
    /// No end within the deadline.
    Timeout,
}

/// Plays one chat through nginx with the affinity cookie `cookie`: `POST /queue/join`, then
/// `GET /queue/data` until the stream ends, checking that the answer has all `tokens` tokens.
pub async fn chat(
    addr: &str,
    cookie: &str,
    session: &str,
    tokens: u32,
    within: Duration,
) -> ChatOutcome {
    let deadline = tokio::time::Instant::now() + within;
    let play = async {
        let join = format!(
            r#"{{"data":["hello"],"event_data":null,"fn_index":0,"trigger_id":1,"session_hash":"{session}"}}"#
        );
        let headers = format!("Content-Type: application/json\r\nCookie: kh_affinity={cookie}\r\n");
        match request_once(addr, "POST", "/queue/join", &headers, &join, within).await {
            Ok((200, body)) if body.contains("event_id") => {}
            _ => return ChatOutcome::JoinFailed,
        }
        let Ok(mut conn) = Conn::connect(addr).await else {
            return ChatOutcome::Broken;
        };
        let request = get_request(
            &format!("/queue/data?session_hash={session}"),
            &format!("Cookie: kh_affinity={cookie}\r\nAccept: text/event-stream\r\n"),
        );
        let response = match conn.send(&request).await {
            Ok(r) => r,
            Err(_) => return ChatOutcome::Broken,
        };
        judge_stream(
            &String::from_utf8_lossy(&response.body),
            response.complete,
            tokens,
        )
    };
    timeout_at(deadline, play)
        .await
        .unwrap_or(ChatOutcome::Timeout)
}

/// Whether an SSE body is a whole answer: `process_completed` carrying `tokens` tokens, then
/// `close_stream`, and the chunked body ended properly.
fn judge_stream(body: &str, complete: bool, tokens: u32) -> ChatOutcome {
    let events: Vec<serde_json::Value> = body
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let msg = |e: &serde_json::Value| e["msg"].as_str().unwrap_or_default().to_owned();
    if events.iter().any(|e| msg(e) == "unexpected_error") {
        return ChatOutcome::SessionLost;
    }
    let answer = events
        .iter()
        .find(|e| msg(e) == "process_completed")
        .and_then(|e| e["output"]["data"][0].as_str().map(str::to_owned));
    let whole = answer.is_some_and(|a| {
        a.starts_with("answer from ")
            && a.ends_with(&format!(" tok{tokens}"))
            && a.matches(" tok").count() == tokens as usize
    });
    let closed = events.last().is_some_and(|e| msg(e) == "close_stream");
    if whole && closed && complete {
        ChatOutcome::Intact
    } else {
        ChatOutcome::Broken
    }
}

/// An open browser tab's `GET /heartbeat/{session}` stream, held until the returned task is
/// aborted (or `within` passes).
pub fn open_tab(addr: String, session: String, within: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let hold = async {
            let Ok(mut conn) = Conn::connect(&addr).await else {
                return;
            };
            let request = get_request(
                &format!("/heartbeat/{session}"),
                &format!("Cookie: kh_affinity={session}\r\n"),
            );
            // The stream never ends on its own; this returns only if it is cut.
            let _cut = conn.send(&request).await;
        };
        // Either the deadline or the stream's end ends the tab; both are fine here.
        let _ended = tokio::time::timeout(within, hold).await;
    })
}
