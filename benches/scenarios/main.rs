//! The scenario benchmark: starts real nginx, stand-in Kotaemon replicas, a real etcd, the
//! Consul stand-in and release builds of upstreamd on loopback; runs bounded scenarios under
//! steady client load, each beside its peers (nginx alone, a naive reload loop); and writes
//! `BENCHMARKS.md` and `results.json`.
//!
//! Run with `bash scripts/bench.sh [--quick]`, or
//! `cargo bench --bench scenarios -- [--quick] [--out DIR] [--only fail,discovery,…] [--keep] [--lua]`
//! (`--lua`: the `modes` scenario also runs upstreamd with `apply = "lua"`).
//! Exits non-zero only when the harness itself breaks, never for a missed target. Under
//! `cargo test` (no `--bench` argument) it does nothing.
//!
//! Modules: `env` (plan, configs, stacks) → `procs` (children) → `client` (HTTP, load, chats)
//! → `haproxy` (the peer in nginx's place) → the scenarios `fail`, `discovery`, `churn`,
//! `streams`, `scale`, `affinity`, `modes` (+ `render_timing`) → `stats` → `report`.

mod affinity;
mod churn;
mod client;
mod discovery;
mod env;
mod fail;
mod haproxy;
mod modes;
mod probe_cost;
mod procs;
mod render_timing;
mod report;
mod scale;
mod stats;
mod streams;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::env::{Env, Peer, Plan};
use crate::fail::Event;
use crate::procs::Bins;
use crate::report::{Machine, Results};

const SCENARIOS: [&str; 8] = [
    "render",
    "fail",
    "discovery",
    "churn",
    "streams",
    "scale",
    "affinity",
    "modes",
];

struct Opts {
    quick: bool,
    out: PathBuf,
    markdown: PathBuf,
    json: PathBuf,
    only: Vec<String>,
    keep: bool,
    /// `modes` also runs upstreamd with `apply = "lua"` (needs the Lua apply mode and Debian's
    /// Lua module for nginx).
    lua: bool,
    command: String,
}

fn parse_args(args: &[String]) -> Result<Opts> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out = value("--out")
        .map(|o| root.join(o))
        .unwrap_or_else(|| root.join("bench-out"));
    // A full run writes the committed report at the root; a quick (or redirected) one only
    // writes under its output directory.
    let (markdown, json) = if quick || value("--out").is_some() {
        (out.join("BENCHMARKS.md"), out.join("results.json"))
    } else {
        (root.join("BENCHMARKS.md"), root.join("BENCHMARKS.json"))
    };
    let only: Vec<String> = value("--only")
        .map(|o| o.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| SCENARIOS.iter().map(|s| (*s).to_owned()).collect());
    for o in &only {
        if !SCENARIOS.contains(&o.as_str()) {
            anyhow::bail!("unknown scenario `{o}`; known: {}", SCENARIOS.join(", "));
        }
    }
    let command = std::env::var("UPSTREAMD_BENCH_COMMAND").unwrap_or_else(|_| {
        let shown: Vec<&str> = args[1..]
            .iter()
            .map(String::as_str)
            .filter(|a| *a != "--bench")
            .collect();
        format!("cargo bench --bench scenarios -- {}", shown.join(" "))
    });
    Ok(Opts {
        quick,
        out,
        markdown,
        json,
        only,
        keep: args.iter().any(|a| a == "--keep"),
        lua: args.iter().any(|a| a == "--lua"),
        command,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("scenarios: not run under `cargo test`; run `bash scripts/bench.sh [--quick]`");
        return ExitCode::SUCCESS;
    }
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(&opts) => r,
            s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}; every child was stopped")),
        }
    });
    // Dropping the runtime ends any task still running (their children are already reaped).
    drop(runtime);
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "bench: some scenarios could not run (see the errors above and in the report)"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

