//! Per-replica queue state: Gradio's server messages, the session table, the fake chat.
//!
//! Like Gradio's queue, a chat runs as soon as it is joined and its messages
//! wait in the session's mailbox until `GET /queue/data` drains them; a
//! session exists only on the replica that took the join.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

/// One Gradio 4 queue message, serialised as `{"msg": "<variant>", ...}` in
/// field order, as sent in `data:` lines and by `GET /queue/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ServerMessage {
    Estimation {
        event_id: Option<String>,
        rank: Option<u32>,
        queue_size: usize,
        rank_eta: Option<f64>,
    },
    ProcessStarts {
        event_id: String,
        eta: Option<f64>,
    },
    ProcessGenerating {
        event_id: String,
        output: Output,
        success: bool,
    },
    ProcessCompleted {
        event_id: String,
        output: Output,
        success: bool,
    },
    Heartbeat,
    CloseStream,
    UnexpectedError {
        message: String,
        success: bool,
    },
}

/// The `output` of a generating or completed message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Output {
    /// One value per output component; here just the answer text.
    pub data: Vec<String>,
    pub is_generating: bool,
    /// Seconds the event took; only on `process_completed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
}

impl ServerMessage {
    /// The message as one server-sent event: `data: <compact json>\n\n`.
    pub fn to_sse(&self) -> String {
        // Serialising plain strings, options and numbers cannot fail.
        let json = serde_json::to_string(self).expect("server messages serialise");
        format!("data: {json}\n\n")
    }

    /// The reply a replica gives for a session it does not hold.
    pub fn session_not_found() -> Self {
        ServerMessage::UnexpectedError {
            message: "404: Session not found.".to_owned(),
            success: false,
        }
    }
}

/// The answer after `tokens` tokens: `answer from <replica>: tok1 … tokN`.
pub fn partial_answer(replica: &str, tokens: u32) -> String {
    let mut answer = format!("answer from {replica}:");
    for k in 1..=tokens {
        answer.push_str(&format!(" tok{k}"));
    }
    answer
}

/// One browser tab's queue state.
#[derive(Default)]
struct Session {
    /// Messages produced but not yet streamed, oldest first.
    mailbox: VecDeque<ServerMessage>,
    /// Events joined whose `process_completed` has not been streamed yet.
    pending: BTreeSet<String>,
    /// Woken whenever `mailbox` grows.
    arrived: Arc<Notify>,
}

/// What the data stream should do next for a session.
pub enum Next {
    /// Send this message; `close` says the stream must then send
    /// `close_stream` and end.
    Send { message: ServerMessage, close: bool },
    /// Nothing yet; wait on the notifier (registered before this answer).
    Wait,
    /// The replica does not hold this session.
    Unknown,
}

/// How chats are played.
pub struct Script {
    pub replica: Arc<str>,
    pub tokens: u32,
    pub token_delay: Duration,
}

/// The replica's session table and its count of chats in progress.
pub struct Chats {
    script: Script,
    sessions: Mutex<HashMap<String, Session>>,
    in_progress: AtomicUsize,
}

impl Chats {
    pub fn new(script: Script) -> Arc<Self> {
        Arc::new(Chats {
            script,
            sessions: Mutex::new(HashMap::new()),
            in_progress: AtomicUsize::new(0),
        })
    }

    /// Chats joined and not yet completed (or abandoned).
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::SeqCst)
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        // The table stays consistent between statements; a panic elsewhere
        // while holding the lock must not take the whole replica down.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new event for `session_hash` and starts playing it.
    /// Returns the event id.
    pub fn join(self: &Arc<Self>, session_hash: &str) -> String {
        let event_id = format!("{:032x}", rand::random::<u128>());
        self.sessions()
            .entry(session_hash.to_owned())
            .or_default()
            .pending
            .insert(event_id.clone());
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        let guard = InProgress(Arc::clone(self));
        tokio::spawn(Arc::clone(self).play(session_hash.to_owned(), event_id.clone(), guard));
        event_id
    }

    /// Produces one chat's messages into the session's mailbox. Stops early
    /// if the session is forgotten (its data stream went away).
    async fn play(self: Arc<Self>, session_hash: String, event_id: String, guard: InProgress) {
        let started = tokio::time::Instant::now();
        let estimation = ServerMessage::Estimation {
            event_id: Some(event_id.clone()),
            rank: Some(0),
            queue_size: self.in_progress(),
            rank_eta: None,
        };
        let starts = ServerMessage::ProcessStarts {
            event_id: event_id.clone(),
            eta: None,
        };
        if !self.post(&session_hash, estimation) || !self.post(&session_hash, starts) {
            return;
        }
        for k in 1..=self.script.tokens {
            tokio::time::sleep(self.script.token_delay).await;
            let generating = ServerMessage::ProcessGenerating {
                event_id: event_id.clone(),
                output: Output {
                    data: vec![partial_answer(&self.script.replica, k)],
                    is_generating: true,
                    duration: None,
                },
                success: true,
            };
            if !self.post(&session_hash, generating) {
                return;
            }
        }
        // Count the chat as finished before anyone can see it finish, so
        // `queue_size` is already 0 when a client reads `close_stream`.
        drop(guard);
        let completed = ServerMessage::ProcessCompleted {
            event_id,
            output: Output {
                data: vec![partial_answer(&self.script.replica, self.script.tokens)],
                is_generating: false,
                duration: Some(started.elapsed().as_secs_f64()),
            },
            success: true,
        };
        // If the session is gone there is nobody to tell; nothing else to do.
        let _delivered = self.post(&session_hash, completed);
    }

    /// Appends to the session's mailbox; `false` if the session is gone.
    fn post(&self, session_hash: &str, message: ServerMessage) -> bool {
        let mut sessions = self.sessions();
        let Some(session) = sessions.get_mut(session_hash) else {
            return false;
        };
        session.mailbox.push_back(message);
        session.arrived.notify_waiters();
        true
    }

    /// The notifier to wait on for `session_hash`, if the session exists.
    pub fn notifier(&self, session_hash: &str) -> Option<Arc<Notify>> {
        self.sessions()
            .get(session_hash)
            .map(|s| Arc::clone(&s.arrived))
    }

    /// Takes the next message for the data stream. Once the last pending
    /// event's `process_completed` is taken the session is dropped, as the
    /// stream is about to close.
    pub fn next(&self, session_hash: &str) -> Next {
        let mut sessions = self.sessions();
        let Some(session) = sessions.get_mut(session_hash) else {
            return Next::Unknown;
        };
        let Some(message) = session.mailbox.pop_front() else {
            return Next::Wait;
        };
        let close = match &message {
            ServerMessage::ProcessCompleted { event_id, .. } => {
                session.pending.remove(event_id);
                session.pending.is_empty()
            }
            _ => false,
        };
        if close {
            // Nothing is pending, so the mailbox is empty too.
            sessions.remove(session_hash);
        }
        Next::Send { message, close }
    }

    /// Drops a session whose data stream disconnected, which also stops its
    /// chats (Gradio cleans a session's events the same way).
    pub fn forget(&self, session_hash: &str) {
        self.sessions().remove(session_hash);
    }
}

