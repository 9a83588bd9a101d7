//! End-to-end tests of tidings-sim: scenarios, determinism, invariants, outputs and the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use tidings_sim::output::{self, RunInfo};
use tidings_sim::scenario::{Scenario, ScenarioError};
use tidings_sim::sweep;
use tidings_sim::tierb::{self, RunOptions, RunResult};

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn smoke() -> (Scenario, String) {
    Scenario::load(&scenarios_dir().join("smoke.toml")).unwrap()
}

fn run(sc: &Scenario, seed: u64) -> RunResult {
    tierb::run(
        sc,
        RunOptions {
            seed,
            events: None,
            progress: None,
        },
    )
    .unwrap()
}

#[test]
fn same_seed_gives_the_same_trace_hash() {
    let (sc, _) = smoke();
    let (a, b) = (run(&sc, 42), run(&sc, 42));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.summary_text(), b.summary_text());
}

#[test]
fn different_seeds_give_different_trace_hashes() {
    let (sc, _) = smoke();
    assert_ne!(run(&sc, 1).trace_hash, run(&sc, 2).trace_hash);
}

#[test]
fn invariants_hold_on_smoke() {
    let (sc, _) = smoke();
    let r = run(&sc, sc.seed);
    assert_eq!(r.violation_count, 0, "{:?}", r.violations);
    assert!(r.metric("messages_sent").unwrap() > 500.0);
    assert!(r.metric("delivery_ratio_by_end").unwrap() > 0.95);
    assert!(r.metric("dht_get_record_success").unwrap() > 0.9);
    for path in ["direct", "relayed", "mailbox"] {
        assert!(
            r.metric(&format!("path_share_{path}")).unwrap() > 0.0,
            "some deliveries go {path}"
        );
    }
}

#[test]
fn every_shipped_scenario_parses_and_validates() {
    let mut names: Vec<String> = std::fs::read_dir(scenarios_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "calibration.toml",
            "churn.toml",
            "eclipse.toml",
            "large.toml",
            "partition.toml",
            "relay-failure.toml",
            "smoke.toml",
            "tier-a.toml"
        ]
    );
    for name in names {
        let path = scenarios_dir().join(&name);
        let (sc, text) = Scenario::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let runs = sweep::expand(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!runs.is_empty());
        assert!(!sc.name.is_empty());
    }
}

const MINIMAL: &str = r#"
name = "bad"
duration = "1m"
[[population]]
class = "relay"
role = "relay"
count = 2
[[population]]
class = "client"
role = "client"
count = 10
[workload]
contacts_per_user = 2
"#;

fn refused(extra: &str) -> ScenarioError {
    match Scenario::from_toml(&format!("{MINIMAL}{extra}")) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(e) => e,
    }
}

#[test]
fn the_minimal_scenario_is_accepted() {
    Scenario::from_toml(MINIMAL).unwrap();
}

#[test]
fn unknown_keys_are_refused() {
    assert!(matches!(refused("[churn]\nsesion = 3\n"), ScenarioError::Parse(_)));
    assert!(matches!(
        refused("[metrics]\ndeadlin = \"1s\"\n"),
        ScenarioError::Parse(_)
    ));
    assert!(matches!(
        refused("[[faults]]\nkind = \"meteor\"\nat = \"1s\"\n"),
        ScenarioError::Parse(_)
    ));
}

#[test]
fn bad_durations_are_refused_when_parsing() {
    let e = Scenario::from_toml(&MINIMAL.replace("\"1m\"", "\"1 fortnight\"")).unwrap_err();
    assert!(matches!(e, ScenarioError::Parse(_)));
    assert!(format!("{:?}", e).contains("not a duration"));
}

