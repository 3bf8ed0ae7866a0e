//! Runs the real `kotaemon-standin` binary and checks what nginx and upstreamd would see.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::free_port;

const READY_WITHIN: Duration = Duration::from_secs(5);

/// A running stand-in, killed and reaped on drop. Its stderr goes to the test
/// log with a `[name]` prefix (shown when a test fails).
struct Standin {
    child: Child,
    name: String,
    command: String,
    base: String,
    addr: String,
    spawned: Instant,
}

impl Standin {
    fn spawn(name: &str, extra: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--listen", addr.as_str(), "--name", name];
        args.extend_from_slice(extra);
        let command = format!("kotaemon-standin {}", args.join(" "));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kotaemon-standin"))
            .args(&args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn `{command}`: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let prefix = format!("[{name}]");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{prefix} {line}");
            }
        });
        Standin {
            child,
            name: name.to_owned(),
            command,
            base: format!("http://{addr}"),
            addr,
            spawned: Instant::now(),
        }
    }

    async fn ready(name: &str, extra: &[&str]) -> Self {
        let standin = Standin::spawn(name, extra);
        standin.wait_ready().await;
        standin
    }

    async fn wait_ready(&self) {
        let client = client();
        let url = self.url("/queue/status");
        eventually(
            &format!("`{}` answers /queue/status", self.command),
            READY_WITHIN,
            || {
                let request = client.get(&url).timeout(Duration::from_millis(500)).send();
                async move { request.await.ok().filter(|r| r.status() == 200) }
            },
        )
        .await;
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn set_mode(&self, word: &str) -> reqwest::Response {
        client()
            .post(self.url("/_standin/mode"))
            .body(word.to_owned())
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap_or_else(|e| panic!("[{}] POST /_standin/mode {word}: {e}", self.name))
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(None) => panic!("`{}` still running after {within:?}", self.command),
                Err(e) => panic!("failed to wait for `{}`: {e}", self.command),
            }
        }
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        // Either may fail only because the child already exited and was reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Polls `attempt` every 25 ms until it yields, or panics naming `what`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads a response body to its end. Returns the text and how it ended:
/// `Ok` for a clean end, `Err` for a body error (aborted chunked stream).
async fn read_body(
    mut response: reqwest::Response,
    within: Duration,
) -> (String, Result<(), String>) {
    let mut text = String::new();
    let ended = tokio::time::timeout(within, async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk).expect("utf-8 body")),
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    })
    .await;
    match ended {
        Ok(end) => (text, end),
        Err(_) => panic!("body did not end within {within:?}; got so far: {text:?}"),
    }
}

/// Splits an event-stream body into the JSON of its `data:` events.
fn events(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("\n\n") || body.is_empty(),
        "partial event in {body:?}"
    );
    body.split_terminator("\n\n")
        .map(|frame| {
            let json = frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a single data line: {frame:?}"));
            serde_json::from_str(json).unwrap_or_else(|e| panic!("bad JSON {json:?}: {e}"))
        })
        .collect()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
}

