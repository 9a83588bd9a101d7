//! `tidings-sim`: run scenarios, sweep them, merge and plot results, check determinism.
//!
//! Exit codes: 0 success, 1 error, 2 an invariant did not hold, 3 two runs of one seed differed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use tidings_sim::output::{self, RunInfo};
use tidings_sim::scenario::Scenario;
use tidings_sim::sweep::{self, SweepRun};
use tidings_sim::tierb::{self, RunOptions, RunResult};
use tidings_sim::{calibrate, tiera};

#[derive(Parser)]
#[command(name = "tidings-sim", version, about = "The Tidings network simulator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tier {
    /// Real nodes in virtual time.
    A,
    /// The model.
    B,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario.
    Run {
        scenario: PathBuf,
        /// Seed (default: the scenario's `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// Output folder (default: runs/<name>-seed<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress bar and only the essential lines.
        #[arg(long)]
        quiet: bool,
        #[arg(long, value_enum, default_value = "b")]
        tier: Tier,
    },
    /// Run every point × seed of the scenario's [sweep] (or this shard of them).
    Sweep {
        scenario: PathBuf,
        /// Runs at a time, each in its own process.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Only runs i, i+n, i+2n, … (0 ≤ i < n), for spreading a sweep over machines.
        #[arg(long)]
        shard: Option<String>,
        /// Output folder (default: sweeps/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Combine run folders (or folders of them) into merged.csv with 95% confidence intervals.
    Merge {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Redraw the SVG plots of a run folder from its CSVs.
    Plot { dir: PathBuf },
    /// Run a scenario in both tiers at each size and compare them: the delivery ratio within the
    /// deadline and the latency distributions (Kolmogorov–Smirnov distance).
    Calibrate {
        scenario: PathBuf,
        /// Sizes (nodes) to compare at; every population class is scaled in proportion.
        #[arg(long, value_delimiter = ',', default_value = "100,300")]
        sizes: Vec<u64>,
        #[arg(long)]
        seed: Option<u64>,
        /// Output folder (default: calibrations/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Exit with 4 when the delivery ratios differ by more than this many percentage points.
        #[arg(long)]
        max_ratio_diff_pp: Option<f64>,
        /// Simulated time of each run instead of the scenario's (e.g. "5m").
        #[arg(long)]
        duration: Option<String>,
    },
    /// Run a scenario twice in this process and compare the trace hashes.
    CheckDeterminism {
        scenario: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
    },
}

/// jemalloc keeps its bookkeeping outside the blocks it hands out, so memory
/// reserved but never written (Kademlia's 256 buckets of room for 20 peers
/// each, codec buffers) is not resident; see SIMULATOR.md, "Tier A performance".
/// Its options are built in (`.cargo/config.toml`): freed pages go back to the
/// system at once, not after 10 s of wall time, since a world frees as fast as
/// it allocates and a run reports its peak of resident memory. The feature
/// `system-alloc` leaves the system's allocator in place, for heap profilers
/// such as heaptrack that follow `malloc` (SIMULATOR.md, "Where a node's heap goes now").
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Run {
            scenario,
            seed,
            out,
            quiet,
            tier,
        } => run(&scenario, seed, out, quiet, tier),
        Cmd::Sweep {
            scenario,
            jobs,
            shard,
            out,
        } => run_sweep(&scenario, jobs, shard.as_deref(), out),
        Cmd::Merge { dirs, out } => {
            let n = sweep::merge(&dirs, &out)?;
            println!("merged {n} runs into {}", out.join("merged.csv").display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot { dir } => {
            tidings_sim::plot::plot_dir(&dir)?;
            println!("plots written to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckDeterminism { scenario, seed } => check_determinism(&scenario, seed),
        Cmd::Calibrate {
            scenario,
            sizes,
            seed,
            out,
            max_ratio_diff_pp,
            duration,
        } => calibrate(&scenario, &sizes, seed, out, max_ratio_diff_pp, duration.as_deref()),
    }
}

fn load(path: &Path) -> Result<(Scenario, String)> {
    Scenario::load(path).with_context(|| format!("scenario {}", path.display()))
}

fn simulate(sc: &Scenario, seed: u64, events: Option<File>, quiet: bool, tier: Tier) -> Result<RunResult> {
    let bar = (!quiet).then(|| {
        let bar = ProgressBar::new(sc.duration.micros() / 1_000_000);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} simulated s ({eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut tick = |now: u64, _end: u64| {
        if let Some(b) = &bar {
            b.set_position(now / 1_000_000);
        }
    };
    let opts = RunOptions {
        seed,
        events: events.map(|f| Box::new(f) as Box<dyn std::io::Write>),
        progress: Some(&mut tick),
    };
    let result = match tier {
        Tier::A => tiera::run(sc, opts)?,
        Tier::B => tierb::run(sc, opts)?,
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(result)
}

fn run(path: &Path, seed: Option<u64>, out: Option<PathBuf>, quiet: bool, tier: Tier) -> Result<ExitCode> {
    let (sc, text) = load(path)?;
    let seed = seed.unwrap_or(sc.seed);
    let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/{}-seed{seed}", sc.name)));
    let events_path = output::prepare_dir(&out)?;
    let events = File::create(&events_path).with_context(|| format!("creating {}", events_path.display()))?;
    let ignored = tiera::ignored_protocol_keys(&sc.protocol);
    if tier == Tier::A && !ignored.is_empty() {
        eprintln!(
            "note: Tier A's nodes keep their own {}; this scenario's values apply to Tier B only",
            ignored.join(", ")
        );
    }
    let started = Instant::now();
    let result = simulate(&sc, seed, Some(events), quiet, tier)?;
    let wall = started.elapsed().as_secs_f64();
    let info = RunInfo {
        scenario: &sc,
        scenario_text: &text,
        scenario_file: Some(path),
        seed,
        wall_seconds: wall,
        tier: match tier {
            Tier::A => "a",
            Tier::B => "b",
        },
    };
    let manifest = output::write_run(&out, &info, &result)?;
    let f = |name: &str| result.metric(name).unwrap_or(f64::NAN);
    println!("trace hash {}", result.trace_hash);
    if !quiet {
        println!(
            "{}: seed {seed}, {} nodes, {:.0} simulated s in {wall:.1} s wall",
            sc.name,
            f("nodes"),
            f("duration_s")
        );
        println!(
            "delivered within {:.0} s: {:.4} ({} judged); latency p50/p90/p99 {:.0}/{:.0}/{:.0} ms",
            f("deadline_s"),
            f("delivery_ratio_within_deadline"),
            f("deliveries_judged"),
            f("latency_ms_p50_all"),
            f("latency_ms_p90_all"),
            f("latency_ms_p99_all")
        );
        println!(
            "DHT get_record success {:.4}, hops {:.2}, p50 {:.0} ms; outputs in {}",
            f("dht_get_record_success"),
            f("dht_get_record_hops_mean"),
            f("dht_get_record_latency_ms_p50"),
            out.display()
        );
    }
    if result.violation_count > 0 {
        eprintln!(
            "{} invariant violation(s) in scenario {:?} with seed {seed}:",
            result.violation_count, sc.name
        );
        for v in &result.violations {
            eprintln!("  [{:.3} s] {}: {}", v.time_s, v.invariant, v.detail);
        }
        eprintln!("replay: {}", manifest.replay);
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_sweep(path: &Path, jobs: usize, shard: Option<&str>, out: Option<PathBuf>) -> Result<ExitCode> {
    let (sc, text) = load(path)?;
    let mut runs = sweep::expand(&text)?;
    let total = runs.len();
    if let Some(s) = shard {
        let (i, n) = sweep::parse_shard(s)?;
        runs = sweep::shard(runs, i, n);
    }
    let out = out.unwrap_or_else(|| PathBuf::from(format!("sweeps/{}", sc.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    println!(
        "{} of {total} runs in {} ({} at a time)",
        runs.len(),
        out.display(),
        jobs.max(1)
    );
    let exe = std::env::current_exe().context("finding the tidings-sim executable")?;
    for r in &runs {
        let dir = out.join(r.dir_name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("scenario.toml"), &r.scenario_text)?;
        std::fs::write(dir.join(sweep::POINT), serde_json::to_string_pretty(r)? + "\n")?;
    }
    let queue: Mutex<std::vec::IntoIter<SweepRun>> = Mutex::new(runs.clone().into_iter());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                    let Some(r) = next else { break };
                    let dir = out.join(r.dir_name());
                    let status = Command::new(&exe)
                        .arg("run")
                        .arg(dir.join("scenario.toml"))
                        .args(["--seed", &r.seed.to_string(), "--quiet", "--out"])
                        .arg(&dir)
                        .status();
                    let line = match status {
                        Ok(s) if s.success() => format!("done {} ({})", r.dir_name(), r.label),
                        Ok(s) => {
                            let msg = format!("{} ({}) exited with {s}", r.dir_name(), r.label);
                            if let Ok(mut f) = failures.lock() {
                                f.push(msg.clone());
                            }
                            msg
                        }
                        Err(e) => {
                            let msg = format!("{}: cannot start: {e}", r.dir_name());
                            if let Ok(mut f) = failures.lock() {
                                f.push(msg.clone());
                            }
                            msg
                        }
                    };
                    println!("{line}");
                }
            });
        }
    });
    if shard.is_none() && !runs.is_empty() {
        let n = sweep::merge(std::slice::from_ref(&out), &out)?;
        println!("merged {n} runs into {}", out.join("merged.csv").display());
    }
    let failures = failures.into_inner().unwrap_or_default();
    if !failures.is_empty() {
        eprintln!("{} run(s) failed:", failures.len());
        for f in &failures {
            eprintln!("  {f}");
        }
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn check_determinism(path: &Path, seed: Option<u64>) -> Result<ExitCode> {
    let (sc, _) = load(path)?;
    let seed = seed.unwrap_or(sc.seed);
    let first = simulate(&sc, seed, None, true, Tier::B)?;
    let second = simulate(&sc, seed, None, true, Tier::B)?;
    println!("run 1: {}", first.trace_hash);
    println!("run 2: {}", second.trace_hash);
    if first.trace_hash != second.trace_hash || first.summary_text() != second.summary_text() {
        eprintln!("NOT deterministic: scenario {:?}, seed {seed}", sc.name);
        return Ok(ExitCode::from(3));
    }
    println!("deterministic: scenario {:?}, seed {seed}", sc.name);
    Ok(ExitCode::SUCCESS)
}

fn calibrate(
    path: &Path,
    sizes: &[u64],
    seed: Option<u64>,
    out: Option<PathBuf>,
    max_ratio_diff_pp: Option<f64>,
    duration: Option<&str>,
) -> Result<ExitCode> {
    let (mut sc, _) = load(path)?;
    if let Some(d) = duration {
        sc.duration =
            tidings_sim::scenario::SimDuration::parse(d).map_err(|e| anyhow::anyhow!("--duration {d}: {e}"))?;
    }
    let seed = seed.unwrap_or(sc.seed);
    let out = out.unwrap_or_else(|| PathBuf::from(format!("calibrations/{}", sc.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut rows = Vec::new();
    for &nodes in sizes {
        let scaled = calibrate::scaled(&sc, nodes);
        let text = toml::to_string(&scaled).context("writing the scaled scenario")?;
        let mut results = Vec::new();
        for tier in [Tier::A, Tier::B] {
            let name = match tier {
                Tier::A => "a",
                Tier::B => "b",
            };
            let dir = out.join(format!("{nodes}-{name}"));
            let events_path = output::prepare_dir(&dir)?;
            std::fs::write(dir.join("scenario.toml"), &text)?;
            let events = File::create(&events_path).with_context(|| format!("creating {}", events_path.display()))?;
            let started = Instant::now();
            let result = simulate(&scaled, seed, Some(events), true, tier)?;
            let wall = started.elapsed().as_secs_f64();
            let info = RunInfo {
                scenario: &scaled,
                scenario_text: &text,
                scenario_file: None,
                seed,
                wall_seconds: wall,
                tier: name,
            };
            output::write_run(&dir, &info, &result)?;
            if result.violation_count > 0 {
                eprintln!(
                    "tier {name} at {nodes} nodes: {} invariant violation(s)",
                    result.violation_count
                );
                for v in &result.violations {
                    eprintln!("  [{:.3} s] {}: {}", v.time_s, v.invariant, v.detail);
                }
                return Ok(ExitCode::from(2));
            }
            results.push((result, wall));
        }
        let [(a, wall_a), (b, wall_b)] =
            <[_; 2]>::try_from(results).map_err(|_| anyhow::anyhow!("two runs expected"))?;
        let row = calibrate::compare(nodes, &a, &b, wall_a, wall_b);
        println!(
            "{nodes} nodes: delivered within the deadline A {:.4} / B {:.4} ({:.2} pp apart); latency KS distance {:.3} \
             (direct {:.3}, mailbox {:.3}); p50 A {:.0} / B {:.0} ms; record lookups found A {:.3} / B {:.3}, \
             p50 A {:.0} / B {:.0} ms; kB per client-hour A {:.1} / B {:.1}, per relay-hour A {:.1} / B {:.1}; \
             wall A {:.1} s / B {:.1} s",
            row.ratio_a,
            row.ratio_b,
            row.ratio_diff_pp,
            row.ks_all,
            row.ks_direct,
            row.ks_mailbox,
            row.p50_a_ms,
            row.p50_b_ms,
            row.get_ok_a,
            row.get_ok_b,
            row.get_p50_a_ms,
            row.get_p50_b_ms,
            row.client_bytes_per_hour_a / 1e3,
            row.client_bytes_per_hour_b / 1e3,
            row.relay_bytes_per_hour_a / 1e3,
            row.relay_bytes_per_hour_b / 1e3,
            row.wall_a_s,
            row.wall_b_s
        );
        rows.push(row);
    }
    std::fs::write(out.join("calibration.csv"), calibrate::to_csv(&rows))?;
    println!("written to {}", out.join("calibration.csv").display());
    if let Some(max) = max_ratio_diff_pp
        && rows.iter().any(|r| r.ratio_diff_pp.is_nan() || r.ratio_diff_pp > max)
    {
        eprintln!("the tiers' delivery ratios differ by more than {max} percentage points");
        return Ok(ExitCode::from(4));
    }
    Ok(ExitCode::SUCCESS)
}
