//! Checks that a parsed scenario makes sense, before anything runs.

use std::collections::BTreeSet;

use super::{Fault, MAX_DELIVERIES, MAX_NODES, Role, Scenario, SimDuration, regions};

/// Why a scenario was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("scenario does not parse")]
    Parse(#[source] Box<toml::de::Error>),
    #[error("{field} = {value} is out of range: expected {expected}")]
    OutOfRange {
        field: String,
        value: f64,
        expected: &'static str,
    },
    #[error("{field} names region {region:?}, which is not in network.regions")]
    UnknownRegion { field: String, region: String },
    #[error("network.rtt_ms must be a {expected}×{expected} matrix of non-negative, symmetric values: {problem}")]
    RttMatrix { expected: usize, problem: String },
    #[error("the population needs at least one relay and one client")]
    NoRelaysOrClients,
    #[error("clients of class {class:?} want {wanted} home relays but there are only {relays} relays")]
    NotEnoughRelays { class: String, wanted: u32, relays: u64 },
    #[error("{what} = {value} is over the limit of {limit} (memory is bounded)")]
    TooLarge { what: &'static str, value: u64, limit: u64 },
    #[error("faults[{index}]: {problem}")]
    BadFault { index: usize, problem: String },
    #[error("sweep key path {path:?}: {reason}")]
    BadKeyPath { path: String, reason: String },
    #[error("sweep: {problem}")]
    BadSweep { problem: String },
    #[error("adversaries.sybil.target_client = {target} but there are only {clients} clients")]
    NoSuchTarget { target: u32, clients: u64 },
    #[error("duplicate name {name:?} in {field}")]
    Duplicate { field: &'static str, name: String },
}

fn range(field: impl Into<String>, value: f64, ok: bool, expected: &'static str) -> Result<(), ScenarioError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(ScenarioError::OutOfRange {
            field: field.into(),
            value,
            expected,
        })
    }
}

fn fraction(field: impl Into<String>, v: f64) -> Result<(), ScenarioError> {
    range(field, v, (0.0..=1.0).contains(&v), "a fraction in [0, 1]")
}

fn positive(field: impl Into<String>, v: f64) -> Result<(), ScenarioError> {
    range(field, v, v > 0.0, "a positive number")
}

fn non_negative(field: impl Into<String>, v: f64) -> Result<(), ScenarioError> {
    range(field, v, v >= 0.0, "a number ≥ 0")
}

