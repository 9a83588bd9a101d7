//! Turning the final state of a run into figures: the summary, time series and distributions that
//! the output module writes.

use serde::Serialize;

use super::event::Path;
use super::{NEVER, NodeRole, Proto, World};
use crate::scenario::{Fault, Scenario};

/// Names of the lookup kinds, in `LookupKind::index` order.
pub const KAD_KINDS: [&str; 4] = ["find_node", "get_record", "put_record", "target_get"];

/// One kind of DHT lookup.
pub type KadKind = &'static str;

#[derive(Default)]
pub(crate) struct KadAcc {
    pub(crate) lookups: u64,
    pub(crate) ok: u64,
    pub(crate) hops_sum: u64,
    pub(crate) latency_ms: Vec<f32>,
}

impl KadAcc {
    /// Counts one lookup; `hops` only where the tier can see them.
    pub(crate) fn add(&mut self, ok: bool, hops: u8, latency_us: u64) {
        self.lookups += 1;
        if ok {
            self.ok += 1;
            self.hops_sum += u64::from(hops);
            self.latency_ms.push((latency_us as f64 / 1_000.0) as f32);
        }
    }
}

/// The `dht_<kind>_*` figures of the summary, one set per [`KAD_KINDS`] entry: lookups, success
/// ratio, mean hops of the successful ones (NaN unless `hops_known`: libp2p does not report the
/// hops of a real node's lookup) and latency percentiles of the successful ones.
pub(crate) fn dht_figures(accs: &mut [KadAcc; 4], hops_known: bool, put: &mut impl FnMut(&str, f64)) {
    for (acc, name) in accs.iter_mut().zip(KAD_KINDS) {
        acc.latency_ms.sort_unstable_by(f32::total_cmp);
        put(&format!("dht_{name}_lookups"), acc.lookups as f64);
        put(&format!("dht_{name}_success"), ratio(acc.ok, acc.lookups));
        let hops = if hops_known {
            ratio(acc.hops_sum, acc.ok)
        } else {
            f64::NAN
        };
        put(&format!("dht_{name}_hops_mean"), hops);
        for p in [50.0, 90.0, 99.0] {
            put(
                &format!("dht_{name}_latency_ms_p{}", p as u32),
                percentile(&acc.latency_ms, p),
            );
        }
    }
}

/// A time-series point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub online_clients: u64,
    pub relays_up: u64,
    pub mailbox_total: u64,
    pub mailbox_max_relay: u64,
    pub outbox_pending: u64,
    pub messages_sent: u64,
    /// Connections a running host holds on average (Tier A only: the model
    /// has no connections).
    pub connections_per_host: Option<f64>,
    /// Connections opened since the start (Tier A only).
    pub connections_opened: Option<u64>,
    /// The process's resident memory, bytes (Tier A only, on Linux).
    pub rss_bytes: Option<u64>,
}

/// Deliveries by the time they were sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryBin {
    pub t_s: f64,
    pub sent: u64,
    pub on_time: u64,
    pub delivered: u64,
}

/// An invariant that did not hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
    pub time_s: f64,
}

/// (role, protocol or "total", (quantile, bytes) points).
pub type BytesQuantiles = (String, String, Vec<(f64, f64)>);

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub seed: u64,
    /// SHA-256 over the ordered trace (hex).
    pub trace_hash: String,
    pub events_written: u64,
    pub events_dropped: u64,
    /// (metric, value), in a fixed order.
    pub summary: Vec<(String, f64)>,
    pub samples: Vec<Sample>,
    pub delivery_bins: Vec<DeliveryBin>,
    /// Per path name (and "all"): (quantile, latency ms) points.
    pub latency_quantiles: Vec<(String, Vec<(f64, f64)>)>,
    /// Per (role, protocol or "total"): (quantile, bytes) points.
    pub bytes_quantiles: Vec<BytesQuantiles>,
    pub violations: Vec<Violation>,
    pub violation_count: u64,
}

