//! A fake nginx for lua mode (tests only): the update server, its workers, and a reload that
//! makes new workers read `snapshot.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use nix::unistd::Pid;

use super::{LuaEndpoint, LuaStatus, PushError, SNAPSHOT};
use crate::nginx::{Nginx, NginxError, ReloadProof};

/// What the fake nginx holds and how it answers.
#[derive(Debug, Default)]
pub(crate) struct World {
    pub(crate) generation: u64,
    pub(crate) source: String,
    pub(crate) master: i32,
    /// Worker pid → generation loaded.
    pub(crate) workers: BTreeMap<i32, u64>,
    /// Status reads before the workers pick up a pushed generation.
    pub(crate) lag: u32,
    pub(crate) pending: Option<(u64, u32)>,
    /// Every push is refused with this status.
    pub(crate) refuse: Option<u16>,
    pub(crate) pushes: Vec<u64>,
    /// The body of the last push.
    pub(crate) last_body: String,
    pub(crate) reloads: u32,
    /// The snapshot's directory, read by a fake reload.
    pub(crate) dir: PathBuf,
}

#[derive(Clone)]
pub(crate) struct Fake(pub(crate) Arc<Mutex<World>>);

impl Fake {
    /// Two workers of master 100, holding nothing.
    pub(crate) fn new(dir: &std::path::Path) -> Self {
        Fake(Arc::new(Mutex::new(World {
            source: "none".into(),
            master: 100,
            workers: BTreeMap::from([(101, 0), (102, 0)]),
            dir: dir.to_owned(),
            ..World::default()
        })))
    }
    /// Reads or changes the world.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }
}

impl LuaEndpoint for Fake {
    fn update(&self, body: String) -> BoxFuture<'_, Result<u64, PushError>> {
        Box::pin(async move {
            let g = serde_json::from_str::<serde_json::Value>(&body).unwrap()["generation"]
                .as_u64()
                .unwrap();
            self.with(|w| {
                w.pushes.push(g);
                w.last_body = body.clone();
                if let Some(status) = w.refuse {
                    return Err(PushError::Rejected {
                        status,
                        error: "bad secret".into(),
                    });
                }
                if g <= w.generation {
                    return Err(PushError::Stale {
                        generation: w.generation,
                    });
                }
                w.generation = g;
                w.source = "push".into();
                w.pending = Some((g, w.lag));
                Ok(g)
            })
        })
    }

    fn status(&self) -> BoxFuture<'_, Result<LuaStatus, PushError>> {
        Box::pin(async move {
            self.with(|w| {
                if let Some(status) = w.refuse {
                    return Err(PushError::Rejected {
                        status,
                        error: "bad secret".into(),
                    });
                }
                if let Some((g, lag)) = w.pending {
                    if lag == 0 {
                        w.workers.values_mut().for_each(|x| *x = g);
                        w.pending = None;
                    } else {
                        w.pending = Some((g, lag - 1));
                    }
                }
                Ok(LuaStatus {
                    generation: w.generation,
                    source: w.source.clone(),
                    master_pid: w.master,
                    workers: w.workers.iter().map(|(p, g)| (p.to_string(), *g)).collect(),
                })
            })
        })
    }

    fn workers(&self, master: i32) -> Result<BTreeSet<i32>, PushError> {
        self.with(|w| {
            Ok(if master == w.master {
                w.workers.keys().copied().collect()
            } else {
                BTreeSet::new()
            })
        })
    }
}

impl Nginx for Fake {
    async fn test(&self) -> Result<(), NginxError> {
        Ok(())
    }

    /// New workers that read snapshot.json.
    async fn reload(&self) -> Result<ReloadProof, NginxError> {
        let dir = self.with(|w| w.dir.clone());
        let snapshot = std::fs::read_to_string(dir.join(SNAPSHOT)).unwrap();
        let g = serde_json::from_str::<serde_json::Value>(&snapshot).unwrap()["generation"]
            .as_u64()
            .unwrap();
        self.with(|w| {
            w.reloads += 1;
            let old: BTreeSet<i32> = w.workers.keys().copied().collect();
            let base = old.last().copied().unwrap_or(w.master) + 10;
            if g > w.generation {
                w.generation = g;
                w.source = "snapshot".into();
            }
            w.workers = BTreeMap::from([(base, w.generation), (base + 1, w.generation)]);
            Ok(ReloadProof {
                master: Pid::from_raw(w.master),
                old_workers: old,
                new_workers: w.workers.keys().copied().collect(),
            })
        })
    }
}
