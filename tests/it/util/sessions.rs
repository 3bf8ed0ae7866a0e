//! Simulated Kotaemon users holding sessions through nginx, and the count of who moved.
//!
//! Shared by `tests/it/affinity.rs` and the `affinity` benchmark scenario (include it with
//! `#[path = ".../tests/it/util/sessions.rs"] mod sessions;`). Each user is a browser: its own
//! cookie jar, its own client address (127.0.1.N, so that first visits spread over the
//! consistent hash as distinct clients would), no connection reuse (so every request meets the
//! current nginx workers). A chat is what KOTAEMON.md describes: `GET /` (the page, which
//! also sets the affinity cookie), `POST /queue/join`, then the SSE `GET /queue/data`; the
//! stand-in's answer names the replica that streamed it. A test splits a chat around a
//! membership change (`join_all`, change, `stream_all`) to catch a join and its stream landing
//! on different replicas, as a real reload does to chats in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::future::join_all;

/// Where one user's chat stream landed, and how the chat ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    /// The replica that answered the user's `GET /` just before the stream (where the
    /// user's requests go now), if it answered.
    landed: Option<String>,
    /// The replica that completed the chat, or why the chat failed.
    chat: Result<String, String>,
}

/// One simulated user.
struct User {
    client: reqwest::Client,
    /// The replica this user's requests went to last (its session's replica).
    home: Option<String>,
    /// The session of the chat in progress, between `join_all` and `stream_all`.
    session: Option<String>,
}

/// A population of users of one nginx front.
pub struct Users {
    base: String,
    users: Vec<User>,
    chats: usize,
}

/// Users moved and chats failed in one step, split into those the step excuses (their own
/// replica went away) and the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Users answered by a replica other than their own, whose own replica is still there.
    pub moved: usize,
    /// Users answered elsewhere because their own replica went away.
    pub moved_excused: usize,
    /// Failed chats of users whose own replica is still there.
    pub failed: usize,
    /// Failed chats of users whose own replica went away.
    pub failed_excused: usize,
    /// Chats in the step.
    pub chats: usize,
}

impl Users {
    /// `count` users (at most 250) of the nginx front at `base` (`http://127.0.0.1:PORT`).
    pub fn new(base: &str, count: usize) -> Self {
        assert!(count <= 250, "one client address a user: 127.0.1.1-250");
        let users = (0..count)
            .map(|i| User {
                client: reqwest::Client::builder()
                    .cookie_store(true)
                    .pool_max_idle_per_host(0)
                    .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 1, i as u8 + 1)))
                    .timeout(Duration::from_secs(20))
                    .build()
                    .expect("a reqwest client"),
                home: None,
                session: None,
            })
            .collect();
        Self {
            base: base.to_owned(),
            users,
            chats: 0,
        }
    }

    /// Each user's own replica (where its last chat was answered), by replica name.
    pub fn homes(&self) -> BTreeMap<String, usize> {
        let mut homes = BTreeMap::new();
        for u in &self.users {
            if let Some(h) = &u.home {
                *homes.entry(h.clone()).or_insert(0) += 1;
            }
        }
        homes
    }

    /// Every user loads the page and joins the queue with a new session, at once. A user
    /// whose join fails has no chat to stream; it is counted failed by `stream_all`.
    pub async fn join_all(&mut self) {
        self.chats += 1;
        let chat = self.chats;
        let base = self.base.clone();
        let joins = self.users.iter().enumerate().map(|(i, u)| {
            let base = base.clone();
            let client = u.client.clone();
            async move {
                let session = format!("user{i}chat{chat}");
                join(&client, &base, &session).await.map(|()| session)
            }
        });
        let sessions = join_all(joins).await;
        for (u, s) in self.users.iter_mut().zip(sessions) {
            u.session = s.ok();
        }
    }

    /// Every user reads its chat's stream, at once; `during` runs meanwhile (e.g. kills a
    /// replica once the streams are open). Then tallies the step: `gone` names the replicas
    /// that went away in it, whose users are excused.
    pub async fn stream_all<F: std::future::Future<Output = ()>>(
        &mut self,
        gone: &BTreeSet<String>,
        during: F,
    ) -> Tally {
        let base = self.base.clone();
        let streams = self.users.iter().map(|u| {
            let base = base.clone();
            let client = u.client.clone();
            let session = u.session.clone();
            async move {
                let landed = page(&client, &base).await.ok();
                let chat = match session {
                    Some(s) => stream(&client, &base, &s).await,
                    None => Err("the join failed".into()),
                };
                Outcome { landed, chat }
            }
        });
        let (outcomes, ()) = futures::join!(join_all(streams), during);
        let mut tally = Tally {
            chats: outcomes.len(),
            ..Tally::default()
        };
        for (u, outcome) in self.users.iter_mut().zip(outcomes) {
            let excused = u.home.as_ref().is_some_and(|h| gone.contains(h));
            // Where the user is now: the replica that streamed its answer, else the one its
            // page request reached (a failed chat may still have moved the user).
            let now = outcome
                .chat
                .as_ref()
                .ok()
                .or(outcome.landed.as_ref())
                .cloned();
            if let (Some(home), Some(now)) = (&u.home, &now) {
                if home != now {
                    *if excused {
                        &mut tally.moved_excused
                    } else {
                        &mut tally.moved
                    } += 1;
                }
            }
            if outcome.chat.is_err() {
                *if excused {
                    &mut tally.failed_excused
                } else {
                    &mut tally.failed
                } += 1;
            }
            if now.is_some() {
                u.home = now;
            }
            u.session = None;
        }
        tally
    }

    /// A whole chat for every user, with no change in between.
    pub async fn chat_all(&mut self, gone: &BTreeSet<String>) -> Tally {
        self.join_all().await;
        self.stream_all(gone, async {}).await
    }
}

