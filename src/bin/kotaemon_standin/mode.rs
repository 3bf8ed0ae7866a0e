//! Failure switches: the mode word, the shared switch, and the control-file poller.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// How often the control file is re-read.
pub const CONTROL_FILE_POLL: Duration = Duration::from_millis(100);

/// What the replica pretends to be doing. Parsed from the words accepted by
/// `POST /_standin/mode` and by the control file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `healthy`: answer everything normally.
    Healthy,
    /// `error`: `GET /queue/status` answers 503; everything else is normal.
    Error,
    /// `hang`: every new request is accepted and never answered (including
    /// the control route, so only the control file ends this mode); streams
    /// already open keep going. Requests swallowed here stay unanswered after
    /// the mode changes, until their client gives up.
    Hang,
    /// `slow:<ms>`: `GET /queue/status` answers correctly after this delay.
    Slow(Duration),
    /// `sick:<ms>`: `GET /queue/status` answers 503 at once, while every other request
    /// (but the control route) is still answered correctly, after this delay: a replica
    /// whose health check reports trouble while it keeps serving, slowly.
    Sick(Duration),
    /// `exit`: the process exits with status 1 at once, without answering.
    Exit,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        let word = word.trim();
        match word {
            "healthy" => Ok(Mode::Healthy),
            "error" => Ok(Mode::Error),
            "hang" => Ok(Mode::Hang),
            "exit" => Ok(Mode::Exit),
            _ => {
                if let Some(ms) = word.strip_prefix("slow:") {
                    millis(word, "slow", ms).map(Mode::Slow)
                } else if let Some(ms) = word.strip_prefix("sick:") {
                    millis(word, "sick", ms).map(Mode::Sick)
                } else {
                    Err(format!(
                        "unknown mode `{word}`; expected healthy, error, hang, slow:<ms>, sick:<ms> or exit"
                    ))
                }
            }
        }
    }
}

/// The `<ms>` of `slow:<ms>` and `sick:<ms>`.
fn millis(word: &str, mode: &str, ms: &str) -> Result<Duration, String> {
    ms.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("`{word}`: {mode} takes whole milliseconds, e.g. {mode}:1500"))
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Healthy => f.write_str("healthy"),
            Mode::Error => f.write_str("error"),
            Mode::Hang => f.write_str("hang"),
            Mode::Slow(delay) => write!(f, "slow:{}", delay.as_millis()),
            Mode::Sick(delay) => write!(f, "sick:{}", delay.as_millis()),
            Mode::Exit => f.write_str("exit"),
        }
    }
}

/// The replica's current mode, shared by the HTTP handlers and the control
/// file poller. Setting [`Mode::Exit`] ends the process.
#[derive(Clone)]
pub struct ModeSwitch {
    replica: Arc<str>,
    current: Arc<Mutex<Mode>>,
}

impl ModeSwitch {
    pub fn new(replica: Arc<str>) -> Self {
        ModeSwitch {
            replica,
            current: Arc::new(Mutex::new(Mode::Healthy)),
        }
    }

    pub fn get(&self) -> Mode {
        // A poisoned lock still holds a valid `Mode` (it is `Copy`, written whole).
        *self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Switches to `mode`; `source` names who asked, for the log line.
    pub fn set(&self, mode: Mode, source: &str) {
        if mode == Mode::Exit {
            tracing::warn!(replica = %self.replica, source, "Exiting abruptly with status 1 as asked.");
            std::process::exit(1);
        }
        let previous = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(PoisonError::into_inner),
            mode,
        );
        tracing::info!(replica = %self.replica, source, %previous, %mode, "Mode switched.");
    }
}

/// What the poller last saw in the control file; a change of either part
/// (including rewriting the same word) re-applies the word.
#[derive(PartialEq, Eq)]
struct Seen {
    modified: Option<SystemTime>,
    text: String,
}

/// Polls `path` every [`CONTROL_FILE_POLL`] and applies its word whenever the
/// file's content or modification time changes. A missing or empty file means
/// "no instruction". Runs until the process ends; it works before the port
/// opens and while the replica hangs, which is why tests flip modes with it.
pub async fn watch_control_file(path: PathBuf, switch: ModeSwitch) {
    let mut last: Option<Seen> = None;
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(CONTROL_FILE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let seen = match read_control_file(&path).await {
            Ok(Some(seen)) => seen,
            Ok(None) => continue,
            Err(error) => {
                if last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(path = %path.display(), %error, "Failed to read the control file.");
                    last_error = Some(error);
                }
                continue;
            }
        };
        last_error = None;
        if last.as_ref() == Some(&seen) {
            continue;
        }
        let word = seen.text.trim().to_owned();
        last = Some(seen);
        if word.is_empty() {
            continue;
        }
        match word.parse::<Mode>() {
            Ok(mode) => switch.set(mode, "control file"),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "Ignored the control file.")
            }
        }
    }
}

/// `Ok(None)` when the file does not exist.
async fn read_control_file(path: &PathBuf) -> Result<Option<Seen>, String> {
    let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let modified = match tokio::fs::metadata(path).await {
        // Some filesystems have no mtime; content changes still count.
        Ok(meta) => meta.modified().ok(),
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(format!("failed to stat `{}`: {e}", path.display())),
    };
    match tokio::fs::read_to_string(path).await {
        Ok(text) => Ok(Some(Seen { modified, text })),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(format!("failed to read `{}`: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_word() {
        assert_eq!("healthy".parse(), Ok(Mode::Healthy));
        assert_eq!("error\n".parse(), Ok(Mode::Error));
        assert_eq!(" hang ".parse(), Ok(Mode::Hang));
        assert_eq!("exit".parse(), Ok(Mode::Exit));
        assert_eq!(
            "slow:1500".parse(),
            Ok(Mode::Slow(Duration::from_millis(1500)))
        );
        assert_eq!(
            "sick:800".parse(),
            Ok(Mode::Sick(Duration::from_millis(800)))
        );
    }

    #[test]
    fn rejects_unknown_words_and_bad_delays() {
        assert!("sick".parse::<Mode>().is_err());
        assert!("slow:".parse::<Mode>().is_err());
        assert!("slow:1.5s".parse::<Mode>().is_err());
        assert!("sick:".parse::<Mode>().is_err());
        assert!("sick:fast".parse::<Mode>().is_err());
        assert!("".parse::<Mode>().is_err());
    }

    #[test]
    fn display_round_trips_through_parse() {
        for mode in [
            Mode::Healthy,
            Mode::Error,
            Mode::Hang,
            Mode::Slow(Duration::from_millis(250)),
            Mode::Sick(Duration::from_millis(800)),
            Mode::Exit,
        ] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
    }
}
