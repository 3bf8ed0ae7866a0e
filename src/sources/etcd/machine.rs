//! The etcd source's state machine: what to do next and what to report, with no I/O.
//!
//! ```text
//!            Connected            Listed(R): send snapshot
//!  Connect ─────────────▶ List ──────────────────────────▶ Watch(R+1)
//!     ▲                    ▲                                 │  events: apply, send if the
//!     │                    └──── compacted (Resync) ─────────┤  parsed membership changed
//!     │  BackoffElapsed                                      │
//!  Backoff(n) ◀──────── Failed (any phase; Report once per outage) ◀─┘
//! ```
//!
//! The shell in `mod.rs` performs the I/O the phase names, feeds the result back as an
//! [`Input`], and carries out the returned [`Step`]. The entries survive failures, so the
//! last good membership stands while etcd is away; a reconnect always lists again.

use std::collections::BTreeMap;

use super::entry::{parse_entry, EntryError};
use crate::model::{Address, Endpoint};
use crate::sources::skipped::SkipTracker;
use crate::sources::{Skipped, SkippedEntry};

/// What the source is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Build a client (and authenticate, with a username).
    Connect,
    /// `Get(prefix, with_prefix)` with the current client.
    List,
    /// Follow the prefix with a watch from `start_revision` (the listed revision + 1).
    Watch {
        /// The first revision the watch asks for.
        start_revision: i64,
    },
    /// Wait [`crate::sources::retry::delay`]`(attempt)`, then connect again with a new client.
    Backoff {
        /// Failures in a row before this wait, from 0.
        attempt: u32,
    },
}

/// One change carried by a watch response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key was created or updated.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// The key was deleted (an expired lease deletes its keys, too).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// The parts of a watch response the machine needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchMsg {
    /// The acknowledgement of the watch's creation (no events).
    pub created: bool,
    /// etcd ended the watch.
    pub canceled: bool,
    /// Non-zero when the revision the watch needs was compacted away.
    pub compact_revision: i64,
    /// etcd's reason for a cancellation.
    pub cancel_reason: String,
    /// The store revision in the response header.
    pub revision: i64,
    /// The changes, in revision order.
    pub changes: Vec<Change>,
}

/// The result of the I/O the current phase asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A client exists.
    Connected,
    /// The prefix was listed at `revision`.
    Listed {
        /// The store revision the list saw.
        revision: i64,
        /// Every key under the prefix with its value.
        kvs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// A watch response arrived.
    Watched(WatchMsg),
    /// The I/O failed (connect, list, watch creation, a broken stream, a timeout).
    Failed(String),
    /// The backoff wait is over.
    BackoffElapsed,
}

/// The membership sent to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Valid endpoints, sorted by address, one per address.
    pub endpoints: Vec<Endpoint>,
    /// Entries left out: invalid, or a second key for an address already present.
    pub skipped: Skipped,
}

/// What the shell must do after an input. Empty most of the time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Send this snapshot.
    pub send: Option<Snapshot>,
    /// With `send`: how many left-out keys the previous snapshot did not leave out.
    pub newly_skipped: usize,
    /// Report this failure (the first of an outage only).
    pub report: Option<String>,
    /// The failure to log when it was not reported (a retry within an outage).
    pub retry_failed: Option<String>,
    /// etcd compacted past the watch: listing again. The compaction revision.
    pub resync: Option<i64>,
    /// The list succeeded after this many failures in a row.
    pub recovered_after: Option<u32>,
    /// Entries newly refused (key, why), to warn about once.
    pub refused: Vec<(String, EntryError)>,
    /// Keys left out because an earlier key (second) names the same address; set when
    /// `send` is.
    pub duplicates: Vec<(String, String)>,
}

/// The source's state: the phase, the entries under the prefix, what was sent last.
#[derive(Debug)]
pub struct Machine {
    prefix: String,
    phase: Phase,
    /// Every key under the prefix, parsed.
    entries: BTreeMap<Vec<u8>, Result<Endpoint, EntryError>>,
    /// The newest revision seen (list or watch).
    revision: i64,
    /// Failures in a row since the last successful list.
    failures: u32,
    last_sent: Option<Snapshot>,
    /// The keys left out of the last computed snapshot.
    tracker: SkipTracker,
}

