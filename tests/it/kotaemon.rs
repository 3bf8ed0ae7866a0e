//! Kotaemon behind nginx: the shipped server block passes `nginx -t`, and streamed chats
//! complete through nginx with `balance = "sticky"` (and break with round robin).

use std::time::Duration;

use crate::util::*;

/// The shipped `examples/nginx/kotaemon-site.conf`, listening on `port`.
fn shipped_site(port: u16) -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/nginx/kotaemon-site.conf"
    ))
    .unwrap()
    .replace(
        "listen 127.0.0.1:8080;",
        &format!("listen 127.0.0.1:{port};"),
    )
}

/// The upstream `upstreamd once --dry-run` renders for these replicas and this balance.
fn render(replicas: &[&Replica], balance: &str) -> String {
    let servers: Vec<String> = replicas.iter().map(|r| format!("\"{}\"", r.addr)).collect();
    // --dry-run writes nothing: the paths only need to be valid.
    let d = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[nginx]\noutput = \"{d}/upstreams.conf\"\npid_file = \"{d}/nginx.pid\"\ntest_command = []\n\
         [[upstream]]\nname = \"kotaemon\"\nbalance = \"{balance}\"\naffinity_cookie = \"kh_affinity\"\n\
         [upstream.health]\npath = \"/queue/status\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
         [[upstream.source]]\nkind = \"static\"\nservers = [{}]\n",
        servers.join(", "),
        d = d.path().display()
    );
    let (_dir, path) = write_config(&cfg);
    let (code, stdout, stderr) =
        upstreamd(&["once", "--config", path.to_str().unwrap(), "--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    let mut text = stdout;
    if balance != "sticky" {
        // The site routes on and sets the affinity variables; without sticky they must
        // still exist.
        text.push_str("map $uri $kotaemon_affinity_route { default kotaemon; }\n");
        text.push_str("map $uri $kotaemon_affinity_cookie { default \"\"; }\n");
    }
    text
}

/// One chat the way a browser does it: load the page (gets the affinity cookie), join the
/// queue, read the answer stream. Returns the final answer, or why it failed.
async fn chat(base: &str, n: usize) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    client
        .get(format!("{base}/"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let session = format!("session{n}x{}", std::process::id());
    let join = client
        .post(format!("{base}/queue/join"))
        .json(&serde_json::json!({"session_hash": session, "fn_index": 3, "data": ["hello"], "event_data": null, "trigger_id": 1}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !join.status().is_success() {
        return Err(format!("join: {}", join.status()));
    }
    let body = client
        .get(format!("{base}/queue/data?session_hash={session}"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| format!("stream broken: {e}"))?;
    let mut answer = None;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        match v["msg"].as_str() {
            Some("process_completed") => {
                answer = v["output"]["data"][0].as_str().map(str::to_owned)
            }
            Some("unexpected_error") => return Err(v["message"].to_string()),
            _ => {}
        }
    }
    answer.ok_or_else(|| "no process_completed".into())
}

async fn chats(base: &str, n: usize) -> Vec<Result<String, String>> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(chat(base, i).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_chats_complete_through_the_shipped_server_block_and_round_robin_breaks_them() {
    let replicas = [
        Replica::start_on(
            "alpha",
            &format!("127.0.0.1:{}", free_port()),
            &["--token-delay", "5ms", "--tokens", "5"],
        ),
        Replica::start_on(
            "bravo",
            &format!("127.0.0.1:{}", free_port()),
            &["--token-delay", "5ms", "--tokens", "5"],
        ),
        Replica::start_on(
            "charlie",
            &format!("127.0.0.1:{}", free_port()),
            &["--token-delay", "5ms", "--tokens", "5"],
        ),
    ];
    let refs: Vec<&Replica> = replicas.iter().collect();
    let site = Nginx::start_site(&render(&refs, "sticky"), &shipped_site);
    let t = site.test_config();
    assert!(
        t.status.success(),
        "nginx -t on the shipped server block: {}",
        String::from_utf8_lossy(&t.stderr)
    );
    let base = format!("http://127.0.0.1:{}", site.port);

    let sticky = chats(&base, 10).await;
    let completed: Vec<&String> = sticky.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        completed.len(),
        10,
        "sticky: every chat completes: {sticky:?}"
    );
    let served_by: std::collections::BTreeSet<&str> = completed
        .iter()
        .filter_map(|a| a.split(':').next())
        .collect();
    assert!(
        served_by.len() >= 2,
        "cookies spread chats over replicas: {served_by:?}"
    );

    // The same site with round robin: join and stream land on different replicas.
    std::fs::write(site.output(), render(&refs, "round_robin")).unwrap();
    assert!(site.test_config().status.success());
    let pid = site.master();
    let old_workers = children(pid.as_raw() as u32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGHUP).unwrap();
    wait_for("the new workers alone", Duration::from_secs(5), || {
        let now = children(pid.as_raw() as u32);
        !now.is_empty() && now.iter().all(|w| !old_workers.contains(w))
    });
    let rr = chats(&base, 10).await;
    let rr_ok = rr.iter().filter(|r| r.is_ok()).count();
    eprintln!("figure: chats completed: sticky 10/10, round robin {rr_ok}/10");
    assert!(rr_ok < 10, "round robin should break chats: {rr:?}");
}
