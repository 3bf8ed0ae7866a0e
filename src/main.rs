//! The `upstreamd` command: parses arguments, loads the config, wires the parts, maps exit codes.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use upstreamd::config::{self, Config};
use upstreamd::controller::{Controller, Mode, Outcome};
use upstreamd::feedback::Feedback;
use upstreamd::metrics::Metrics;
use upstreamd::nginx::{self, SystemNginx};
use upstreamd::notify::Notifier;
use upstreamd::render::Renderer;

/// Keeps an nginx upstream include file true to Consul, etcd or a static list.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Log as text (default) or one JSON object per line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// One full cycle: gather, probe once, render, apply; then exit.
    Once {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print the file instead of writing it; touch nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the config file, reporting every problem at once.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Exit code for usage and config errors.
const EXIT_CONFIG: u8 = 2;
/// How long `once` waits for sources and first probes.
const ONCE_DEADLINE: Duration = Duration::from_secs(30);

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Loads and fully validates a config: the file and its template.
fn load(path: &Path) -> Result<(Config, Renderer), String> {
    let cfg = config::load_file(path).map_err(|e| e.to_string())?;
    let mut problems = upstreamd::sources::check(&cfg);
    let renderer = Renderer::new(cfg.nginx.template.as_deref());
    if let Err(e) = &renderer {
        problems.push(format!("nginx.template: {e}"));
    }
    match renderer {
        Ok(renderer) if problems.is_empty() => Ok((cfg, renderer)),
        _ => Err(problems.join("\n")),
    }
}

fn load_or_exit(path: &Path) -> Result<(Config, Renderer), ExitCode> {
    load(path).map_err(|errors| {
        eprintln!("{}: invalid config:\n{errors}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => match load_or_exit(&config) {
            Ok((cfg, _)) => {
                println!(
                    "{}: ok ({} upstreams)",
                    config.display(),
                    cfg.upstreams.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        },
        Command::Once { config, dry_run } => {
            init_logging(LogFormat::Text);
            match load_or_exit(&config) {
                Ok((cfg, renderer)) => once(cfg, renderer, dry_run).await,
                Err(code) => Ok(code),
            }
        }
        Command::Run { config, log_format } => {
            init_logging(log_format);
            match load_or_exit(&config) {
                Ok((cfg, renderer)) => run(config, cfg, renderer).await,
                Err(code) => Ok(code),
            }
        }
    };
    let code = result.unwrap_or_else(|e| {
        eprintln!("upstreamd: {e:#}");
        ExitCode::FAILURE
    });
    // Leave at once: background tasks (probes, blocking DNS lookups) must not hold the exit.
    std::process::exit(if code == ExitCode::SUCCESS {
        0
    } else if code == ExitCode::from(EXIT_CONFIG) {
        2
    } else {
        1
    });
}

async fn once(cfg: Config, renderer: Renderer, dry_run: bool) -> anyhow::Result<ExitCode> {
    let nginx = SystemNginx::new(&cfg.nginx);
    let controller = Controller::new(
        cfg,
        renderer,
        nginx,
        Arc::new(Metrics::new()),
        CancellationToken::new(),
    );
    let (_keep, reloads) = mpsc::channel(1);
    match controller
        .run(
            Mode::Once {
                dry_run,
                deadline: ONCE_DEADLINE,
            },
            reloads,
        )
        .await?
    {
        Outcome::Rendered(text) => print!("{text}"),
        Outcome::Applied | Outcome::Stopped => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(path: PathBuf, cfg: Config, renderer: Renderer) -> anyhow::Result<ExitCode> {
    match nginx::clean_temp_files(&cfg.nginx.output) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "Removed temp files left by an earlier run."),
        Err(error) => tracing::warn!(%error, "Could not clean leftover temp files."),
    }
    let shutdown = CancellationToken::new();
    let (reload_tx, reloads) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("failed to listen for SIGHUP")?;
    let stop = shutdown.clone();
    let notifier = Notifier::from_env();
    let hup_notifier = notifier.clone();
    let nginx = SystemNginx::new(&cfg.nginx);
    let metrics = Arc::new(Metrics::new());
    let admin = cfg.admin.listen;
    let error_log = cfg.nginx.error_log.clone();
    let controller = Controller::new(cfg, renderer, nginx, Arc::clone(&metrics), shutdown.clone())
        .with_notifier(notifier);
    let mut feedback = Feedback::new(
        controller.probe_trigger(),
        Arc::clone(&metrics),
        shutdown.clone(),
    );
    feedback.follow(error_log.as_deref());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    if let Err(error) = hup_notifier.reloading() {
                        tracing::warn!(%error, "Could not notify systemd of the reload.");
                    }
                    match load(&path) {
                        Ok((cfg, _)) => {
                            feedback.follow(cfg.nginx.error_log.as_deref());
                            if reload_tx.send(cfg).await.is_err() {
                                break;
                            }
                        }
                        Err(errors) => {
                            tracing::error!(config = %path.display(), %errors,
                                "Refusing the new config; keeping the running one.");
                            if let Err(error) = hup_notifier.ready() {
                                tracing::warn!(%error, "Could not notify systemd.");
                            }
                        }
                    }
                }
            }
        }
        tracing::info!("Stopping; the upstream file is left as it is.");
        stop.cancel();
    });
    if let Some(addr) = admin {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on admin address {addr}"))?;
        tracing::info!(%addr, "Admin server listening.");
        let (handle, stop) = (controller.handle(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = upstreamd::admin::serve(listener, handle, metrics, stop).await {
                tracing::error!(%error, "Admin server failed.");
            }
        });
    }
    controller.run(Mode::Run, reloads).await?;
    Ok(ExitCode::SUCCESS)
}
