//! A stand-in Kotaemon replica (Gradio 4.39 on the wire) for tests, the demo and benchmarks.
//!
//! It serves what upstreamd and nginx see of real Kotaemon: `/queue/status`
//! as the readiness probe, `404 {"detail":"Not Found"}` on `/health`, queue
//! join + SSE data streams bound to per-replica session state, never-ending
//! `/heartbeat/*` streams, and a startup delay before the port opens. Failure
//! switches (`healthy`, `error`, `hang`, `slow:<ms>`, `sick:<ms>`, `exit`) are flipped with
//! `POST /_standin/mode` or by writing the word to `--control-file`; in `hang`
//! mode the control route hangs too, so only the control file brings the
//! replica back.
//!
//! Modules: `mode` (switches and the control file) → `chat` (session table,
//! Gradio messages, the fake answer) → `http` (routes).

#[path = "kotaemon_standin/chat.rs"]
mod chat;
#[path = "kotaemon_standin/http.rs"]
mod http;
#[path = "kotaemon_standin/mode.rs"]
mod mode;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::chat::{Chats, Script};
use crate::http::AppState;
use crate::mode::ModeSwitch;

/// Exit status when the replica cannot start (bad address, port taken).
const STARTUP_FAILURE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A stand-in Kotaemon (Gradio 4.39) replica for tests and demos."
)]
struct Cli {
    /// Address to listen on, `host:port`. Default: `$GRADIO_SERVER_NAME:$GRADIO_SERVER_PORT`,
    /// each falling back to Gradio's `127.0.0.1` and `7860`.
    #[arg(long)]
    listen: Option<String>,

    /// Replica name, used in answers, `GET /` and logs. Default: `$REPLICA_NAME`,
    /// then `$HOSTNAME`, then `kotaemon-standin`.
    #[arg(long)]
    name: Option<String>,

    /// Wait this long before opening the port, like Kotaemon building its UI.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    startup_delay: Duration,

    /// Period of `data: ALIVE` on `/heartbeat/*` and of heartbeat messages on idle
    /// `/queue/data` streams.
    #[arg(long, value_parser = parse_period, default_value = "15s")]
    heartbeat_interval: Duration,

    /// Delay before each streamed token.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    token_delay: Duration,

    /// Tokens per answer.
    #[arg(long, default_value_t = 20)]
    tokens: u32,

    /// File polled every 100 ms for a mode word; applied when it changes.
    #[arg(long)]
    control_file: Option<PathBuf>,
}

fn parse_period(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(period) if period.is_zero() => Err("must be longer than zero".to_owned()),
        Ok(period) => Ok(period),
        Err(error) => Err(error.to_string()),
    }
}

/// `--listen`, else Gradio's environment variables, else Gradio's default.
fn listen_address(listen: Option<String>, env: impl Fn(&str) -> Option<String>) -> String {
    if let Some(listen) = listen {
        return listen;
    }
    let host = env("GRADIO_SERVER_NAME").unwrap_or_else(|| "127.0.0.1".to_owned());
    let port = env("GRADIO_SERVER_PORT").unwrap_or_else(|| "7860".to_owned());
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn replica_name(name: Option<String>, env: impl Fn(&str) -> Option<String>) -> String {
    name.or_else(|| env("REPLICA_NAME"))
        .or_else(|| env("HOSTNAME"))
        .unwrap_or_else(|| "kotaemon-standin".to_owned())
}

/// Environment lookup where an empty value counts as unset.
fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|value| !value.is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listen = listen_address(cli.listen, env_var);
    let replica: Arc<str> = replica_name(cli.name, env_var).into();
    let mode = ModeSwitch::new(Arc::clone(&replica));
    if let Some(path) = cli.control_file {
        // Before the startup delay, so `exit` and `hang` work while starting.
        tokio::spawn(mode::watch_control_file(path, mode.clone()));
    }
    let state = Arc::new(AppState {
        replica: Arc::clone(&replica),
        mode,
        chats: Chats::new(Script {
            replica: Arc::clone(&replica),
            tokens: cli.tokens,
            token_delay: cli.token_delay,
        }),
        heartbeat: cli.heartbeat_interval,
    });

    tokio::select! {
        result = serve(&listen, cli.startup_delay, state) => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(replica = %replica, %error, "Stopped.");
                ExitCode::from(STARTUP_FAILURE)
            }
        },
        signal = shutdown_signal() => {
            // Open SSE streams never end on their own, so no graceful drain:
            // returning drops every connection at once.
            tracing::info!(replica = %replica, signal, "Shutting down.");
            ExitCode::SUCCESS
        }
    }
}

async fn serve(listen: &str, startup_delay: Duration, state: Arc<AppState>) -> Result<(), String> {
    if !startup_delay.is_zero() {
        tracing::info!(replica = %state.replica, delay = ?startup_delay, "Starting up; the port opens after the delay.");
        tokio::time::sleep(startup_delay).await;
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("failed to bind `{listen}`: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("failed to read the address bound for `{listen}`: {e}"))?;
    tracing::info!(replica = %state.replica, address = %local, "Listening.");
    axum::serve(listener, http::router(state))
        .await
        .map_err(|e| format!("failed to serve on `{local}`: {e}"))
}

/// Resolves with the signal's name on SIGTERM or SIGINT.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "Failed to install signal handlers; only the default actions apply.");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn listen_flag_wins_over_gradio_environment() {
        let vars = [("GRADIO_SERVER_NAME", "0.0.0.0")];
        assert_eq!(
            listen_address(Some("127.0.0.2:9000".into()), env(&vars)),
            "127.0.0.2:9000"
        );
    }

    #[test]
    fn listen_defaults_like_gradio_and_brackets_ipv6() {
        assert_eq!(listen_address(None, env(&[])), "127.0.0.1:7860");
        let vars = [("GRADIO_SERVER_NAME", "0.0.0.0")];
        assert_eq!(listen_address(None, env(&vars)), "0.0.0.0:7860");
        let vars = [("GRADIO_SERVER_NAME", "::"), ("GRADIO_SERVER_PORT", "7861")];
        assert_eq!(listen_address(None, env(&vars)), "[::]:7861");
    }

    #[test]
    fn name_falls_back_to_replica_name_then_hostname() {
        let vars = [("REPLICA_NAME", "replica-b"), ("HOSTNAME", "box")];
        assert_eq!(replica_name(Some("a".into()), env(&vars)), "a");
        assert_eq!(replica_name(None, env(&vars)), "replica-b");
        assert_eq!(replica_name(None, env(&vars[1..])), "box");
        assert_eq!(replica_name(None, env(&[])), "kotaemon-standin");
    }

    #[test]
    fn heartbeat_period_must_be_positive() {
        assert!(parse_period("0s").is_err());
        assert_eq!(parse_period("250ms"), Ok(Duration::from_millis(250)));
    }
}