impl Machine {
    /// A machine for the keys under `prefix`, about to connect.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            phase: Phase::Connect,
            entries: BTreeMap::new(),
            revision: 0,
            failures: 0,
            last_sent: None,
            tracker: SkipTracker::default(),
        }
    }

    /// What to do next.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The newest store revision seen.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Takes the result of the current phase's I/O; an input that does not belong to the
    /// current phase is ignored.
    pub fn step(&mut self, input: Input) -> Step {
        let mut step = Step::default();
        match (self.phase, input) {
            (_, Input::Failed(error)) => {
                self.phase = Phase::Backoff {
                    attempt: self.failures,
                };
                if self.failures == 0 {
                    step.report = Some(error);
                } else {
                    step.retry_failed = Some(error);
                }
                self.failures = self.failures.saturating_add(1);
            }
            (Phase::Connect, Input::Connected) => self.phase = Phase::List,
            (Phase::List, Input::Listed { revision, kvs }) => {
                let old = std::mem::take(&mut self.entries);
                for (key, value) in kvs {
                    let parsed = self.parse(&key, &value);
                    // A refusal already warned about at the same key is not news.
                    if let Err(e) = &parsed {
                        if !matches!(old.get(&key), Some(Err(seen)) if seen == e) {
                            step.refused.push((display_key(&key), e.clone()));
                        }
                    }
                    self.entries.insert(key, parsed);
                }
                self.revision = revision;
                if self.failures > 0 {
                    step.recovered_after = Some(self.failures);
                }
                self.failures = 0;
                self.phase = Phase::Watch {
                    start_revision: revision + 1,
                };
                // Always sent: after a failure the controller holds a stale snapshot, and
                // this is what makes it fresh again.
                let (snapshot, newly, duplicates) = self.snapshot();
                self.last_sent = Some(snapshot.clone());
                step.send = Some(snapshot);
                step.newly_skipped = newly;
                step.duplicates = duplicates;
            }
            (Phase::Watch { .. }, Input::Watched(msg)) => self.watched(msg, &mut step),
            (Phase::Backoff { .. }, Input::BackoffElapsed) => self.phase = Phase::Connect,
            (_, _) => {}
        }
        step
    }

    fn watched(&mut self, msg: WatchMsg, step: &mut Step) {
        if msg.compact_revision > 0 {
            // The watch cannot deliver what happened between our revision and the
            // compaction: only a new list can. The client is fine; no backoff.
            self.phase = Phase::List;
            step.resync = Some(msg.compact_revision);
            return;
        }
        if msg.canceled {
            let reason = match msg.cancel_reason.as_str() {
                "" => "no reason given".to_owned(),
                r => r.to_owned(),
            };
            // Same handling as any failure: report, back off, reconnect, list.
            *step = self.step(Input::Failed(format!("etcd canceled the watch: {reason}")));
            return;
        }
        self.revision = self.revision.max(msg.revision);
        if msg.changes.is_empty() {
            // The creation acknowledgement, or a progress notification.
            return;
        }
        for change in msg.changes {
            match change {
                Change::Put { key, value } => {
                    let parsed = self.parse(&key, &value);
                    if let Err(e) = &parsed {
                        step.refused.push((display_key(&key), e.clone()));
                    }
                    self.entries.insert(key, parsed);
                }
                Change::Delete { key } => {
                    self.entries.remove(&key);
                }
            }
        }
        let (snapshot, newly, duplicates) = self.snapshot();
        // A newly invalid key is sent even when the list looks the same (it replaced another
        // one beyond the listed few): the counter must see it.
        if newly > 0 || self.last_sent.as_ref() != Some(&snapshot) {
            self.last_sent = Some(snapshot.clone());
            step.send = Some(snapshot);
            step.newly_skipped = newly;
            step.duplicates = duplicates;
        }
    }

    fn parse(&self, key: &[u8], value: &[u8]) -> Result<Endpoint, EntryError> {
        let key = std::str::from_utf8(key).map_err(|_| EntryError::KeyNotUtf8)?;
        parse_entry(key, &self.prefix, value)
    }

    /// The membership the entries describe (the first key in key order for an address wins),
    /// how many left-out keys are new since the last call, and the duplicate keys with the
    /// key that won.
    fn snapshot(&mut self) -> (Snapshot, usize, Vec<(String, String)>) {
        let mut by_address: BTreeMap<Address, (&[u8], &Endpoint)> = BTreeMap::new();
        let mut left_out = Vec::new();
        let mut duplicates = Vec::new();
        for (key, parsed) in &self.entries {
            match parsed {
                Ok(ep) => match by_address.get(&ep.address) {
                    Some((first, _)) => {
                        let (key, first) = (display_key(key), display_key(first));
                        left_out.push(SkippedEntry::new(
                            key.clone(),
                            format!("its address {} is already given by {first}", ep.address),
                        ));
                        duplicates.push((key, first));
                    }
                    None => {
                        by_address.insert(ep.address.clone(), (key, ep));
                    }
                },
                Err(e) => left_out.push(SkippedEntry::new(display_key(key), e.to_string())),
            }
        }
        let endpoints = by_address.into_values().map(|(_, ep)| ep.clone()).collect();
        let (skipped, newly) = self.tracker.observe(left_out);
        (Snapshot { endpoints, skipped }, newly, duplicates)
    }
}