fn text_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("({cmd}: {e})"))
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        nginx: text_of("nginx", &["-v"]).replace("nginx version: ", ""),
        etcd: text_of("etcd", &["--version"]),
        date: text_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Raises this process's open-file limit (children inherit it): the scale scenario holds a
/// connection per endpoint in upstreamd and a listening socket per endpoint in nginx.
fn raise_nofile(want: u64) -> Result<()> {
    let pid = std::process::id().to_string();
    let status = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={want}:{want}")])
        .status()
        .context("failed to run prlimit")?;
    if !status.success() {
        anyhow::bail!(
            "prlimit --nofile={want} failed ({status}); run as root or raise `ulimit -n`"
        );
    }
    Ok(())
}

fn bins() -> Bins {
    Bins {
        upstreamd: PathBuf::from(env!("CARGO_BIN_EXE_upstreamd")),
        standin: PathBuf::from(env!("CARGO_BIN_EXE_kotaemon-standin")),
        consul: PathBuf::from(env!("CARGO_BIN_EXE_consul-standin")),
        naive: Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/scenarios/naive-reloader.sh"),
    }
}

/// Records a scenario the harness could not run.
fn failed(results: &mut Results, what: &str, e: anyhow::Error) {
    let line = format!("{what}: {e:#}");
    eprintln!("bench: FAILED {line}");
    results.errors.push(line);
}