/// `GET /`: the replica that answered (the stand-in's page names it).
async fn page(client: &reqwest::Client, base: &str) -> Result<String, String> {
    let page = client
        .get(format!("{base}/"))
        .send()
        .await
        .map_err(|e| format!("page: {e}"))?;
    if !page.status().is_success() {
        return Err(format!("page: {}", page.status()));
    }
    let body = page.text().await.map_err(|e| format!("page: {e}"))?;
    body.trim()
        .strip_prefix("kotaemon-standin ")
        .map(str::to_owned)
        .ok_or_else(|| format!("page: not a stand-in: {body:?}"))
}

/// The page, then the queue join.
async fn join(client: &reqwest::Client, base: &str, session: &str) -> Result<(), String> {
    page(client, base).await?;
    let join = client
        .post(format!("{base}/queue/join"))
        .json(
            &serde_json::json!({"session_hash": session, "fn_index": 3, "data": ["hello"],
                                  "event_data": null, "trigger_id": 1}),
        )
        .send()
        .await
        .map_err(|e| format!("join: {e}"))?;
    if !join.status().is_success() {
        return Err(format!("join: {}", join.status()));
    }
    Ok(())
}

/// The SSE data stream of `session`, read to its end: the replica that completed the chat.
async fn stream(client: &reqwest::Client, base: &str, session: &str) -> Result<String, String> {
    let body = client
        .get(format!("{base}/queue/data?session_hash={session}"))
        .send()
        .await
        .map_err(|e| format!("data: {e}"))?
        .text()
        .await
        .map_err(|e| format!("stream broken: {e}"))?;
    let mut answer = None;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|_| format!("not JSON: {line}"))?;
        match v["msg"].as_str() {
            Some("process_completed") => {
                answer = v["output"]["data"][0].as_str().map(str::to_owned)
            }
            Some("unexpected_error") => return Err(v["message"].to_string()),
            _ => {}
        }
    }
    // "answer from <replica>: tok1 … tokN"
    answer
        .as_deref()
        .and_then(|a| a.strip_prefix("answer from "))
        .map(|rest| rest.split(':').next().unwrap_or_default().to_owned())
        .ok_or_else(|| "no process_completed".into())
}
