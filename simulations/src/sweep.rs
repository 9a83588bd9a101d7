//! Sweeps: a scenario's `[sweep]` expanded into runs (every combination of the parameter values ×
//! every seed), sharded across machines with `--shard i/n`, and merged back with means and 95%
//! confidence intervals across seeds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::output::{self, OutputError, io_err};
use crate::scenario::{Scenario, ScenarioError, Seeds, set_key_path};

/// Written by `sweep` into each run folder.
pub const POINT: &str = "point.json";

/// One run of a sweep: a parameter point and a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRun {
    /// Position in the expanded list (what `--shard` counts).
    pub index: usize,
    pub point: usize,
    /// `key=value` pairs joined with `;`, or "base" without parameters.
    pub label: String,
    pub seed: u64,
    /// The scenario of this point, with the values set and `[sweep]` removed.
    #[serde(skip)]
    pub scenario_text: String,
}

impl SweepRun {
    pub fn dir_name(&self) -> String {
        format!("p{:03}-s{}", self.point, self.seed)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("--shard must be i/n with 0 ≤ i < n, got {0:?}")]
    BadShard(String),
    #[error("scenario text does not serialise")]
    Serialise(#[source] toml::ser::Error),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("no run folders (with manifest.json and summary.csv) under {0}")]
    NoRuns(String),
}

/// Expands scenario text into its runs. Without `[sweep]`, one run with the scenario's seed.
pub fn expand(text: &str) -> Result<Vec<SweepRun>, SweepError> {
    let sc = Scenario::from_toml(text)?;
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| ScenarioError::Parse(Box::new(e)))?;
    doc.remove("sweep");
    let (params, seeds): (Vec<(String, Vec<toml::Value>)>, Vec<u64>) = match &sc.sweep {
        None => (Vec::new(), vec![sc.seed]),
        Some(s) => (
            s.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            match &s.seeds {
                Seeds::Count(n) => (0..u64::from(*n)).map(|i| sc.seed.wrapping_add(i)).collect(),
                Seeds::List(l) => l.clone(),
            },
        ),
    };
    let points: usize = params.iter().map(|(_, v)| v.len()).product();
    if points > 100_000 {
        return Err(ScenarioError::BadSweep {
            problem: format!("{points} points is too many"),
        }
        .into());
    }
    let mut runs = Vec::new();
    for point in 0..points {
        let mut d = doc.clone();
        let mut label = Vec::new();
        let mut rest = point;
        for (key, values) in params.iter().rev() {
            let v = &values[rest % values.len()];
            rest /= values.len();
            set_key_path(&mut d, key, v.clone())?;
            label.push(format!("{key}={}", v.to_string().trim_matches('"')));
        }
        label.reverse();
        let text = toml::to_string(&d).map_err(SweepError::Serialise)?;
        Scenario::from_toml(&text)?;
        let label = if label.is_empty() {
            "base".to_string()
        } else {
            label.join(";")
        };
        for &seed in &seeds {
            runs.push(SweepRun {
                index: runs.len(),
                point,
                label: label.clone(),
                seed,
                scenario_text: text.clone(),
            });
        }
    }
    Ok(runs)
}

/// Parses `i/n`.
pub fn parse_shard(s: &str) -> Result<(usize, usize), SweepError> {
    let bad = || SweepError::BadShard(s.to_string());
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// The runs of shard `i` of `n`: every n-th run, starting at the i-th.
pub fn shard(runs: Vec<SweepRun>, i: usize, n: usize) -> Vec<SweepRun> {
    runs.into_iter().filter(|r| r.index % n == i).collect()
}

/// Two-sided 95% Student t quantiles for 1..=30 degrees of freedom.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
    2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

/// Mean and 95% confidence half-width of the mean.
pub fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T95.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

/// Run folders under the given paths: each path is a run folder or holds run folders.
pub fn find_runs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SweepError> {
    let is_run = |p: &Path| p.join(output::MANIFEST).is_file() && p.join(output::SUMMARY).is_file();
    let mut runs = Vec::new();
    for p in paths {
        if is_run(p) {
            runs.push(p.clone());
            continue;
        }
        let mut inner: Vec<PathBuf> = fs::read_dir(p)
            .map_err(io_err(p))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|q| is_run(q))
            .collect();
        inner.sort();
        runs.extend(inner);
    }
    runs.sort();
    runs.dedup();
    if runs.is_empty() {
        let all: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(SweepError::NoRuns(all.join(", ")));
    }
    Ok(runs)
}