/// Runs the selected scenarios; `Ok(false)` when some could not run.
async fn run(opts: &Opts) -> Result<bool> {
    let started = Instant::now();
    let plan = Plan::new(opts.quick);
    std::fs::create_dir_all(&opts.out)?;
    let work = tempfile::Builder::new()
        .prefix("upstreamd-bench.")
        .tempdir()
        .context("failed to create the work directory")?;
    println!("bench: work directory {}", work.path().display());
    let max_scale = plan.scale.iter().copied().max().unwrap_or(0) as u64;
    if let Err(e) = raise_nofile((4 * max_scale + 16_384).max(65_536)) {
        eprintln!("bench: {e:#}");
    }
    let mut env = Env::new(plan.clone(), bins(), work.path())?;
    let mut results = Results {
        machine: machine(),
        command: opts.command.clone(),
        plan: plan.clone(),
        health: env::HEALTH,
        duration_s: 0.0,
        render: vec![],
        fail: vec![],
        discovery: vec![],
        churn: vec![],
        streams: vec![],
        scale: vec![],
        affinity: vec![],
        affinity_test_cost: None,
        modes: vec![],
        errors: vec![],
        targets: vec![],
    };
    let wants = |s: &str| opts.only.iter().any(|o| o == s);
    let step = |what: &str| println!("bench: [{:>5.0} s] {what}", started.elapsed().as_secs_f64());

    if wants("render") {
        step("render+diff timing");
        let scratch = env.dir("render")?;
        for n in [1_000, 10_000] {
            results
                .render
                .push(render_timing::time_render(n, plan.render_runs, &scratch));
        }
    }
    if wants("fail") {
        for event in [Event::FailStop, Event::FailSlow, Event::Sick] {
            for peer in [
                Peer::Upstreamd,
                Peer::UpstreamdFast,
                Peer::Passive,
                Peer::Naive,
                Peer::Haproxy,
                Peer::HaproxyTuned,
            ] {
                step(&format!("{} with {}", event.label(), peer.label()));
                match fail::run(&mut env, event, peer).await {
                    Ok(r) => results.fail.push(r),
                    Err(e) => failed(
                        &mut results,
                        &format!("{} / {}", event.label(), peer.label()),
                        e,
                    ),
                }
            }
        }
    }
    if wants("discovery") {
        for (registry, peer, trials) in [
            (
                discovery::Registry::Etcd,
                Peer::Upstreamd,
                plan.discovery_trials,
            ),
            (
                discovery::Registry::Consul,
                Peer::Upstreamd,
                plan.discovery_trials,
            ),
            (
                discovery::Registry::Etcd,
                Peer::Naive,
                plan.discovery_trials_naive,
            ),
        ] {
            let name = if registry == discovery::Registry::Etcd {
                "etcd"
            } else {
                "consul"
            };
            step(&format!(
                "discovery via {name} with {} ({trials} trials)",
                peer.label()
            ));
            match discovery::run(&mut env, registry, peer, trials).await {
                Ok(r) => results.discovery.push(r),
                Err(e) => failed(
                    &mut results,
                    &format!("discovery {name} / {}", peer.label()),
                    e,
                ),
            }
        }
    }
    if wants("churn") {
        for peer in [Peer::Upstreamd, Peer::Naive] {
            step(&format!("churn with {}", peer.label()));
            match churn::run(&mut env, peer).await {
                Ok(r) => results.churn.push(r),
                Err(e) => failed(&mut results, &format!("churn / {}", peer.label()), e),
            }
        }
    }
    if wants("streams") {
        for peer in [Peer::Upstreamd, Peer::Naive] {
            step(&format!("streams with {}", peer.label()));
            match streams::run(&mut env, peer).await {
                Ok(r) => results.streams.push(r),
                Err(e) => failed(&mut results, &format!("streams / {}", peer.label()), e),
            }
        }
    }
    if wants("scale") {
        for n in plan.scale.clone() {
            step(&format!("scale: {n} endpoints"));
            match scale::run(&mut env, n).await {
                Ok(r) => results.scale.push(r),
                Err(e) => failed(&mut results, &format!("scale {n}"), e),
            }
        }
    }
    if wants("affinity") {
        for mode in [affinity::Mode::Hash, affinity::Mode::Sticky] {
            step(&format!("affinity with {}", mode.word()));
            match affinity::run(&mut env, mode).await {
                Ok(r) => results.affinity.push(r),
                Err(e) => failed(&mut results, &format!("affinity / {}", mode.word()), e),
            }
        }
        step("affinity: nginx -t at 1,000 replicas");
        match env
            .dir("affinity-nginx-t")
            .and_then(|d| affinity::test_cost(&d, plan.render_runs))
        {
            Ok(c) => results.affinity_test_cost = Some(c),
            Err(e) => failed(&mut results, "affinity / nginx -t", e),
        }
    }
    if wants("modes") {
        let mut peers = vec![Peer::Upstreamd];
        if opts.lua {
            peers.push(Peer::UpstreamdLua);
        }
        peers.push(Peer::Naive);
        for peer in peers {
            step(&format!("apply modes with {}", peer.label()));
            match modes::run(&mut env, peer).await {
                Ok(r) => results.modes.push(r),
                Err(e) => failed(&mut results, &format!("modes / {}", peer.label()), e),
            }
        }
    }
    drop(env);
    step("done; writing the report");
    results.duration_s = started.elapsed().as_secs_f64();
    results.machine.loadavg_end = loadavg();
    results.targets = report::targets(&results);
    let json = &opts.json;
    std::fs::write(json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("failed to write `{}`", json.display()))?;
    let notes = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/scenarios/notes.md"),
    )
    .unwrap_or_default();
    let json_name = json
        .strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(json)
        .display()
        .to_string();
    std::fs::write(
        &opts.markdown,
        report::markdown(&results, &notes, &json_name),
    )
    .with_context(|| format!("failed to write `{}`", opts.markdown.display()))?;
    println!(
        "bench: wrote {} and {}",
        opts.markdown.display(),
        json.display()
    );
    for t in &results.targets {
        let verdict = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "—     ",
        };
        println!("bench: target {verdict} {}: {}", t.target, t.measured);
    }
    if opts.keep || !results.errors.is_empty() {
        let kept = work.keep();
        println!("bench: kept the work directory {}", kept.display());
    }
    Ok(results.errors.is_empty())
}