async fn join(standin: &Standin, session_hash: &str) -> String {
    let body = serde_json::json!({
        "session_hash": session_hash,
        "fn_index": 3,
        "data": ["what is in the docs?", null],
        "event_data": null,
        "trigger_id": 12,
    });
    let response = client()
        .post(standin.url("/queue/join"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST /queue/join");
    assert_eq!(response.status(), 200);
    let reply: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    reply["event_id"]
        .as_str()
        .expect("event_id string")
        .to_owned()
}

/// Opens `session`'s data stream (`/queue/data`) on `standin`.
async fn data_stream(standin: &Standin, session: &str) -> reqwest::Response {
    client()
        .get(standin.url(&format!("/queue/data?session_hash={session}")))
        .send()
        .await
        .unwrap()
}

/// Asserts that `response` is a 200 server-sent-event stream, as Gradio's.
fn assert_event_stream(response: &reqwest::Response) {
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(response, "content-type"),
        Some("text/event-stream; charset=utf-8")
    );
}

async fn queue_status(standin: &Standin) -> reqwest::Response {
    client()
        .get(standin.url("/queue/status"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("GET /queue/status")
}

async fn queue_size(standin: &Standin) -> u64 {
    let body: Value =
        serde_json::from_str(&queue_status(standin).await.text().await.unwrap()).unwrap();
    body["queue_size"].as_u64().expect("queue_size")
}

#[tokio::test]
async fn queue_status_is_gradio_estimation_json() {
    let standin = Standin::ready("replica-a", &[]).await;
    let response = queue_status(&standin).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"msg":"estimation","event_id":null,"rank":null,"queue_size":0,"rank_eta":null}"#
    );
}

#[tokio::test]
async fn health_paths_are_fastapi_not_found_and_root_names_the_replica() {
    let standin = Standin::ready("replica-a", &[]).await;
    for path in ["/health", "/healthz", "/gradio_api/info", "/no/such/page"] {
        let response = client().get(standin.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(
            header(&response, "content-type"),
            Some("application/json"),
            "{path}"
        );
        assert_eq!(
            response.text().await.unwrap(),
            r#"{"detail":"Not Found"}"#,
            "{path}"
        );
    }
    let root = client().get(standin.url("/")).send().await.unwrap();
    assert_eq!(root.status(), 200);
    assert_eq!(root.text().await.unwrap(), "kotaemon-standin replica-a\n");
}

#[tokio::test]
async fn a_chat_streams_tokens_then_completes_and_closes() {
    let standin = Standin::ready("replica-a", &["--tokens", "5", "--token-delay", "60ms"]).await;
    let event_id = join(&standin, "tab-1").await;
    assert_eq!(
        queue_size(&standin).await,
        1,
        "the joined chat is in progress"
    );

    let response = data_stream(&standin, "tab-1").await;
    assert_event_stream(&response);
    assert_eq!(header(&response, "x-accel-buffering"), None);
    let (body, end) = read_body(response, Duration::from_secs(5)).await;
    assert_eq!(
        end,
        Ok(()),
        "a finished chat ends its stream cleanly; body: {body}"
    );

    let events = events(&body);
    let kinds: Vec<&str> = events.iter().map(|e| e["msg"].as_str().unwrap()).collect();
    let mut expected = vec!["estimation", "process_starts"];
    expected.extend(["process_generating"; 5]);
    expected.extend(["process_completed", "close_stream"]);
    assert_eq!(kinds, expected, "body: {body}");
    for event in &events[..events.len() - 1] {
        assert_eq!(event["event_id"], event_id.as_str());
    }
    let answers: Vec<&str> = events
        .iter()
        .filter_map(|e| e["output"]["data"][0].as_str())
        .collect();
    assert_eq!(answers[0], "answer from replica-a: tok1");
    assert_eq!(answers.concat().matches("replica-a").count(), 6);
    let completed = &events[events.len() - 2];
    assert_eq!(completed["success"], true);
    assert_eq!(
        completed["output"]["data"][0],
        "answer from replica-a: tok1 tok2 tok3 tok4 tok5"
    );
    assert_eq!(queue_size(&standin).await, 0, "the chat is over");
}

#[tokio::test]
async fn unknown_session_gets_unexpected_error_then_an_aborted_body() {
    let standin = Standin::ready("replica-a", &[]).await;
    let response = data_stream(&standin, "never-joined").await;
    assert_event_stream(&response);
    let (body, end) = read_body(response, Duration::from_secs(5)).await;
    assert_eq!(
        body,
        "data: {\"msg\":\"unexpected_error\",\"message\":\"404: Session not found.\",\"success\":false}\n\n"
    );
    assert!(
        end.is_err(),
        "the chunked body must be aborted, not ended cleanly"
    );
}

#[tokio::test]
async fn sessions_live_only_on_the_replica_that_took_the_join() {
    let (a, b) = tokio::join!(
        Standin::ready("replica-a", &["--tokens", "2", "--token-delay", "10ms"]),
        Standin::ready("replica-b", &[]),
    );
    join(&a, "tab-1").await;
    let response = data_stream(&b, "tab-1").await;
    let (body, end) = read_body(response, Duration::from_secs(5)).await;
    assert!(body.contains("Session not found"), "body: {body}");
    assert!(end.is_err());
}

#[tokio::test]
async fn heartbeat_sends_alive_every_interval_and_never_ends() {
    let standin = Standin::ready("replica-a", &["--heartbeat-interval", "150ms"]).await;
    let mut response = client()
        .get(standin.url("/heartbeat/tab-1"))
        .send()
        .await
        .unwrap();
    assert_event_stream(&response);
    let started = Instant::now();
    let mut text = String::new();
    while text.matches("data: ALIVE\n\n").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(2), response.chunk())
            .await
            .expect("an ALIVE within 2 s")
            .expect("no body error")
            .expect("the stream does not end");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!(text, "data: ALIVE\n\n".repeat(3));
    // The first comes at once, then one per interval.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn error_mode_fails_queue_status_until_healthy_again() {
    let standin = Standin::ready("replica-a", &[]).await;
    assert_eq!(standin.set_mode("error").await.status(), 200);
    assert_eq!(queue_status(&standin).await.status(), 503);
    let root = client().get(standin.url("/")).send().await.unwrap();
    assert_eq!(root.status(), 200, "only the probe fails");

    assert_eq!(standin.set_mode("sick").await.status(), 400);
    let mode = client()
        .get(standin.url("/_standin/mode"))
        .send()
        .await
        .unwrap();
    assert_eq!(mode.text().await.unwrap(), "error\n");

    assert_eq!(standin.set_mode("healthy").await.status(), 200);
    assert_eq!(queue_status(&standin).await.status(), 200);
}

#[tokio::test]
async fn slow_mode_delays_queue_status_but_answers_it() {
    let standin = Standin::ready("replica-a", &[]).await;
    standin.set_mode("slow:400").await;
    let started = Instant::now();
    let response = queue_status(&standin).await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert!(response.text().await.unwrap().contains("\"queue_size\":0"));
}

#[tokio::test]
async fn sick_mode_fails_queue_status_at_once_but_serves_everything_else_slowly() {
    let standin = Standin::ready("replica-a", &[]).await;
    standin.set_mode("sick:400").await;

    let started = Instant::now();
    let response = queue_status(&standin).await;
    assert_eq!(response.status(), 503);
    // The health path is not delayed: a figure for the log (the delayed answers below are
    // asserted slow, a bound noise cannot break).
    eprintln!(
        "figure: sick queue_status answered in {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let response = client().get(standin.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        response.text().await.unwrap(),
        "kotaemon-standin replica-a\n"
    );

    // The control route is not delayed, so the replica can be cured promptly.
    let started = Instant::now();
    assert_eq!(standin.set_mode("healthy").await.status(), 200);
    eprintln!("figure: set_mode answered in {:?}", started.elapsed());
    assert_eq!(queue_status(&standin).await.status(), 200);
}

#[tokio::test]
async fn hang_via_control_file_swallows_requests_until_the_file_says_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("mode");
    let control_arg = control.to_str().unwrap();
    let standin = Standin::ready(
        "replica-a",
        &[
            "--control-file",
            control_arg,
            "--heartbeat-interval",
            "100ms",
        ],
    )
    .await;
    let mut heartbeat = client()
        .get(standin.url("/heartbeat/tab-1"))
        .send()
        .await
        .unwrap();

    write(&control, "hang\n");
    let probe = || {
        client()
            .get(standin.url("/queue/status"))
            .timeout(Duration::from_millis(300))
            .send()
    };
    eventually("a probe times out", Duration::from_secs(3), || {
        let attempt = probe();
        async move { attempt.await.err().filter(|e| e.is_timeout()) }
    })
    .await;
    // The port still accepts connections; nothing answers, not even the control route.
    TcpStream::connect(&standin.addr).expect("hanging, not refusing");
    let control_route = client()
        .post(standin.url("/_standin/mode"))
        .body("healthy")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(control_route.is_err_and(|e| e.is_timeout()));
    // Streams opened before the hang keep going.
    let beat = tokio::time::timeout(Duration::from_secs(2), heartbeat.chunk()).await;
    assert!(matches!(beat, Ok(Ok(Some(_)))), "{beat:?}");

    write(&control, "healthy\n");
    eventually(
        "the probe answers 200 again",
        Duration::from_secs(3),
        || {
            let attempt = probe();
            async move { attempt.await.ok().filter(|r| r.status() == 200) }
        },
    )
    .await;
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text)
        .unwrap_or_else(|e| panic!("failed to write `{}`: {e}", path.display()));
}

