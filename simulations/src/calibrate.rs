//! Calibration: the same scenario at the same size in both tiers, and how far apart their
//! figures are — the delivery ratio within the deadline (percentage points), the latency
//! distributions (two-sample Kolmogorov–Smirnov distance, overall and by path) and the DHT's record
//! lookups (success and median latency).

use serde::Serialize;

use crate::scenario::Scenario;
use crate::tierb::RunResult;

/// `sc` with its population scaled to about `nodes` hosts (every class in proportion, at least
/// one of each); the workload is unchanged, so both tiers see the same one.
pub fn scaled(sc: &Scenario, nodes: u64) -> Scenario {
    let mut s = sc.clone();
    let total: u64 = sc.population.iter().map(|c| u64::from(c.count)).sum();
    let factor = nodes as f64 / total.max(1) as f64;
    for c in &mut s.population {
        c.count = ((f64::from(c.count) * factor).round() as u32).max(1);
    }
    s.name = format!("{}-{}", sc.name, nodes);
    s
}

/// Two-sample Kolmogorov–Smirnov distance between two distributions given as quantile curves
/// ((q, value) points with q from 0 to 1, values non-decreasing): the largest gap between their
/// CDFs, evaluated at every value either curve names. NaN if either is empty.
pub fn ks_distance(a: &[(f64, f64)], b: &[(f64, f64)]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return f64::NAN;
    }
    let mut worst: f64 = 0.0;
    for &(_, x) in a.iter().chain(b) {
        worst = worst.max((cdf(a, x) - cdf(b, x)).abs());
    }
    worst
}

/// The share of the distribution at or below `x`, from its quantile curve.
fn cdf(curve: &[(f64, f64)], x: f64) -> f64 {
    // The last quantile whose value is at most x.
    match curve.iter().rposition(|&(_, v)| v <= x) {
        None => 0.0,
        Some(i) => curve[i].0,
    }
}

/// One size's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub nodes: u64,
    pub ratio_a: f64,
    pub ratio_b: f64,
    /// |a − b| in percentage points.
    pub ratio_diff_pp: f64,
    pub judged_a: f64,
    pub judged_b: f64,
    pub ks_all: f64,
    pub ks_direct: f64,
    pub ks_mailbox: f64,
    pub p50_a_ms: f64,
    pub p50_b_ms: f64,
    pub p99_a_ms: f64,
    pub p99_b_ms: f64,
    /// Share of record lookups that found the record.
    pub get_ok_a: f64,
    pub get_ok_b: f64,
    /// Median latency of the successful ones.
    pub get_p50_a_ms: f64,
    pub get_p50_b_ms: f64,
    /// Bytes a client moved per hour, on average (both directions): Tier A counts what its links
    /// carried, Tier B estimates it from the frames' sizes.
    pub client_bytes_per_hour_a: f64,
    pub client_bytes_per_hour_b: f64,
    /// The same for a relay.
    pub relay_bytes_per_hour_a: f64,
    pub relay_bytes_per_hour_b: f64,
    pub wall_a_s: f64,
    pub wall_b_s: f64,
}

fn curve<'r>(r: &'r RunResult, path: &str) -> &'r [(f64, f64)] {
    r.latency_quantiles
        .iter()
        .find(|(p, _)| p == path)
        .map_or(&[], |(_, c)| c.as_slice())
}