#[test]
fn out_of_range_values_name_the_field() {
    match refused("[network]\nloss = 1.5\n") {
        ScenarioError::OutOfRange { field, .. } => assert_eq!(field, "network.loss"),
        e => panic!("{e}"),
    }
    match refused("[adversaries]\ndropping_relays = -0.1\n") {
        ScenarioError::OutOfRange { field, .. } => assert_eq!(field, "adversaries.dropping_relays"),
        e => panic!("{e}"),
    }
    // The spreads: taken as given, and refused beyond a day.
    let spread = |key: &str, d: &str| {
        Scenario::from_toml(&MINIMAL.replace("duration = \"1m\"", &format!("duration = \"1m\"\n{key} = \"{d}\"")))
    };
    assert_eq!(spread("start_spread", "5m").unwrap().start_spread.as_secs_f64(), 300.0);
    assert_eq!(
        spread("relay_start_spread", "90s")
            .unwrap()
            .relay_start_spread
            .as_secs_f64(),
        90.0
    );
    assert_eq!(spread("group_spread", "2m").unwrap().group_spread.as_secs_f64(), 120.0);
    for key in ["start_spread", "relay_start_spread", "group_spread"] {
        match spread(key, "2d") {
            Err(ScenarioError::OutOfRange { field, .. }) => assert_eq!(field, key),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn unknown_regions_are_refused() {
    let e = Scenario::from_toml(&MINIMAL.replace("count = 10\n", "count = 10\nregions = { atlantis = 1.0 }\n"));
    assert!(matches!(e, Err(ScenarioError::UnknownRegion { region, .. }) if region == "atlantis"));
}

#[test]
fn rtt_matrix_must_be_square_and_symmetric() {
    let net = "[network]\nregions = [{ name = \"x\" }, { name = \"y\" }]\n";
    assert!(matches!(
        refused(&format!("{net}rtt_ms = [[1.0, 2.0]]\n")),
        ScenarioError::RttMatrix { .. }
    ));
    assert!(matches!(
        refused(&format!("{net}rtt_ms = [[1.0, 2.0], [3.0, 1.0]]\n")),
        ScenarioError::RttMatrix { .. }
    ));
    assert!(
        matches!(refused(net), ScenarioError::RttMatrix { .. }),
        "no matrix and not built-in regions"
    );
}

#[test]
fn faults_are_checked() {
    let late = "[[faults]]\nkind = \"kill-relays\"\nat = \"2m\"\nfraction = 0.5\n";
    assert!(matches!(refused(late), ScenarioError::BadFault { index: 0, .. }));
    let half = "[[faults]]\nkind = \"partition\"\nat = \"10s\"\nsides = [[\"us-east\"], [\"eu-west\"]]\n";
    assert!(
        matches!(refused(half), ScenarioError::BadFault { .. }),
        "sides must cover every region"
    );
    let heal = "[[faults]]\nkind = \"partition\"\nat = \"30s\"\nheal = \"20s\"\nsides = [[\"us-east\", \"us-west\", \"sa-east\"], [\"eu-west\", \"ap-northeast\", \"ap-southeast\"]]\n";
    assert!(matches!(refused(heal), ScenarioError::BadFault { .. }));
}

#[test]
fn populations_are_checked() {
    let e = Scenario::from_toml(&MINIMAL.replace("count = 10\n", "count = 10\nhome_relays = 3\n"));
    assert!(matches!(
        e,
        Err(ScenarioError::NotEnoughRelays {
            wanted: 3,
            relays: 2,
            ..
        })
    ));
    let e = Scenario::from_toml(&MINIMAL.replace("count = 10\n", "count = 3000000\n"));
    assert!(matches!(e, Err(ScenarioError::TooLarge { what: "nodes", .. })));
    let no_relays = MINIMAL
        .replace("role = \"relay\"", "role = \"client\"")
        .replace("class = \"relay\"", "class = \"c2\"");
    assert!(matches!(
        Scenario::from_toml(&no_relays),
        Err(ScenarioError::NoRelaysOrClients)
    ));
    let e = refused("[adversaries.sybil]\nnodes = 5\ntarget_client = 99\n");
    assert!(matches!(
        e,
        ScenarioError::NoSuchTarget {
            target: 99,
            clients: 10
        }
    ));
}

#[test]
fn sweep_key_paths_are_checked() {
    let e = sweep::expand(&format!(
        "{MINIMAL}[sweep]\nseeds = 2\n[sweep.params]\n\"population.7.count\" = [1]\n"
    ));
    assert!(matches!(
        e,
        Err(sweep::SweepError::Scenario(ScenarioError::BadKeyPath { .. }))
    ));
    let e = sweep::expand(&format!(
        "{MINIMAL}[sweep]\nseeds = 2\n[sweep.params]\n\"network.loss\" = [2.0]\n"
    ));
    assert!(matches!(
        e,
        Err(sweep::SweepError::Scenario(ScenarioError::OutOfRange { .. }))
    ));
}

#[test]
fn run_folder_holds_manifest_summary_events_and_plots_and_merges() {
    let (sc, text) = smoke();
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for seed in [1, 2] {
        let dir = tmp.path().join(format!("run{seed}"));
        let events_path = output::prepare_dir(&dir).unwrap();
        let file = std::fs::File::create(&events_path).unwrap();
        let r = tierb::run(
            &sc,
            RunOptions {
                seed,
                events: Some(Box::new(file)),
                progress: None,
            },
        )
        .unwrap();
        let info = RunInfo {
            scenario: &sc,
            scenario_text: &text,
            scenario_file: None,
            seed,
            wall_seconds: 0.1,
            tier: "b",
        };
        let m = output::write_run(&dir, &info, &r).unwrap();
        assert_eq!(m.trace_hash, r.trace_hash);
        assert_eq!(m.scenario_sha256, output::sha256_hex(&text));
        assert!(m.invariants.ok);
        for f in [
            "manifest.json",
            "summary.csv",
            "events.jsonl",
            "latency_cdf.svg",
            "delivery_over_time.svg",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        for f in ["mailbox_occupancy.svg", "bytes_per_node.svg", "timeseries.csv"] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        // The model has no connections: their columns stay empty.
        let rows = output::read_csv(&dir.join("timeseries.csv"), output::TIMESERIES_COLUMNS.len()).unwrap();
        assert!(!rows.is_empty() && rows.iter().all(|r| r[7].is_empty() && r[8].is_empty()));
        let lines = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
        assert!(lines.lines().count() as u64 == m.events.written && m.events.written > 100);
        let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        assert!(first.get("ev").is_some());
        dirs.push(dir);
    }
    let merged = tmp.path().join("merged");
    assert_eq!(sweep::merge(&[tmp.path().to_path_buf()], &merged).unwrap(), 2);
    let text = std::fs::read_to_string(merged.join("merged.csv")).unwrap();
    let row = text.lines().find(|l| l.contains(",delivery_ratio_by_end,")).unwrap();
    let fields: Vec<&str> = row.split(',').collect();
    assert_eq!(fields[2], "2", "two runs: {row}");
    let (lo, mean, hi): (f64, f64, f64) = (
        fields[4].parse().unwrap(),
        fields[3].parse().unwrap(),
        fields[5].parse().unwrap(),
    );
    assert!(lo <= mean && mean <= hi);
}

/// Runs `scenario` in Tier A through the CLI; checks that it succeeded with every invariant
/// held, and returns the temporary folder, the run folder, stderr and the summary.
fn run_tier_a(
    scenario: &str,
) -> (
    tempfile::TempDir,
    PathBuf,
    String,
    std::collections::HashMap<String, f64>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scenario.toml");
    std::fs::write(&path, scenario).unwrap();
    let out_dir = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_tidings-sim"))
        .args(["run", "--tier", "a", "--quiet", "--out"])
        .arg(&out_dir)
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}{stderr}", String::from_utf8_lossy(&out.stdout));
    let manifest = output::read_manifest(&out_dir).unwrap();
    assert_eq!(manifest.tier, "a");
    assert!(manifest.replay.contains("--tier a"));
    assert!(manifest.invariants.ok, "{stderr}");
    let summary = output::read_csv(&out_dir.join("summary.csv"), 2)
        .unwrap()
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().unwrap_or(f64::NAN)))
        .collect();
    (dir, out_dir, stderr, summary)
}

/// A small world of real nodes: three relays, fifteen people who come and go, look each other up
/// in the DHT, one relay that restarts and a partition between the regions that heals.
const TIER_A_SMALL: &str = r#"
name = "tier-a-small"
duration = "4m"
relay_start_spread = "6s"
seed = 7

[[population]]
class = "relay"
role = "relay"
count = 3

[[population]]
class = "desktop"
role = "client"
count = 15
nat = { public = 0.4, cone = 0.4, symmetric = 0.2 }

[churn]
session = { shape = 1.5, scale = "90s" }
offline = { shape = 1.0, scale = "30s" }

[workload]
contacts_per_user = 3
messages_per_user_per_hour = 120
groups_per_user = 0.0
reply_probability = 0.3
reply_delay = "5s"
record_lookups_per_user_per_hour = 60

[protocol]
record_republish = "1m"

[[faults]]
kind = "restart-relays"
at = "1m"
fraction = 0.34
downtime = "30s"

[[faults]]
kind = "partition"
at = "2m"
heal = "2m30s"
sides = [["us-east", "us-west", "sa-east"], ["eu-west", "ap-northeast", "ap-southeast"]]

[metrics]
deadline = "60s"
sample_every = "10s"
"#;

#[test]
fn tier_a_runs_real_nodes_through_churn_a_relay_restart_and_a_partition_and_every_message_arrives_and_records_are_found()
 {
    let (_dir, out_dir, _stderr, summary) = run_tier_a(TIER_A_SMALL);
    assert_eq!(summary["clients"], 15.0);
    assert!(summary["messages_sent"] >= 20.0, "{summary:?}");
    assert!(summary["deliveries_judged"] >= 10.0, "{summary:?}");
    assert_eq!(summary["delivery_ratio_by_end"], 1.0, "{summary:?}");
    assert!(summary["delivery_ratio_within_deadline"] >= 0.9, "{summary:?}");
    assert_eq!(summary["invariant_violations"], 0.0);
    // Bytes by protocol, counted on the real nodes' substreams over the measured run; the rest of
    // what the links carried is the connections' own (handshakes, framing).
    for role in ["client", "relay"] {
        let b = |what: &str| summary[&format!("bytes_per_{role}_{what}_mean")];
        for what in ["kad", "deliver", "mailbox", "circuit", "identify", "connection"] {
            assert!(b(what) > 0.0, "{role} {what}: {summary:?}");
        }
        let parts: f64 = [
            "kad",
            "deliver",
            "mailbox",
            "circuit",
            "keypackage",
            "identify",
            "autonat",
            "ping",
            "other",
            "connection",
        ]
        .iter()
        .map(|w| b(w))
        .sum();
        assert!(
            (parts - b("total")).abs() <= 1e-6 * b("total"),
            "{role}: the parts {parts} make the total {}",
            b("total")
        );
    }
    // Every client republishes its user record each minute (first published in the set-up);
    // contacts' records are looked up and found.
    assert!(summary["dht_put_record_lookups"] >= 15.0, "{summary:?}");
    assert!(summary["dht_put_record_success"] >= 0.8, "{summary:?}");
    assert!(summary["dht_get_record_lookups"] >= 10.0, "{summary:?}");
    assert!(summary["dht_get_record_success"] >= 0.8, "{summary:?}");
    assert!(summary["dht_get_record_latency_ms_p50"] > 0.0, "{summary:?}");
    // Lookups cut short by their own client going offline are counted apart, not as failures.
    let abandoned = summary["dht_get_record_abandoned"];
    assert!(abandoned >= 0.0 && abandoned.fract() == 0.0, "{summary:?}");
    assert!(
        summary["dht_get_record_hops_mean"].is_nan(),
        "libp2p does not report hops"
    );
    // What the set-up and the run took, and the speed: the run's node-seconds per CPU second.
    assert!(
        summary["wall_setup_s"] > 0.0 && summary["wall_run_s"] > 0.0,
        "{summary:?}"
    );
    if cfg!(target_os = "linux") {
        let cpu = summary["cpu_run_s"];
        assert!(cpu > 0.0 && summary["cpu_setup_s"] > 0.0, "{summary:?}");
        let speed = summary["nodes"] * summary["duration_s"] / cpu;
        assert!(
            (summary["node_seconds_per_cpu_s"] - speed).abs() < 1e-6 * speed,
            "{summary:?}"
        );
    }
    for file in ["events.jsonl", "timeseries.csv", "latency_cdf.svg"] {
        assert!(out_dir.join(file).exists(), "{file}");
    }
    // The simulated network counts the connections the real nodes hold.
    let rows = output::read_csv(&out_dir.join("timeseries.csv"), output::TIMESERIES_COLUMNS.len()).unwrap();
    let per_host: Vec<f64> = rows.iter().map(|r| r[7].parse().unwrap()).collect();
    let opened: Vec<u64> = rows.iter().map(|r| r[8].parse().unwrap()).collect();
    assert!(
        per_host.iter().all(|&c| c >= 1.0),
        "every host holds its relays: {per_host:?}"
    );
    assert!(opened.windows(2).all(|w| w[0] <= w[1]) && opened[0] > 0, "{opened:?}");
    // Memory: the process's resident size at each sample, and the run's peak per node.
    if cfg!(target_os = "linux") {
        let rss: Vec<f64> = rows.iter().map(|r| r[9].parse().unwrap()).collect();
        assert!(rss.iter().all(|&m| m > 1.0), "{rss:?}");
        let peak = summary["memory_peak_mib"];
        assert!(
            rss.iter().all(|&m| m <= peak + 0.1),
            "peak {peak} under a sample: {rss:?}"
        );
        assert!(
            (summary["memory_per_node_mib"] - peak / summary["nodes"]).abs() < 1e-9,
            "{summary:?}"
        );
        // The peak is the higher of the set-up's and the measured run's.
        let (setup, run) = (summary["memory_setup_peak_mib"], summary["memory_run_peak_mib"]);
        assert!(setup > 1.0 && run > 1.0, "{summary:?}");
        assert!((peak - setup.max(run)).abs() < 0.1, "{summary:?}");
        assert!(
            (summary["memory_run_per_node_mib"] - run / summary["nodes"]).abs() < 1e-9,
            "{summary:?}"
        );
    }
}

/// Groups of real nodes: made one after another over 30 s of the set-up, written to while their
/// members come and go, every member renewing its keys (an MLS commit) every 40 s, and a partition
/// between the regions in the middle that heals.
const TIER_A_GROUPS: &str = r#"
name = "tier-a-groups"
duration = "4m"
group_spread = "30s"
seed = 11

[[population]]
class = "relay"
role = "relay"
count = 3

[[population]]
class = "desktop"
role = "client"
count = 12
nat = { public = 0.5, cone = 0.5, symmetric = 0.0 }

[churn]
session = { shape = 1.5, scale = "120s" }
offline = { shape = 1.0, scale = "20s" }

[workload]
contacts_per_user = 2
messages_per_user_per_hour = 90
groups_per_user = 1.5
group_size = [3, 5]
group_message_share = 0.7
reply_probability = 0.0
record_lookups_per_user_per_hour = 0

[protocol]
key_update = "40s"

[[faults]]
kind = "partition"
at = "1m30s"
heal = "2m15s"
sides = [["us-east", "us-west", "sa-east"], ["eu-west", "ap-northeast", "ap-southeast"]]

[metrics]
deadline = "60s"
sample_every = "10s"
"#;

#[test]
fn tier_a_groups_of_real_nodes_commit_through_churn_and_a_partition_and_never_fork() {
    let (_dir, _out_dir, stderr, summary) = run_tier_a(TIER_A_GROUPS);
    assert!(summary["groups"] >= 3.0, "{summary:?}");
    assert_eq!(summary["groups_made"], summary["groups"], "{stderr}");
    // The last group was made (g - 1) / g of `group_spread` after the first.
    let spread_s = 30.0 * (summary["groups"] - 1.0) / summary["groups"];
    assert!(summary["setup_virtual_s"] >= spread_s, "{summary:?}");
    assert!(summary["group_messages_sent"] >= 10.0, "{summary:?}");
    assert!(
        summary["group_messages_sent"] < summary["messages_sent"],
        "one-to-one messages too: {summary:?}"
    );
    assert_eq!(summary["invariant_violations"], 0.0, "{stderr}");
    assert_eq!(summary["delivery_ratio_by_end"], 1.0, "{summary:?}");
    // Commits went on all run long (every member renews its keys every 40 s), and the members
    // running at the end are at their group's latest epoch.
    assert_eq!(summary["group_members_at_latest_epoch"], 1.0, "{summary:?}");
    assert!(summary["group_epoch_mean"] >= 4.0, "{summary:?}");
    // The partition's own figures, as Tier B reports them.
    assert!(summary["fault0_partition_sent"] >= 1.0, "{summary:?}");
    assert!(
        summary.contains_key("fault0_partition_backlog_cleared_s_p50"),
        "{summary:?}"
    );
}

#[test]
fn cli_checks_determinism_of_smoke() {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings-sim"))
        .arg("check-determinism")
        .arg(scenarios_dir().join("smoke.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deterministic"));
}