/// A key for logs: lossy UTF-8, control characters and quotes escaped.
pub fn display_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/svc/k/";

    fn kv(key: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
        (key.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    fn put(key: &str, value: &str) -> Change {
        Change::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    fn del(key: &str) -> Change {
        Change::Delete { key: key.into() }
    }

    fn events(revision: i64, changes: Vec<Change>) -> Input {
        Input::Watched(WatchMsg {
            revision,
            changes,
            ..WatchMsg::default()
        })
    }

    fn addrs(s: &Snapshot) -> Vec<String> {
        s.endpoints.iter().map(|e| e.address.to_string()).collect()
    }

    /// A machine that has listed `kvs` at revision 10 and is watching.
    fn watching(kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Machine {
        let mut m = Machine::new(P);
        assert_eq!(m.step(Input::Connected), Step::default());
        assert_eq!(m.phase(), Phase::List);
        let step = m.step(Input::Listed { revision: 10, kvs });
        assert!(step.send.is_some());
        assert_eq!(m.phase(), Phase::Watch { start_revision: 11 });
        let ack = Input::Watched(WatchMsg {
            created: true,
            revision: 10,
            ..WatchMsg::default()
        });
        assert_eq!(
            m.step(ack),
            Step::default(),
            "the creation ack changes nothing"
        );
        m
    }

    #[test]
    fn a_list_sends_the_full_snapshot_and_watches_from_the_next_revision() {
        let mut m = Machine::new(P);
        m.step(Input::Connected);
        let step = m.step(Input::Listed {
            revision: 41,
            kvs: vec![
                kv("/svc/k/b", "10.0.0.2:80"),
                kv("/svc/k/a", "10.0.0.1:80"),
                kv("/svc/k/bad", "x y"),
            ],
        });
        let snap = step.send.unwrap();
        assert_eq!(addrs(&snap), ["10.0.0.1:80", "10.0.0.2:80"]);
        assert_eq!(snap.skipped.total, 1);
        assert_eq!(snap.skipped.listed[0].name, "/svc/k/bad");
        assert_eq!(step.newly_skipped, 1);
        assert_eq!(step.refused.len(), 1);
        assert_eq!(step.refused[0].0, "/svc/k/bad");
        assert_eq!(m.phase(), Phase::Watch { start_revision: 42 });
        assert_eq!(m.revision(), 41);
    }

    #[test]
    fn an_empty_prefix_is_an_empty_snapshot_not_a_failure() {
        let mut m = Machine::new(P);
        m.step(Input::Connected);
        let step = m.step(Input::Listed {
            revision: 1,
            kvs: vec![],
        });
        assert_eq!(
            step.send,
            Some(Snapshot {
                endpoints: vec![],
                skipped: Skipped::none()
            })
        );
    }

    #[test]
    fn puts_and_deletes_send_a_new_snapshot() {
        let mut m = watching(vec![kv("/svc/k/a", "10.0.0.1:80")]);
        let step = m.step(events(11, vec![put("/svc/k/b", "10.0.0.2:80")]));
        assert_eq!(addrs(&step.send.unwrap()), ["10.0.0.1:80", "10.0.0.2:80"]);
        let step = m.step(events(12, vec![del("/svc/k/a")]));
        assert_eq!(addrs(&step.send.unwrap()), ["10.0.0.2:80"]);
        assert_eq!(m.revision(), 12);
    }

    #[test]
    fn a_response_that_does_not_change_the_membership_sends_nothing() {
        let mut m = watching(vec![kv("/svc/k/a", "10.0.0.1:80")]);
        // Same endpoint, written differently.
        let step = m.step(events(
            11,
            vec![put("/svc/k/a", r#"{"address":"10.0.0.1:80"}"#)],
        ));
        assert_eq!(step.send, None);
        // A key outside any valid layout changes the skipped count: that is sent.
        let step = m.step(events(12, vec![put("/svc/k/x", "nope")]));
        assert_eq!(step.send.unwrap().skipped.total, 1);
        // Deleting a key that was never there changes nothing.
        assert_eq!(m.step(events(13, vec![del("/svc/k/zzz")])).send, None);
    }

    #[test]
    fn an_attribute_change_is_a_membership_change() {
        let mut m = watching(vec![kv("/svc/k/a", "10.0.0.1:80")]);
        let step = m.step(events(
            11,
            vec![put("/svc/k/a", r#"{"address":"10.0.0.1:80","weight":5}"#)],
        ));
        assert_eq!(step.send.unwrap().endpoints[0].attrs.weight, Some(5));
    }

    #[test]
    fn several_events_in_one_response_send_one_snapshot() {
        let mut m = watching(vec![]);
        let step = m.step(events(
            13,
            vec![
                put("/svc/k/a", "10.0.0.1:80"),
                put("/svc/k/b", "10.0.0.2:80"),
                del("/svc/k/a"),
            ],
        ));
        assert_eq!(addrs(&step.send.unwrap()), ["10.0.0.2:80"]);
    }

    #[test]
    fn a_second_key_for_one_address_is_skipped_and_the_first_key_wins() {
        let mut m = Machine::new(P);
        m.step(Input::Connected);
        let step = m.step(Input::Listed {
            revision: 3,
            kvs: vec![
                kv("/svc/k/b", r#"{"address":"10.0.0.1:80","weight":9}"#),
                kv("/svc/k/a", "10.0.0.1:80"),
            ],
        });
        let snap = step.send.unwrap();
        assert_eq!((snap.endpoints.len(), snap.skipped.total), (1, 1));
        assert_eq!(
            snap.skipped.listed[0].reason,
            "its address 10.0.0.1:80 is already given by /svc/k/a"
        );
        assert_eq!(snap.endpoints[0].origin, "/svc/k/a");
        assert_eq!(
            step.duplicates,
            [("/svc/k/b".to_owned(), "/svc/k/a".to_owned())]
        );
    }

    #[test]
    fn a_compacted_watch_relists_without_backoff_or_report() {
        let mut m = watching(vec![kv("/svc/k/a", "10.0.0.1:80")]);
        let step = m.step(Input::Watched(WatchMsg {
            canceled: true,
            compact_revision: 57,
            revision: 60,
            ..WatchMsg::default()
        }));
        assert_eq!(step.resync, Some(57));
        assert_eq!(
            (step.send, step.report),
            (None, None),
            "the last snapshot stands"
        );
        assert_eq!(m.phase(), Phase::List);
        // The list at the new revision replaces the entries: a deleted key goes away.
        let step = m.step(Input::Listed {
            revision: 60,
            kvs: vec![kv("/svc/k/c", "10.0.0.3:80")],
        });
        assert_eq!(addrs(&step.send.unwrap()), ["10.0.0.3:80"]);
        assert_eq!(m.phase(), Phase::Watch { start_revision: 61 });
    }

    #[test]
    fn a_compacted_creation_ack_relists_too() {
        let mut m = watching(vec![]);
        let step = m.step(Input::Watched(WatchMsg {
            created: true,
            canceled: true,
            compact_revision: 5,
            ..WatchMsg::default()
        }));
        assert_eq!(step.resync, Some(5));
        assert_eq!(m.phase(), Phase::List);
    }

    #[test]
    fn a_canceled_watch_is_a_failure_with_the_reason() {
        let mut m = watching(vec![]);
        let step = m.step(Input::Watched(WatchMsg {
            canceled: true,
            cancel_reason: "permission denied".into(),
            ..WatchMsg::default()
        }));
        assert!(step.report.unwrap().contains("permission denied"));
        assert_eq!(m.phase(), Phase::Backoff { attempt: 0 });
    }

    #[test]
    fn a_failure_is_reported_once_per_outage_and_keeps_the_entries() {
        let mut m = watching(vec![kv("/svc/k/a", "10.0.0.1:80")]);
        let step = m.step(Input::Failed("connection reset".into()));
        assert_eq!(step.report.as_deref(), Some("connection reset"));
        assert_eq!(step.send, None, "never an empty snapshot on error");
        assert_eq!(m.phase(), Phase::Backoff { attempt: 0 });
        m.step(Input::BackoffElapsed);
        assert_eq!(m.phase(), Phase::Connect);
        m.step(Input::Connected);
        let step = m.step(Input::Failed("connection refused".into()));
        assert_eq!(
            (step.report, step.retry_failed.as_deref()),
            (None, Some("connection refused"))
        );
        assert_eq!(m.phase(), Phase::Backoff { attempt: 1 });
        m.step(Input::BackoffElapsed);
        let step = m.step(Input::Failed("connect timed out".into()));
        assert_eq!(m.phase(), Phase::Backoff { attempt: 2 });
        assert!(step.report.is_none());
        m.step(Input::BackoffElapsed);
        m.step(Input::Connected);
        let step = m.step(Input::Listed {
            revision: 20,
            kvs: vec![kv("/svc/k/a", "10.0.0.1:80")],
        });
        assert_eq!(step.recovered_after, Some(3));
        assert_eq!(
            addrs(&step.send.unwrap()),
            ["10.0.0.1:80"],
            "resent, to clear the stale mark"
        );
        // The next outage is reported again, with backoff from the start.
        assert!(m.step(Input::Failed("again".into())).report.is_some());
        assert_eq!(m.phase(), Phase::Backoff { attempt: 0 });
    }

    #[test]
    fn a_refusal_is_not_repeated_by_a_relist_of_the_same_value() {
        let mut m = watching(vec![kv("/svc/k/bad", "x y")]);
        m.step(Input::Failed("gone".into()));
        m.step(Input::BackoffElapsed);
        m.step(Input::Connected);
        let step = m.step(Input::Listed {
            revision: 30,
            kvs: vec![kv("/svc/k/bad", "x y"), kv("/svc/k/worse", "{")],
        });
        let keys: Vec<&str> = step.refused.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["/svc/k/worse"]);
        assert_eq!(step.send.unwrap().skipped.total, 2);
        assert_eq!(step.newly_skipped, 1, "only /svc/k/worse is new");
    }

    #[test]
    fn a_non_utf8_key_is_skipped() {
        let mut m = Machine::new(P);
        m.step(Input::Connected);
        let step = m.step(Input::Listed {
            revision: 1,
            kvs: vec![(b"/svc/k/\xff".to_vec(), b"10.0.0.1:80".to_vec())],
        });
        assert_eq!(step.send.unwrap().skipped.total, 1);
        assert_eq!(step.refused[0].1, EntryError::KeyNotUtf8);
    }

    #[test]
    fn a_bad_key_replaced_by_another_bad_key_is_sent_and_counted() {
        let many: Vec<_> = (0..25)
            .map(|i| kv(&format!("/svc/k/{i:02}"), "x y"))
            .collect();
        let mut m = watching(many);
        // Key 24 (beyond the listed 20) is replaced by key 30: same total, same list.
        let step = m.step(events(
            11,
            vec![del("/svc/k/24"), put("/svc/k/30", "still bad")],
        ));
        let snap = step.send.expect("sent: a new bad key");
        assert_eq!((snap.skipped.total, step.newly_skipped), (25, 1));
        // Rewriting a bad key with another bad value is the same entry: nothing new, no send.
        let step = m.step(events(12, vec![put("/svc/k/30", "bad again")]));
        assert_eq!((step.send, step.newly_skipped), (None, 0));
    }

    #[test]
    fn inputs_for_another_phase_are_ignored() {
        let mut m = Machine::new(P);
        assert_eq!(
            m.step(events(3, vec![put("/svc/k/a", "10.0.0.1:80")])),
            Step::default()
        );
        assert_eq!(
            m.step(Input::Listed {
                revision: 3,
                kvs: vec![]
            }),
            Step::default()
        );
        assert_eq!(m.step(Input::BackoffElapsed), Step::default());
        assert_eq!(m.phase(), Phase::Connect);
    }
}