/// Compares a Tier A and a Tier B run of the same scenario.
pub fn compare(nodes: u64, a: &RunResult, b: &RunResult, wall_a_s: f64, wall_b_s: f64) -> Comparison {
    let m = |r: &RunResult, k: &str| r.metric(k).unwrap_or(f64::NAN);
    let (ra, rb) = (
        m(a, "delivery_ratio_within_deadline"),
        m(b, "delivery_ratio_within_deadline"),
    );
    // Tier B's "relayed" (circuit) path is a direct delivery to Tier A, which cannot tell them apart.
    let merge = |r: &RunResult| -> Vec<(f64, f64)> {
        let (d, rel) = (curve(r, "direct"), curve(r, "relayed"));
        let (nd, nr) = (m(r, "path_share_direct").max(0.0), m(r, "path_share_relayed").max(0.0));
        if rel.is_empty() || nr == 0.0 {
            return d.to_vec();
        }
        if d.is_empty() || nd == 0.0 {
            return rel.to_vec();
        }
        // Mix the two CDFs by their shares, then read quantiles back off the mixture.
        let mut xs: Vec<f64> = d.iter().chain(rel).map(|p| p.1).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        xs.iter()
            .map(|&x| ((nd * cdf(d, x) + nr * cdf(rel, x)) / (nd + nr), x))
            .collect()
    };
    Comparison {
        nodes,
        ratio_a: ra,
        ratio_b: rb,
        ratio_diff_pp: (ra - rb).abs() * 100.0,
        judged_a: m(a, "deliveries_judged"),
        judged_b: m(b, "deliveries_judged"),
        ks_all: ks_distance(curve(a, "all"), curve(b, "all")),
        ks_direct: ks_distance(&merge(a), &merge(b)),
        ks_mailbox: ks_distance(curve(a, "mailbox"), curve(b, "mailbox")),
        p50_a_ms: m(a, "latency_ms_p50_all"),
        p50_b_ms: m(b, "latency_ms_p50_all"),
        p99_a_ms: m(a, "latency_ms_p99_all"),
        p99_b_ms: m(b, "latency_ms_p99_all"),
        get_ok_a: m(a, "dht_get_record_success"),
        get_ok_b: m(b, "dht_get_record_success"),
        get_p50_a_ms: m(a, "dht_get_record_latency_ms_p50"),
        get_p50_b_ms: m(b, "dht_get_record_latency_ms_p50"),
        client_bytes_per_hour_a: m(a, "bytes_per_client_total_per_hour_mean"),
        client_bytes_per_hour_b: m(b, "bytes_per_client_total_per_hour_mean"),
        relay_bytes_per_hour_a: m(a, "bytes_per_relay_total_per_hour_mean"),
        relay_bytes_per_hour_b: m(b, "bytes_per_relay_total_per_hour_mean"),
        wall_a_s,
        wall_b_s,
    }
}

/// The comparisons as CSV.
pub fn to_csv(rows: &[Comparison]) -> String {
    let mut s = String::from(
        "nodes,ratio_a,ratio_b,ratio_diff_pp,judged_a,judged_b,ks_all,ks_direct,ks_mailbox,\
         p50_a_ms,p50_b_ms,p99_a_ms,p99_b_ms,get_ok_a,get_ok_b,get_p50_a_ms,get_p50_b_ms,\
         client_bytes_per_hour_a,client_bytes_per_hour_b,relay_bytes_per_hour_a,relay_bytes_per_hour_b,wall_a_s,wall_b_s\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.0},{:.0},{:.0},{:.0},{:.1},{:.1}\n",
            r.nodes,
            r.ratio_a,
            r.ratio_b,
            r.ratio_diff_pp,
            r.judged_a,
            r.judged_b,
            r.ks_all,
            r.ks_direct,
            r.ks_mailbox,
            r.p50_a_ms,
            r.p50_b_ms,
            r.p99_a_ms,
            r.p99_b_ms,
            r.get_ok_a,
            r.get_ok_b,
            r.get_p50_a_ms,
            r.get_p50_b_ms,
            r.client_bytes_per_hour_a,
            r.client_bytes_per_hour_b,
            r.relay_bytes_per_hour_a,
            r.relay_bytes_per_hour_b,
            r.wall_a_s,
            r.wall_b_s
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(lo: f64, hi: f64) -> Vec<(f64, f64)> {
        (0..=100)
            .map(|i| {
                let q = f64::from(i) / 100.0;
                (q, lo + q * (hi - lo))
            })
            .collect()
    }

    #[test]
    fn ks_distance_is_zero_for_one_distribution_and_one_for_disjoint_ones() {
        let a = uniform(0.0, 100.0);
        assert!(ks_distance(&a, &a) < 1e-9);
        assert!((ks_distance(&a, &uniform(200.0, 300.0)) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn ks_distance_of_shifted_uniforms_is_the_shift_over_the_width() {
        let d = ks_distance(&uniform(0.0, 100.0), &uniform(25.0, 125.0));
        assert!((d - 0.25).abs() < 0.02, "{d}");
        assert!(ks_distance(&[], &uniform(0.0, 1.0)).is_nan());
    }

    #[test]
    fn scaling_keeps_the_classes_in_proportion_and_the_workload() {
        let sc = crate::scenario::two_classes("s", 100, 900, "[workload]\ngroups_per_user = 1.0");
        let s = scaled(&sc, 200);
        assert_eq!(s.population[0].count, 20);
        assert_eq!(s.population[1].count, 180);
        assert_eq!(s.workload, sc.workload, "both tiers run groups");
        assert_eq!(s.name, "s-200");
    }
}