impl RunResult {
    /// The summary as text (NaN-safe for comparing runs).
    pub fn summary_text(&self) -> String {
        self.summary.iter().map(|(k, v)| format!("{k},{v}\n")).collect()
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        self.summary.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// `a / b`, NaN when `b` is 0.
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { f64::NAN } else { a as f64 / b as f64 }
}

/// Nearest-rank percentile of sorted data.
pub(crate) fn percentile(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn quantiles(sorted: &[f32], points: usize) -> Vec<(f64, f64)> {
    if sorted.is_empty() {
        return Vec::new();
    }
    (0..=points)
        .map(|i| {
            let q = i as f64 / points as f64;
            let idx = ((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1);
            (q, f64::from(sorted[idx]))
        })
        .collect()
}

/// One kind of bytes over one role's nodes (`v`, a value per node): puts
/// `bytes_per_{role}_{what}_{mean,p99}` and adds its quantile curve (for the plot) to `curves`.
/// Returns the mean.
pub(crate) fn bytes_figures(
    role: &str,
    what: &str,
    mut v: Vec<f32>,
    put: &mut impl FnMut(&str, f64),
    curves: &mut Vec<BytesQuantiles>,
) -> f64 {
    v.sort_unstable_by(f32::total_cmp);
    let m = mean(&v);
    put(&format!("bytes_per_{role}_{what}_mean"), m);
    put(&format!("bytes_per_{role}_{what}_p99"), percentile(&v, 99.0));
    curves.push((role.to_string(), what.to_string(), quantiles(&v, 100)));
    m
}

fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64
    }
}

/// One message to one recipient, as either tier saw it (times in µs, [`NEVER`] for "not").
#[derive(Debug, Clone, Copy)]
pub struct DeliveryRecord {
    pub sent: u64,
    /// When the recipient was first online at or after the sending.
    pub ready: u64,
    /// When the recipient showed it.
    pub delivered: u64,
    pub path: Option<Path>,
    /// The recipient went offline within the deadline after the delivery became ready.
    pub recipient_left: bool,
    /// The sender went offline before it held an ack for the message.
    pub sender_left: bool,
}

/// The figures of partition fault `fi` that both tiers report, from `(ready, delivered)` of every
/// delivery sent during the cut and when each delivery of the backlog at the `heal` (undelivered
/// then, both ends online) was delivered ([`NEVER`] if not).
pub(crate) fn partition_figures(
    fi: usize,
    deadline: u64,
    heal: u64,
    during: impl Iterator<Item = (u64, u64)>,
    backlog: &[u64],
    put: &mut impl FnMut(&str, f64),
) {
    let (mut sent, mut ok) = (0u64, 0u64);
    for (ready, delivered) in during {
        sent += 1;
        ok += u64::from(delivered != NEVER && ready != NEVER && delivered - ready <= deadline);
    }
    // How fast the backlog clears.
    let mut after: Vec<f32> = Vec::new();
    let mut within = 0u64;
    for &delivered in backlog.iter().filter(|d| **d != NEVER) {
        let s = delivered.saturating_sub(heal);
        within += u64::from(s <= deadline);
        after.push((s as f64 / 1e6) as f32);
    }
    after.sort_unstable_by(f32::total_cmp);
    put(&format!("fault{fi}_partition_sent"), sent as f64);
    put(
        &format!("fault{fi}_partition_delivery_ratio_within_deadline"),
        ratio(ok, sent),
    );
    put(&format!("fault{fi}_partition_backlog_at_heal"), backlog.len() as f64);
    put(
        &format!("fault{fi}_partition_backlog_delivered_within_deadline_of_heal"),
        ratio(within, backlog.len() as u64),
    );
    for q in [50.0, 90.0, 99.0] {
        put(
            &format!("fault{fi}_partition_backlog_cleared_s_p{}", q as u32),
            percentile(&after, q),
        );
    }
}

/// The delivery figures both tiers report: ratios within the deadline (of the recipient being
/// online, and of the sending), latency percentiles and shares by path. Returns deliveries by
/// the time they were sent and the sorted latencies (ms) by path.
pub fn delivery_figures(
    sc: &Scenario,
    end: u64,
    records: impl Iterator<Item = DeliveryRecord>,
    put: &mut impl FnMut(&str, f64),
) -> (Vec<DeliveryBin>, [Vec<f32>; 3]) {
    let deadline = sc.metrics.deadline.micros();
    let judged_until = end.saturating_sub(deadline);
    let (mut judged, mut on_time, mut by_end) = (0u64, 0u64, 0u64);
    let (mut judged_send, mut on_time_send, mut recipient_left, mut sender_left) = (0u64, 0u64, 0u64, 0u64);
    let mut lat: [Vec<f32>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let bin_w = sc.metrics.sample_every.micros().max(1);
    let mut bins: Vec<DeliveryBin> = (0..=end / bin_w)
        .map(|i| DeliveryBin {
            t_s: (i * bin_w) as f64 / 1e6,
            sent: 0,
            on_time: 0,
            delivered: 0,
        })
        .collect();
    for d in records {
        let delivered = d.delivered != NEVER;
        // On time: within the deadline of the recipient being online (at or after the sending).
        let in_time = delivered && d.ready != NEVER && d.delivered.saturating_sub(d.ready) <= deadline;
        if let Some(b) = bins.get_mut((d.sent / bin_w) as usize) {
            b.sent += 1;
            b.on_time += u64::from(in_time);
            b.delivered += u64::from(delivered);
        }
        recipient_left += u64::from(d.recipient_left);
        sender_left += u64::from(d.sender_left);
        if d.ready <= judged_until && !(d.recipient_left || d.sender_left) {
            judged += 1;
            on_time += u64::from(in_time);
            by_end += u64::from(delivered);
        }
        if d.sent <= judged_until {
            judged_send += 1;
            on_time_send += u64::from(delivered && d.delivered.saturating_sub(d.sent) <= deadline);
        }
        if delivered && let Some(p) = d.path {
            lat[p as usize].push((d.delivered.saturating_sub(d.sent) as f64 / 1_000.0) as f32);
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    put("deliveries_judged", judged as f64);
    put("deliveries_recipient_left_within_deadline", recipient_left as f64);
    put("deliveries_sender_left_before_ack", sender_left as f64);
    put("delivery_ratio_within_deadline", ratio(on_time, judged));
    put("delivery_ratio_by_end", ratio(by_end, judged));
    put(
        "delivery_ratio_within_deadline_of_send",
        ratio(on_time_send, judged_send),
    );
    put("deadline_s", deadline as f64 / 1e6);
    if let Some(target) = sc.metrics.expect_delivery_ratio {
        put("delivery_target", target);
        put(
            "delivery_target_met",
            f64::from(u8::from(ratio(on_time, judged) >= target)),
        );
    }
    for v in &mut lat {
        v.sort_unstable_by(f32::total_cmp);
    }
    let mut all: Vec<f32> = lat.iter().flatten().copied().collect();
    all.sort_unstable_by(f32::total_cmp);
    let delivered_total = all.len().max(1) as f64;
    for (name, v) in [
        ("all", &all),
        ("direct", &lat[0]),
        ("relayed", &lat[1]),
        ("mailbox", &lat[2]),
    ] {
        for p in [50.0, 90.0, 99.0] {
            put(&format!("latency_ms_p{}_{name}", p as u32), percentile(v, p));
        }
        if name != "all" {
            put(&format!("path_share_{name}"), v.len() as f64 / delivered_total);
        }
    }
    (bins, lat)
}

/// Latency quantile curves (all, and by path) for the plots.
pub fn latency_curves(all: &[f32], lat: &[Vec<f32>; 3]) -> Vec<(String, Vec<(f64, f64)>)> {
    [
        ("all", all),
        ("direct", &lat[0][..]),
        ("relayed", &lat[1][..]),
        ("mailbox", &lat[2][..]),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), quantiles(v, 200)))
    .collect()
}

pub(super) fn build(mut w: World<'_>) -> Result<RunResult, std::io::Error> {
    let sc = w.sc;
    let end = w.end;
    // Close the books on clients still online.
    for ci in 0..w.clients.len() {
        let node = w.clients[ci].node;
        if w.nodes[node as usize].online {
            let online_for = end - w.clients[ci].online_since;
            w.clients[ci].online_total += online_for;
            w.count_poll_bytes(ci, online_for);
        }
    }
    let mut s: Vec<(String, f64)> = Vec::new();
    let mut put = |name: &str, v: f64| s.push((name.to_string(), v));
    let sybils = w.nodes.iter().filter(|n| n.role == NodeRole::Sybil).count();
    put("nodes", w.nodes.len() as f64);
    put("relays", w.relays.len() as f64);
    put("clients", w.clients.len() as f64);
    put("sybils", sybils as f64);
    put("dht_servers", w.kad.server_count() as f64);
    put("groups", w.groups.len() as f64);
    put("duration_s", end as f64 / 1e6);
    put("events_processed", w.c.events as f64);
    put("event_queue_peak", w.q.peak() as f64);
    put("kad_table_builds", w.kad.table_builds as f64);
    put("messages_sent", w.msgs.len() as f64);
    put("deliveries", w.deliveries.len() as f64);

    // Delivery ratio and latency.
    let records = w.deliveries.iter().map(|d| DeliveryRecord {
        sent: w.msgs[d.msg as usize].sent,
        ready: d.ready,
        delivered: d.delivered,
        path: Path::from_u8(d.path),
        recipient_left: d.flags & super::flag::RECIPIENT_LEFT != 0,
        sender_left: d.flags & super::flag::SENDER_LEFT != 0,
    });
    let (bins, lat) = delivery_figures(sc, end, records, &mut put);
    let mut all: Vec<f32> = lat.iter().flatten().copied().collect();
    all.sort_unstable_by(f32::total_cmp);
    let deadline = sc.metrics.deadline.micros();
    put("lost_acked_excused", w.c.lost_excused as f64);
    put("lost_expired", w.c.lost_expired as f64);
    put("outbox_overflow", w.c.outbox_overflow as f64);
    put("invariant_violations", w.checks.count as f64);

    // Partitions: delivery of what was sent during the cut, and how fast the backlog clears.
    for (fi, f) in sc.faults.iter().enumerate() {
        let Fault::Partition(_) = f else { continue };
        let p = &w.parts[w.part_of_fault[fi] as usize];
        let (start, heal) = (p.start, p.heal.min(end));
        let during = w.deliveries.iter().filter_map(|d| {
            let t = w.msgs[d.msg as usize].sent;
            (start <= t && t < heal).then_some((d.ready, d.delivered))
        });
        let backlog: Vec<u64> = p.backlog.iter().map(|d| w.deliveries[*d as usize].delivered).collect();
        partition_figures(fi, deadline, heal, during, &backlog, &mut put);
    }

    dht_figures(&mut w.c.kad, true, &mut put);

    // Bytes per node.
    let hours = end as f64 / 3.6e9;
    let mut bytes_q = Vec::new();
    for (role, is_role) in [
        (
            "client",
            (|r: NodeRole| matches!(r, NodeRole::Client(_))) as fn(NodeRole) -> bool,
        ),
        ("relay", |r: NodeRole| matches!(r, NodeRole::Relay(_))),
    ] {
        let nodes: Vec<&super::Node> = w.nodes.iter().filter(|n| is_role(n.role)).collect();
        for proto in Proto::ALL {
            let v = nodes.iter().map(|n| n.bytes[proto as usize] as f32).collect();
            bytes_figures(role, proto.name(), v, &mut put, &mut bytes_q);
        }
        let totals = nodes.iter().map(|n| n.bytes.iter().sum::<u64>() as f32).collect();
        let total = bytes_figures(role, "total", totals, &mut put, &mut bytes_q);
        put(
            &format!("bytes_per_{role}_total_per_hour_mean"),
            total / hours.max(1e-9),
        );
    }

    // Mailboxes.
    let occ: Vec<f32> = w.c.samples.iter().map(|x| x.mailbox_total as f32).collect();
    put("mailbox_occupancy_mean", mean(&occ));
    put(
        "mailbox_occupancy_peak",
        w.c.samples.iter().map(|x| x.mailbox_total).max().unwrap_or(0) as f64,
    );
    put(
        "mailbox_max_relay_peak",
        w.c.samples.iter().map(|x| x.mailbox_max_relay).max().unwrap_or(0) as f64,
    );
    w.c.drains_ms.sort_unstable_by(f32::total_cmp);
    put("reconnects", w.c.reconnects as f64);
    put("reconnects_with_mail", w.c.reconnects_with_mail as f64);
    for p in [50.0, 90.0, 99.0] {
        put(
            &format!("reconnect_to_drained_ms_p{}", p as u32),
            percentile(&w.c.drains_ms, p),
        );
    }

    // Churn.
    let churners: Vec<&super::Client> = w.clients.iter().filter(|c| c.churns).collect();
    if !churners.is_empty() {
        let online: f64 = churners.iter().map(|c| c.online_total as f64).sum();
        put(
            "offline_fraction_measured",
            1.0 - online / (churners.len() as f64 * end as f64),
        );
        put(
            "offline_fraction_expected",
            sc.churn.as_ref().map_or(0.0, |c| c.offline_fraction()),
        );
    }
    put(
        "kad_mitigation_on",
        f64::from(u8::from(w.kad.mitigation() != crate::scenario::Mitigation::None)),
    );

    let latency_quantiles = latency_curves(&all, &lat);
    let (trace_hash, events_written, events_dropped) = w.rec.finish()?;
    Ok(RunResult {
        seed: w.seed,
        trace_hash,
        events_written,
        events_dropped,
        summary: s,
        samples: std::mem::take(&mut w.c.samples),
        delivery_bins: bins,
        latency_quantiles,
        bytes_quantiles: bytes_q,
        violation_count: w.checks.count,
        violations: std::mem::take(&mut w.checks.violations),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