#[tokio::test]
async fn startup_delay_keeps_the_port_closed_until_it_passes() {
    let standin = Standin::spawn("replica-a", &["--startup-delay", "1s"]);
    let refused = TcpStream::connect(&standin.addr).expect_err("the port must not be open yet");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    standin.wait_ready().await;
    assert!(
        standin.spawned.elapsed() >= Duration::from_secs(1),
        "ready after {:?}",
        standin.spawned.elapsed()
    );
}

#[tokio::test]
async fn exit_mode_ends_the_process_with_status_1() {
    let mut standin = Standin::ready("replica-a", &[]).await;
    let answer = client()
        .post(standin.url("/_standin/mode"))
        .body("exit")
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(answer.is_err(), "exit does not answer: {answer:?}");
    assert_eq!(
        standin.wait_exit(Duration::from_secs(3)).await.code(),
        Some(1)
    );
}

#[tokio::test]
async fn sigterm_exits_0_promptly_despite_open_streams() {
    let mut standin = Standin::ready("replica-a", &[]).await;
    let _heartbeat = client()
        .get(standin.url("/heartbeat/tab-1"))
        .send()
        .await
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(standin.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
    assert_eq!(
        standin.wait_exit(Duration::from_secs(2)).await.code(),
        Some(0)
    );
}

#[tokio::test]
async fn an_idle_data_stream_gets_heartbeat_messages() {
    let standin = Standin::ready(
        "replica-a",
        &[
            "--tokens",
            "1",
            "--token-delay",
            "700ms",
            "--heartbeat-interval",
            "200ms",
        ],
    )
    .await;
    join(&standin, "tab-1").await;
    let response = data_stream(&standin, "tab-1").await;
    let (body, end) = read_body(response, Duration::from_secs(5)).await;
    assert_eq!(end, Ok(()));
    let kinds: Vec<String> = events(&body)
        .iter()
        .map(|e| e["msg"].as_str().unwrap().to_owned())
        .collect();
    let heartbeats = kinds.iter().filter(|k| *k == "heartbeat").count();
    assert!((2..=4).contains(&heartbeats), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("close_stream"));
}

#[tokio::test]
async fn abandoning_a_data_stream_stops_its_chat() {
    let standin = Standin::ready("replica-a", &["--tokens", "200", "--token-delay", "20ms"]).await;
    join(&standin, "tab-1").await;
    let mut response = data_stream(&standin, "tab-1").await;
    let first = response.chunk().await.unwrap().expect("a first event");
    assert!(first.starts_with(b"data: {\"msg\":\"estimation\""));
    assert_eq!(queue_size(&standin).await, 1);
    drop(response);
    eventually("queue_size drops to 0", Duration::from_secs(2), || async {
        (queue_size(&standin).await == 0).then_some(())
    })
    .await;
    // The session went with the stream, as Gradio cleans it on disconnect.
    let again = data_stream(&standin, "tab-1").await;
    let (body, _) = read_body(again, Duration::from_secs(5)).await;
    assert!(body.contains("Session not found"), "body: {body}");
}
