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
use upstreamd::logging::EscapedFields;
use upstreamd::metrics::Metrics;
use upstreamd::nginx::{self, SystemNginx};
use upstreamd::notify::Notifier;
use upstreamd::render::Renderer;

/// What `--help` adds after the commands.
const AFTER_HELP: &str = "\
Exit codes:
  0  ok
  1  runtime failure (once: could not gather or apply in time)
  2  usage or config error (check lists every problem)

Signals (run):
  SIGHUP           re-read the config; a broken one is refused and the running one kept
  SIGTERM, SIGINT  stop within 5 s, leaving the include file as it is
  SIGUSR1, SIGUSR2 ignored (logged)

Environment:
  RUST_LOG           log filter, e.g. RUST_LOG=upstreamd=debug (default: info)
  CONSUL_HTTP_ADDR   default Consul url; CONSUL_HTTP_TOKEN: default Consul token
  NOTIFY_SOCKET      set by systemd (Type=notify): readiness, status and watchdog";

/// The config file every example uses.
const DEFAULT_CONFIG: &str = "/etc/upstreamd/upstreamd.toml";

/// Keeps an nginx upstream include file true to Consul, etcd or a static list.
#[derive(Parser)]
#[command(version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Log as text (default) or one JSON object per line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// One full cycle: gather, probe once, render, apply; then exit.
    Once {
        /// The config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print the file instead of writing it; touch nothing.
        #[arg(long)]
        dry_run: bool,
        /// Write the file atomically and run the test command, but do not signal nginx
        /// (for the first include, before nginx runs a site that uses it).
        #[arg(long, conflicts_with = "dry_run")]
        no_reload: bool,
        /// Log as text (default) or one JSON object per line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate the config file, its template and its paths, reporting every problem at once.
    Check {
        /// The config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
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
/// How long `once` waits for sources and first probes; then it names what it waited for and
/// exits 1.
const ONCE_DEADLINE: Duration = Duration::from_secs(30);

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.fmt_fields(EscapedFields).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// A valid config, with what its preflight on this machine found.
struct Loaded {
    cfg: Config,
    renderer: Renderer,
    preflight: config::Preflight,
}

/// Loads and fully validates a config: the file and its template (compiled and tried on
/// representative data); then checks its paths on this machine. `check` treats the
/// preflight's errors as errors; `run` and `once` log them and go on (the daemon retries a
/// failed write, and a directory may appear later).
fn load(path: &Path) -> Result<Loaded, String> {
    let cfg = config::load_file(path).map_err(|e| e.to_string())?;
    let mut problems = upstreamd::sources::check(&cfg);
    let renderer = Renderer::checked(cfg.nginx.template.as_deref());
    if let Err(e) = &renderer {
        problems.push(format!("nginx.template: {e}"));
    }
    let preflight = config::preflight(&cfg, std::env::var("PATH").ok().as_deref());
    match renderer {
        Ok(renderer) if problems.is_empty() => Ok(Loaded {
            cfg,
            renderer,
            preflight,
        }),
        _ => Err(problems.join("\n")),
    }
}

fn load_or_exit(path: &Path) -> Result<Loaded, ExitCode> {
    load(path).map_err(|errors| {
        eprintln!("{}: invalid config:\n{errors}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `N upstream` or `N upstreams`.
fn upstreams(n: usize) -> String {
    format!("{n} upstream{}", if n == 1 { "" } else { "s" })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => match load_or_exit(&config) {
            Ok(loaded) if !loaded.preflight.errors.is_empty() => {
                eprintln!(
                    "{}: invalid config:\n{}",
                    config.display(),
                    loaded.preflight.errors.join("\n")
                );
                for warning in &loaded.preflight.warnings {
                    eprintln!("{}: warning: {warning}", config.display());
                }
                Ok(ExitCode::from(EXIT_CONFIG))
            }
            Ok(loaded) => {
                for warning in &loaded.preflight.warnings {
                    eprintln!("{}: warning: {warning}", config.display());
                }
                println!(
                    "{}: ok ({})",
                    config.display(),
                    upstreams(loaded.cfg.upstreams.len())
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        },
        Command::Once {
            config,
            dry_run,
            no_reload,
            log_format,
        } => {
            init_logging(log_format);
            match load_or_exit(&config) {
                Ok(loaded) => {
                    log_preflight(&config, &loaded.preflight);
                    once(loaded.cfg, loaded.renderer, dry_run, no_reload).await
                }
                Err(code) => Ok(code),
            }
        }
        Command::Run { config, log_format } => {
            init_logging(log_format);
            match load_or_exit(&config) {
                Ok(loaded) => {
                    log_preflight(&config, &loaded.preflight);
                    run(config, loaded.cfg, loaded.renderer).await
                }
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

fn log_preflight(path: &Path, preflight: &config::Preflight) {
    for problem in preflight.errors.iter().chain(&preflight.warnings) {
        tracing::warn!(config = %path.display(), %problem,
            "The config may not work on this machine (`upstreamd check` reports this too).");
    }
}

/// Raises the soft open-file limit to the hard one (as nginx's `worker_rlimit_nofile` would),
/// and returns the limit in force, so the admin server can leave the daemon its reserve.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(%error, soft, hard, "Could not raise the open-file limit.");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "Could not read the open-file limit; assuming 1024.");
            1024
        }
    }
}

/// With `apply = "lua"`: creates `lua_secret_file` when it is missing (nginx reads it when it
/// loads the include, so it must exist before the first `nginx -t`).
fn ensure_lua_secret(cfg: &Config) -> anyhow::Result<()> {
    if cfg.nginx.apply != config::ApplyMode::Lua {
        return Ok(());
    }
    let path = &cfg.nginx.lua.secret_file;
    if nginx::lua::ensure_secret(path)? {
        tracing::info!(path = %path.display(), "Created the secret nginx's Lua update server checks.");
    }
    Ok(())
}

async fn once(
    cfg: Config,
    renderer: Renderer,
    dry_run: bool,
    no_reload: bool,
) -> anyhow::Result<ExitCode> {
    if !dry_run {
        ensure_lua_secret(&cfg)?;
    }
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
                no_reload,
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
    ensure_lua_secret(&cfg)?;
    let nofile = raise_nofile_limit();
    let shutdown = CancellationToken::new();
    let (reload_tx, reloads) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("failed to listen for SIGHUP")?;
    // Listening replaces the default action (terminate), so a stray SIGUSR1/2 is only logged.
    let mut usr1 = signal(SignalKind::user_defined1()).context("failed to listen for SIGUSR1")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("failed to listen for SIGUSR2")?;
    let stop = shutdown.clone();
    let notifier = Notifier::from_env();
    let hup_notifier = notifier.clone();
    let nginx = SystemNginx::new(&cfg.nginx);
    let metrics = Arc::new(Metrics::new());
    let admin = cfg.admin.clone();
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
                _ = usr1.recv() => tracing::info!(signal = "SIGUSR1", "Ignoring the signal: it has no meaning for upstreamd (SIGHUP re-reads the config)."),
                _ = usr2.recv() => tracing::info!(signal = "SIGUSR2", "Ignoring the signal: it has no meaning for upstreamd (SIGHUP re-reads the config)."),
                _ = hup.recv() => {
                    if let Err(error) = hup_notifier.reloading() {
                        tracing::warn!(%error, "Could not notify systemd of the reload.");
                    }
                    match load(&path) {
                        Ok(loaded) => {
                            log_preflight(&path, &loaded.preflight);
                            feedback.follow(loaded.cfg.nginx.error_log.as_deref());
                            if reload_tx.send(loaded.cfg).await.is_err() {
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
    if let Some(addr) = admin.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on admin address {addr}"))?;
        let limits = upstreamd::admin::Limits {
            max_connections: upstreamd::admin::connection_cap(admin.max_connections, nofile),
            header_read_timeout: admin.header_read_timeout,
        };
        if limits.max_connections < admin.max_connections {
            tracing::warn!(configured = admin.max_connections, allowed = limits.max_connections, nofile,
                "The open-file limit is low: fewer admin connections are allowed, so the daemon keeps its reserve.");
        }
        tracing::info!(%addr, max_connections = limits.max_connections,
            header_read_timeout = %humantime::format_duration(limits.header_read_timeout),
            "Admin server listening.");
        let (handle, stop) = (controller.handle(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) =
                upstreamd::admin::serve(listener, handle, metrics, stop, limits).await
            {
                tracing::error!(%error, "Admin server failed.");
            }
        });
    }
    controller.run(Mode::Run, reloads).await?;
    Ok(ExitCode::SUCCESS)
}