/// Decrements the in-progress count when a chat ends, however it ends.
struct InProgress(Arc<Chats>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chats(tokens: u32) -> Arc<Chats> {
        Chats::new(Script {
            replica: "replica-a".into(),
            tokens,
            token_delay: Duration::from_millis(10),
        })
    }

    #[test]
    fn queue_status_estimation_matches_gradio_bytes() {
        let status = ServerMessage::Estimation {
            event_id: None,
            rank: None,
            queue_size: 0,
            rank_eta: None,
        };
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"msg":"estimation","event_id":null,"rank":null,"queue_size":0,"rank_eta":null}"#
        );
    }

    #[test]
    fn sse_frames_are_one_data_line_and_a_blank_line() {
        assert_eq!(
            ServerMessage::CloseStream.to_sse(),
            "data: {\"msg\":\"close_stream\"}\n\n"
        );
        assert_eq!(
            ServerMessage::session_not_found().to_sse(),
            "data: {\"msg\":\"unexpected_error\",\"message\":\"404: Session not found.\",\"success\":false}\n\n"
        );
    }

    #[test]
    fn answers_name_the_replica_and_count_tokens() {
        assert_eq!(partial_answer("r", 0), "answer from r:");
        assert_eq!(partial_answer("r", 3), "answer from r: tok1 tok2 tok3");
    }

    #[tokio::test]
    async fn a_joined_chat_plays_through_to_close_and_forgets_the_session() {
        let chats = chats(2);
        let event_id = chats.join("s1");
        assert_eq!(chats.in_progress(), 1);
        let mut seen = Vec::new();
        loop {
            let notified = chats
                .notifier("s1")
                .expect("session exists")
                .notified_owned();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match chats.next("s1") {
                Next::Send { message, close } => {
                    seen.push(message);
                    if close {
                        break;
                    }
                }
                Next::Wait => notified.await,
                Next::Unknown => panic!("session vanished mid-chat"),
            }
        }
        let kinds: Vec<_> = seen
            .iter()
            .map(|m| {
                serde_json::to_value(m).unwrap()["msg"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "estimation",
                "process_starts",
                "process_generating",
                "process_generating",
                "process_completed"
            ]
        );
        let ServerMessage::ProcessCompleted {
            event_id: done,
            output,
            ..
        } = &seen[4]
        else {
            unreachable!()
        };
        assert_eq!(done, &event_id);
        assert_eq!(output.data, ["answer from replica-a: tok1 tok2"]);
        assert_eq!(chats.in_progress(), 0);
        assert!(matches!(chats.next("s1"), Next::Unknown));
    }

    #[tokio::test]
    async fn forgetting_a_session_stops_its_chat() {
        let chats = chats(100);
        chats.join("s1");
        chats.forget("s1");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(chats.in_progress(), 0);
        assert!(matches!(chats.next("s1"), Next::Unknown));
    }

    #[tokio::test]
    async fn the_stream_stays_open_until_every_joined_event_completes() {
        let chats = chats(0);
        let first = chats.join("s1");
        let second = chats.join("s1");
        // Both chats finish immediately; drain and check close comes last.
        let mut closes = Vec::new();
        while closes.len() < 6 {
            match chats.next("s1") {
                Next::Send { message, close } => closes.push((message, close)),
                Next::Wait => tokio::task::yield_now().await,
                Next::Unknown => panic!("closed early after {closes:?}"),
            }
        }
        let completed: Vec<_> = closes
            .iter()
            .filter_map(|(m, close)| match m {
                ServerMessage::ProcessCompleted { event_id, .. } => {
                    Some((event_id.clone(), *close))
                }
                _ => None,
            })
            .collect();
        assert_eq!(completed.len(), 2);
        assert!(!completed[0].1 && completed[1].1);
        let ids: BTreeSet<_> = completed.into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, BTreeSet::from([first, second]));
    }
}