/// Per point: metric names in first-seen order, and the values of each metric across runs.
type PointValues = (Vec<String>, BTreeMap<String, Vec<f64>>);

/// Merges run folders: per point (sweep label, or scenario name and hash) and metric, the number
/// of runs, mean, 95% CI, min and max. Writes `merged.csv` and `runs.csv` into `out`.
pub fn merge(paths: &[PathBuf], out: &Path) -> Result<usize, SweepError> {
    let runs = find_runs(paths)?;
    // point label → metric → values (metric order kept as first seen).
    let mut points: BTreeMap<String, PointValues> = BTreeMap::new();
    let mut listing = String::from("run,point,seed,trace_hash,invariants_ok\n");
    for dir in &runs {
        let m = output::read_manifest(dir)?;
        let label = match fs::read_to_string(dir.join(POINT)) {
            Ok(text) => serde_json::from_str::<SweepRun>(&text)
                .map(|r| r.label)
                .map_err(|source| OutputError::Json {
                    path: dir.join(POINT).display().to_string(),
                    source,
                })?,
            Err(_) => format!(
                "{} [{}]",
                m.scenario_name,
                &m.scenario_sha256[..12.min(m.scenario_sha256.len())]
            ),
        };
        let _ = writeln!(
            listing,
            "{},{},{},{},{}",
            dir.display(),
            csv_field(&label),
            m.seed,
            m.trace_hash,
            m.invariants.ok
        );
        let entry = points.entry(label).or_default();
        for (metric, v) in output::read_summary(dir)? {
            if !entry.1.contains_key(&metric) {
                entry.0.push(metric.clone());
            }
            let values = entry.1.entry(metric).or_default();
            if v.is_finite() {
                values.push(v);
            }
        }
    }
    let mut csv = String::from("point,metric,runs,mean,ci95_low,ci95_high,min,max\n");
    for (label, (order, metrics)) in &points {
        for metric in order {
            let values = &metrics[metric];
            let (mean, half) = mean_ci95(values);
            let min = values.iter().copied().fold(f64::NAN, f64::min);
            let max = values.iter().copied().fold(f64::NAN, f64::max);
            let _ = writeln!(
                csv,
                "{},{metric},{},{mean},{},{},{min},{max}",
                csv_field(label),
                values.len(),
                mean - half,
                mean + half
            );
        }
    }
    fs::create_dir_all(out).map_err(io_err(out))?;
    let merged = out.join("merged.csv");
    fs::write(&merged, csv).map_err(io_err(&merged))?;
    let list = out.join("runs.csv");
    fs::write(&list, listing).map_err(io_err(&list))?;
    Ok(runs.len())
}

fn csv_field(s: &str) -> String {
    if s.contains(',') || s.contains('"') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "sweep-test"
duration = "1m"
seed = 10
[[population]]
class = "relay"
role = "relay"
count = 3
[[population]]
class = "client"
role = "client"
count = 20
[workload]
contacts_per_user = 3
[sweep]
seeds = 2
[sweep.params]
"workload.messages_per_user_per_hour" = [1.0, 2.0, 4.0]
"population.0.count" = [3, 5]
"#;

    #[test]
    fn sweep_expands_points_times_seeds_and_sets_the_values() {
        let runs = expand(BASE).unwrap();
        assert_eq!(runs.len(), 3 * 2 * 2);
        assert_eq!(runs[0].seed, 10);
        assert_eq!(runs[1].seed, 11);
        let last = Scenario::from_toml(&runs[11].scenario_text).unwrap();
        assert_eq!(last.population[0].count, 5);
        assert_eq!(last.workload.messages_per_user_per_hour, 4.0);
        assert!(last.sweep.is_none());
        assert_eq!(
            runs[11].label,
            "population.0.count=5;workload.messages_per_user_per_hour=4.0"
        );
    }

    #[test]
    fn shards_partition_the_runs() {
        let runs = expand(BASE).unwrap();
        let mut seen: Vec<usize> = (0..3)
            .flat_map(|i| shard(runs.clone(), i, 3))
            .map(|r| r.index)
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        assert_eq!(parse_shard("2/4").unwrap(), (2, 4));
        assert!(parse_shard("4/4").is_err());
        assert!(parse_shard("x").is_err());
    }

    #[test]
    fn confidence_interval_uses_student_t() {
        let (m, h) = mean_ci95(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12);
        assert!((h - 4.303 * (1.0f64 / 3.0).sqrt()).abs() < 1e-9);
        assert!(mean_ci95(&[5.0]).1.is_nan());
    }
}