impl Scenario {
    /// Checks ranges and cross-references; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.duration == SimDuration::ZERO || self.duration > SimDuration::from_secs(366 * 86_400) {
            range(
                "duration",
                self.duration.as_secs_f64(),
                false,
                "between 1 µs and 366 days",
            )?;
        }
        for (field, spread) in [
            ("start_spread", self.start_spread),
            ("relay_start_spread", self.relay_start_spread),
            ("group_spread", self.group_spread),
        ] {
            if spread > SimDuration::from_secs(86_400) {
                range(field, spread.as_secs_f64(), false, "at most one day")?;
            }
        }
        self.validate_network()?;
        self.validate_population()?;
        self.validate_churn_and_workload()?;
        self.validate_protocol()?;
        self.validate_faults()?;
        self.validate_adversaries()?;
        let m = &self.metrics;
        if m.deadline == SimDuration::ZERO {
            range("metrics.deadline", 0.0, false, "a positive duration")?;
        }
        if m.sample_every < SimDuration::from_secs(1) {
            range(
                "metrics.sample_every",
                m.sample_every.as_secs_f64(),
                false,
                "at least 1 s",
            )?;
        }
        if self.duration.micros() / m.sample_every.micros().max(1) > 100_000 {
            return Err(ScenarioError::TooLarge {
                what: "time-series samples (duration / metrics.sample_every)",
                value: self.duration.micros() / m.sample_every.micros().max(1),
                limit: 100_000,
            });
        }
        fraction("metrics.event_sample", m.event_sample)?;
        if let Some(r) = m.expect_delivery_ratio {
            fraction("metrics.expect_delivery_ratio", r)?;
        }
        if m.max_events > 10_000_000 {
            return Err(ScenarioError::TooLarge {
                what: "metrics.max_events",
                value: m.max_events,
                limit: 10_000_000,
            });
        }
        if let Some(sweep) = &self.sweep {
            match &sweep.seeds {
                super::Seeds::Count(0) => {
                    return Err(ScenarioError::BadSweep {
                        problem: "seeds = 0".into(),
                    });
                }
                super::Seeds::List(l) if l.is_empty() => {
                    return Err(ScenarioError::BadSweep {
                        problem: "an empty seed list".into(),
                    });
                }
                _ => {}
            }
            for (path, values) in &sweep.params {
                if values.is_empty() {
                    return Err(ScenarioError::BadKeyPath {
                        path: path.clone(),
                        reason: "no values".into(),
                    });
                }
                if path.starts_with("sweep") {
                    return Err(ScenarioError::BadKeyPath {
                        path: path.clone(),
                        reason: "cannot sweep the sweep".into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn validate_network(&self) -> Result<(), ScenarioError> {
        let n = &self.network;
        if n.regions.is_empty() || n.regions.len() > 64 {
            range(
                "network.regions (count)",
                n.regions.len() as f64,
                false,
                "1 to 64 regions",
            )?;
        }
        let mut names = BTreeSet::new();
        for r in &n.regions {
            if !names.insert(r.name.as_str()) {
                return Err(ScenarioError::Duplicate {
                    field: "network.regions",
                    name: r.name.clone(),
                });
            }
            range(
                "network.regions.utc_offset_h",
                r.utc_offset_h,
                (-12.0..=14.0).contains(&r.utc_offset_h),
                "-12 to 14",
            )?;
        }
        let k = n.regions.len();
        match &n.rtt_ms {
            Some(m) => {
                let bad = |problem: String| ScenarioError::RttMatrix { expected: k, problem };
                if m.len() != k || m.iter().any(|row| row.len() != k) {
                    return Err(bad("wrong shape".into()));
                }
                for (i, row) in m.iter().enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        if !v.is_finite() || !(0.0..=10_000.0).contains(&v) {
                            return Err(bad(format!("rtt_ms[{i}][{j}] = {v}")));
                        }
                        if (v - m[j][i]).abs() > 1e-9 {
                            return Err(bad(format!("rtt_ms[{i}][{j}] ≠ rtt_ms[{j}][{i}]")));
                        }
                    }
                }
            }
            None => {
                for r in &n.regions {
                    if regions::default_rtt(&r.name, &r.name).is_none() {
                        return Err(ScenarioError::RttMatrix {
                            expected: k,
                            problem: format!("no rtt_ms given and {:?} is not a built-in region", r.name),
                        });
                    }
                }
            }
        }
        fraction("network.jitter", n.jitter)?;
        fraction("network.loss", n.loss)?;
        let h = &n.hole_punch;
        fraction("network.hole_punch.cone_cone", h.cone_cone)?;
        fraction("network.hole_punch.cone_symmetric", h.cone_symmetric)?;
        fraction("network.hole_punch.symmetric_symmetric", h.symmetric_symmetric)
    }

    fn validate_population(&self) -> Result<(), ScenarioError> {
        let nodes = self.node_count();
        if nodes > MAX_NODES {
            return Err(ScenarioError::TooLarge {
                what: "nodes",
                value: nodes,
                limit: MAX_NODES,
            });
        }
        let relays = self.relay_count();
        if relays == 0 || self.client_count() == 0 {
            return Err(ScenarioError::NoRelaysOrClients);
        }
        let mut classes = BTreeSet::new();
        for (i, c) in self.population.iter().enumerate() {
            let f = |name: &str| format!("population[{i}].{name}");
            if !classes.insert(c.class.as_str()) {
                return Err(ScenarioError::Duplicate {
                    field: "population.class",
                    name: c.class.clone(),
                });
            }
            positive(f("bandwidth_mbps"), c.bandwidth_mbps())?;
            range(
                f("access_rtt_ms"),
                c.access_rtt_ms(),
                (0.0..=5_000.0).contains(&c.access_rtt_ms()),
                "0 to 5000",
            )?;
            range(
                f("commit_ms"),
                c.commit_ms(),
                (0.0..=60_000.0).contains(&c.commit_ms()),
                "0 to 60000",
            )?;
            let nat = c.nat();
            for (name, w) in [
                ("nat.public", nat.public),
                ("nat.cone", nat.cone),
                ("nat.symmetric", nat.symmetric),
            ] {
                non_negative(f(name), w)?;
            }
            positive(f("nat (sum of weights)"), nat.public + nat.cone + nat.symmetric)?;
            if c.role == Role::Relay && (nat.cone > 0.0 || nat.symmetric > 0.0) {
                range(
                    f("nat.public"),
                    nat.public,
                    false,
                    "relays must be public (cone = symmetric = 0)",
                )?;
            }
            for (region, w) in &c.regions {
                if !self.network.regions.iter().any(|r| &r.name == region) {
                    return Err(ScenarioError::UnknownRegion {
                        field: f("regions"),
                        region: region.clone(),
                    });
                }
                non_negative(f("regions weight"), *w)?;
            }
            if !c.regions.is_empty() {
                positive(f("regions (sum of weights)"), c.regions.values().sum())?;
            }
            if c.role == Role::Client {
                let wanted = c.home_relays();
                if wanted == 0 || wanted > 8 {
                    range(
                        f("home_relays"),
                        f64::from(wanted),
                        false,
                        "1 to 8 (a contact card lists at most 8)",
                    )?;
                }
                if u64::from(wanted) > relays {
                    return Err(ScenarioError::NotEnoughRelays {
                        class: c.class.clone(),
                        wanted,
                        relays,
                    });
                }
            }
        }
        Ok(())
    }

    fn validate_churn_and_workload(&self) -> Result<(), ScenarioError> {
        if let Some(ch) = &self.churn {
            for (name, w) in [("churn.session", &ch.session), ("churn.offline", &ch.offline)] {
                range(
                    format!("{name}.shape"),
                    w.shape,
                    (0.1..=20.0).contains(&w.shape),
                    "0.1 to 20",
                )?;
                if w.scale < SimDuration::from_secs(1) {
                    range(format!("{name}.scale"), w.scale.as_secs_f64(), false, "at least 1 s")?;
                }
            }
            fraction("churn.silent_fraction", ch.silent_fraction)?;
            if let Some(d) = &ch.diurnal {
                range(
                    "churn.diurnal.amplitude",
                    d.amplitude,
                    (0.0..0.95).contains(&d.amplitude),
                    "0 to 0.95",
                )?;
                range(
                    "churn.diurnal.peak_hour",
                    d.peak_hour,
                    (0.0..24.0).contains(&d.peak_hour),
                    "0 to 24",
                )?;
            }
        }
        let w = &self.workload;
        let clients = self.client_count();
        if u64::from(w.contacts_per_user) >= clients || w.contacts_per_user > 1_000 {
            range(
                "workload.contacts_per_user",
                f64::from(w.contacts_per_user),
                false,
                "below the client count and ≤ 1000",
            )?;
        }
        let rate = w.messages_per_user_per_hour;
        range(
            "workload.messages_per_user_per_hour",
            rate,
            (0.0..=3_600.0).contains(&rate),
            "0 to 3600",
        )?;
        if w.message_bytes < 16 || w.message_bytes > w.message_bytes_max || w.message_bytes_max > 256 * 1024 {
            range(
                "workload.message_bytes",
                f64::from(w.message_bytes),
                false,
                "16 ≤ message_bytes ≤ message_bytes_max ≤ 262144 (the MLS message cap)",
            )?;
        }
        range(
            "workload.groups_per_user",
            w.groups_per_user,
            (0.0..=50.0).contains(&w.groups_per_user),
            "0 to 50",
        )?;
        let [lo, hi] = w.group_size;
        if lo < 2 || lo > hi || hi > 10_000 || (w.groups_per_user > 0.0 && u64::from(hi) > clients) {
            range(
                "workload.group_size",
                f64::from(lo),
                false,
                "2 ≤ min ≤ max ≤ min(clients, 10000)",
            )?;
        }
        fraction("workload.group_message_share", w.group_message_share)?;
        if w.group_message_share > 0.0 && w.groups_per_user == 0.0 {
            range(
                "workload.group_message_share",
                w.group_message_share,
                false,
                "0 when groups_per_user = 0",
            )?;
        }
        let lookups = w.record_lookups_per_user_per_hour;
        range(
            "workload.record_lookups_per_user_per_hour",
            lookups,
            (0.0..=3_600.0).contains(&lookups),
            "0 to 3600",
        )?;
        range(
            "workload.reply_probability",
            w.reply_probability,
            (0.0..=0.95).contains(&w.reply_probability),
            "0 to 0.95",
        )?;
        let hours = self.duration.as_secs_f64() / 3_600.0;
        let mean_group = f64::from(lo + hi) / 2.0 - 1.0;
        let per_msg = 1.0 + w.group_message_share * (mean_group - 1.0).max(0.0);
        let deliveries =
            clients as f64 * rate * hours * per_msg / (1.0 - w.reply_probability * (1.0 - w.group_message_share));
        if deliveries > MAX_DELIVERIES as f64 {
            return Err(ScenarioError::TooLarge {
                what: "expected deliveries (clients × rate × hours × recipients)",
                value: deliveries as u64,
                limit: MAX_DELIVERIES,
            });
        }
        Ok(())
    }

    fn validate_protocol(&self) -> Result<(), ScenarioError> {
        let p = &self.protocol;
        range(
            "protocol.kad_k",
            f64::from(p.kad_k),
            (1..=64).contains(&p.kad_k),
            "1 to 64",
        )?;
        range(
            "protocol.kad_alpha",
            f64::from(p.kad_alpha),
            (1..=16).contains(&p.kad_alpha),
            "1 to 16",
        )?;
        range(
            "protocol.record_copies",
            f64::from(p.record_copies),
            (1..=64).contains(&p.record_copies),
            "1 to 64",
        )?;
        range(
            "protocol.connect_rtts",
            f64::from(p.connect_rtts),
            p.connect_rtts <= 10,
            "0 to 10",
        )?;
        range(
            "protocol.fetch_page",
            f64::from(p.fetch_page),
            (1..=4096).contains(&p.fetch_page),
            "1 to 4096",
        )?;
        for (name, d, min) in [
            (
                "protocol.kad_rpc_timeout",
                p.kad_rpc_timeout,
                SimDuration::from_millis(1),
            ),
            (
                "protocol.kad_query_timeout",
                p.kad_query_timeout,
                SimDuration::from_millis(1),
            ),
            ("protocol.kad_refresh", p.kad_refresh, SimDuration::from_secs(1)),
            (
                "protocol.kad_client_refresh",
                p.kad_client_refresh,
                SimDuration::from_secs(1),
            ),
            (
                "protocol.record_republish",
                p.record_republish,
                SimDuration::from_secs(1),
            ),
            (
                "protocol.request_timeout",
                p.request_timeout,
                SimDuration::from_millis(1),
            ),
            (
                "protocol.direct_patience",
                p.direct_patience,
                SimDuration::from_millis(1),
            ),
            ("protocol.mailbox_poll", p.mailbox_poll, SimDuration::from_millis(100)),
            ("protocol.relay_redial", p.relay_redial, SimDuration::from_millis(100)),
            ("protocol.group_poll", p.group_poll, SimDuration::from_millis(100)),
            ("protocol.retention", p.retention, SimDuration::from_secs(1)),
            ("protocol.retry_initial", p.retry_initial, SimDuration::from_millis(1)),
            ("protocol.retry_max", p.retry_max, p.retry_initial),
            (
                "protocol.circuit_max_duration",
                p.circuit_max_duration,
                SimDuration::from_secs(1),
            ),
            ("protocol.idle_timeout", p.idle_timeout, SimDuration::from_secs(1)),
            (
                "protocol.conversation_keep_alive",
                p.conversation_keep_alive,
                SimDuration::from_secs(1),
            ),
            ("protocol.ping_interval", p.ping_interval, SimDuration::from_secs(1)),
            ("protocol.key_update", p.key_update, SimDuration::from_secs(1)),
        ] {
            if d < min {
                range(
                    name,
                    d.as_secs_f64(),
                    false,
                    "a longer duration (see docs/SIMULATOR.md)",
                )?;
            }
        }
        Ok(())
    }

    fn validate_faults(&self) -> Result<(), ScenarioError> {
        for (index, fault) in self.faults.iter().enumerate() {
            let bad = |problem: String| ScenarioError::BadFault { index, problem };
            if fault.at() > self.duration {
                return Err(bad(format!(
                    "at = {} is after the end of the run ({})",
                    fault.at(),
                    self.duration
                )));
            }
            match fault {
                Fault::Partition(p) => {
                    if let Some(heal) = p.heal
                        && heal <= p.at
                    {
                        return Err(bad(format!("heal = {heal} is not after at = {}", p.at)));
                    }
                    if p.sides.len() < 2 {
                        return Err(bad("a partition needs at least two sides".into()));
                    }
                    let mut seen = BTreeSet::new();
                    for region in p.sides.iter().flatten() {
                        if !self.network.regions.iter().any(|r| &r.name == region) {
                            return Err(ScenarioError::UnknownRegion {
                                field: format!("faults[{index}].sides"),
                                region: region.clone(),
                            });
                        }
                        if !seen.insert(region.as_str()) {
                            return Err(bad(format!("region {region:?} is on two sides")));
                        }
                    }
                    if seen.len() != self.network.regions.len() {
                        return Err(bad("every region must be on exactly one side".into()));
                    }
                }
                Fault::KillRelays(k) => fraction(format!("faults[{index}].fraction"), k.fraction)?,
                Fault::RestartRelays(r) => {
                    fraction(format!("faults[{index}].fraction"), r.fraction)?;
                    if r.downtime == SimDuration::ZERO {
                        return Err(bad("downtime must be positive".into()));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_adversaries(&self) -> Result<(), ScenarioError> {
        let a = &self.adversaries;
        fraction("adversaries.dropping_relays", a.dropping_relays)?;
        fraction("adversaries.withholding_relays", a.withholding_relays)?;
        fraction(
            "adversaries (dropping + withholding)",
            a.dropping_relays + a.withholding_relays,
        )?;
        if let Some(s) = &a.sybil {
            let clients = self.client_count();
            if u64::from(s.target_client) >= clients {
                return Err(ScenarioError::NoSuchTarget {
                    target: s.target_client,
                    clients,
                });
            }
            range(
                "adversaries.sybil.nodes",
                f64::from(s.nodes),
                (1..=100_000).contains(&s.nodes),
                "1 to 100000",
            )?;
            let bits = s.shared_prefix_bits;
            range(
                "adversaries.sybil.shared_prefix_bits",
                f64::from(bits),
                (1..=200).contains(&bits),
                "1 to 200",
            )?;
            range(
                "adversaries.sybil.subnets",
                f64::from(s.subnets),
                (1..=s.nodes).contains(&s.subnets),
                "1 to nodes",
            )?;
            let rate = s.target_lookups_per_hour;
            range(
                "adversaries.sybil.target_lookups_per_hour",
                rate,
                (0.0..=36_000.0).contains(&rate),
                "0 to 36000",
            )?;
            range(
                "adversaries.sybil.disjoint_paths",
                f64::from(s.disjoint_paths),
                (1..=16).contains(&s.disjoint_paths),
                "1 to 16",
            )?;
            range(
                "adversaries.sybil.per_subnet",
                f64::from(s.per_subnet),
                (1..=64).contains(&s.per_subnet),
                "1 to 64",
            )?;
        }
        Ok(())
    }
}
