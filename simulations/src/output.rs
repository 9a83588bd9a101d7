//! The run folder: `manifest.json` (what reproduces the run), `events.jsonl` (written during the
//! run), `summary.csv` (metric,value), the time series and distributions behind the plots, and the
//! SVG plots themselves.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::scenario::{EventsMode, Scenario};
use crate::tierb::{RunResult, Violation};

/// Files in a run folder.
pub const MANIFEST: &str = "manifest.json";
pub const SUMMARY: &str = "summary.csv";
pub const EVENTS: &str = "events.jsonl";
pub const TIMESERIES: &str = "timeseries.csv";
/// The columns of [`TIMESERIES`].
pub const TIMESERIES_COLUMNS: [&str; 10] = [
    "t_s",
    "online_clients",
    "relays_up",
    "mailbox_total",
    "mailbox_max_relay",
    "outbox_pending",
    "messages_sent",
    "connections_per_host",
    "connections_opened",
    "rss_mib",
];
pub const DELIVERY: &str = "delivery_over_time.csv";
pub const LATENCY: &str = "latency_quantiles.csv";
pub const BYTES: &str = "bytes_quantiles.csv";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    #[error("cannot write or read {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad JSON in {path}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}:{line}: not a CSV row of the expected shape")]
    Csv { path: String, line: usize },
    #[error("cannot draw {path}: {reason}")]
    Plot { path: String, reason: String },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What makes a run reproducible, and what it found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub tool: String,
    pub version: String,
    pub tier: String,
    pub scenario_name: String,
    pub scenario_file: Option<String>,
    pub scenario_sha256: String,
    pub scenario: String,
    pub seed: u64,
    pub git_revision: String,
    pub trace_hash: String,
    pub events: EventsInfo,
    pub invariants: InvariantsInfo,
    /// The command that replays this run.
    pub replay: String,
    pub wall_seconds: f64,
    pub peak_rss_kib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsInfo {
    pub mode: String,
    pub written: u64,
    pub left_out_by_cap: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvariantsInfo {
    pub ok: bool,
    pub violations: u64,
    pub first: Vec<ViolationInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViolationInfo {
    pub invariant: String,
    pub detail: String,
    pub time_s: f64,
}

impl From<&Violation> for ViolationInfo {
    fn from(v: &Violation) -> Self {
        ViolationInfo {
            invariant: v.invariant.to_string(),
            detail: v.detail.clone(),
            time_s: v.time_s,
        }
    }
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The git revision this binary was built from (`build.rs`), or "unknown" if
/// it was not built in a git checkout.
pub fn git_revision() -> String {
    env!("TIDINGS_SIM_GIT_REVISION").to_string()
}

/// Everything `write_run` needs besides the result.
pub struct RunInfo<'a> {
    pub scenario: &'a Scenario,
    pub scenario_text: &'a str,
    pub scenario_file: Option<&'a Path>,
    pub seed: u64,
    pub wall_seconds: f64,
    /// "a" (real nodes) or "b" (the model).
    pub tier: &'a str,
}

/// Creates the folder and returns the events.jsonl path in it.
pub fn prepare_dir(dir: &Path) -> Result<PathBuf, OutputError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    Ok(dir.join(EVENTS))
}

/// Writes the manifest, CSVs and plots of a finished run.
pub fn write_run(dir: &Path, info: &RunInfo<'_>, r: &RunResult) -> Result<Manifest, OutputError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let file = info.scenario_file.map(|p| p.display().to_string());
    let replay = format!(
        "tidings-sim run {} --seed {} --tier {}",
        file.clone()
            .unwrap_or_else(|| format!("{}/scenario.toml", dir.display())),
        info.seed,
        info.tier
    );
    let manifest = Manifest {
        tool: "tidings-sim".into(),
        version: crate::VERSION.into(),
        tier: info.tier.into(),
        scenario_name: info.scenario.name.clone(),
        scenario_file: file,
        scenario_sha256: sha256_hex(info.scenario_text),
        scenario: info.scenario_text.to_string(),
        seed: info.seed,
        git_revision: git_revision(),
        trace_hash: r.trace_hash.clone(),
        events: EventsInfo {
            mode: match info.scenario.metrics.events {
                EventsMode::Full => "full",
                EventsMode::Sampled => "sampled",
                EventsMode::None => "none",
            }
            .into(),
            written: r.events_written,
            left_out_by_cap: r.events_dropped,
        },
        invariants: InvariantsInfo {
            ok: r.violation_count == 0,
            violations: r.violation_count,
            first: r.violations.iter().map(ViolationInfo::from).collect(),
        },
        replay,
        wall_seconds: info.wall_seconds,
        peak_rss_kib: crate::memory::peak_bytes().map(|b| b / 1024),
    };
    let path = dir.join(MANIFEST);
    let json = serde_json::to_string_pretty(&manifest).map_err(|source| OutputError::Json {
        path: path.display().to_string(),
        source,
    })?;
    fs::write(&path, json + "\n").map_err(io_err(&path))?;

    let mut csv = String::from("metric,value\n");
    for (k, v) in &r.summary {
        let _ = writeln!(csv, "{k},{v}");
    }
    write(dir, SUMMARY, &csv)?;

    let mut ts = format!("{}\n", TIMESERIES_COLUMNS.join(","));
    for s in &r.samples {
        // Tier B has no connections and does not read its memory: those fields stay empty.
        let per_host = s.connections_per_host.map(|c| format!("{c:.2}")).unwrap_or_default();
        let opened = s.connections_opened.map(|c| c.to_string()).unwrap_or_default();
        let rss = s
            .rss_bytes
            .map(|b| format!("{:.1}", crate::memory::mib(b)))
            .unwrap_or_default();
        let _ = writeln!(
            ts,
            "{},{},{},{},{},{},{},{per_host},{opened},{rss}",
            s.t_s,
            s.online_clients,
            s.relays_up,
            s.mailbox_total,
            s.mailbox_max_relay,
            s.outbox_pending,
            s.messages_sent,
        );
    }
    write(dir, TIMESERIES, &ts)?;

    let mut dv = String::from("t_s,sent,on_time,delivered\n");
    for b in &r.delivery_bins {
        let _ = writeln!(dv, "{},{},{},{}", b.t_s, b.sent, b.on_time, b.delivered);
    }
    write(dir, DELIVERY, &dv)?;

    let mut lat = String::from("path,quantile,latency_ms\n");
    for (path, points) in &r.latency_quantiles {
        for (q, v) in points {
            let _ = writeln!(lat, "{path},{q},{v}");
        }
    }
    write(dir, LATENCY, &lat)?;

    let mut bytes = String::from("role,protocol,quantile,bytes\n");
    for (role, proto, points) in &r.bytes_quantiles {
        for (q, v) in points {
            let _ = writeln!(bytes, "{role},{proto},{q},{v}");
        }
    }
    write(dir, BYTES, &bytes)?;
    crate::plot::plot_dir(dir)?;
    Ok(manifest)
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), OutputError> {
    let path = dir.join(name);
    fs::write(&path, text).map_err(io_err(&path))
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, OutputError> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|source| OutputError::Json {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a CSV with a header into rows of fields (no quoting: our files never need it).
pub fn read_csv(path: &Path, columns: usize) -> Result<Vec<Vec<String>>, OutputError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<String> = line.split(',').map(str::to_string).collect();
        if fields.len() != columns {
            return Err(OutputError::Csv {
                path: path.display().to_string(),
                line: i + 1,
            });
        }
        rows.push(fields);
    }
    Ok(rows)
}

/// A run's summary as (metric, value).
pub fn read_summary(dir: &Path) -> Result<Vec<(String, f64)>, OutputError> {
    let path = dir.join(SUMMARY);
    read_csv(&path, 2)?
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let v: f64 = row[1].parse().map_err(|_| OutputError::Csv {
                path: path.display().to_string(),
                line: i + 2,
            })?;
            Ok((row[0].clone(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_names_the_revision_the_binary_was_built_from() {
        let built = git_revision();
        let head = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match head {
            // Built again whenever HEAD moves, so the two agree.
            Some(head) => assert_eq!(built, head),
            None => assert_eq!(built, "unknown"),
        }
    }
}
