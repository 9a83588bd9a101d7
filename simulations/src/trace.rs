//! The trace of a run: every observable event, hashed in order (SHA-256 over a fixed binary
//! encoding) into the trace hash, and written to `events.jsonl` in full or for a sample of nodes,
//! up to a cap.

use std::io::{self, BufWriter, Write};

use sha2::{Digest, Sha256};

use crate::scenario::{EventsMode, Scenario};
use crate::tierb::Path;

/// What the trace records.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceEvent {
    Up {
        node: u32,
    },
    Down {
        node: u32,
        silent: bool,
    },
    Sent {
        msg: u32,
        from: u32,
        to: u32,
        group: bool,
        size: u32,
    },
    Delivered {
        delivery: u32,
        node: u32,
        path: Path,
    },
    Lookup {
        kind: u8,
        origin: u32,
        ok: bool,
        hops: u8,
        latency_us: u64,
    },
    Fault {
        index: u32,
        start: bool,
    },
    RelayBack {
        node: u32,
    },
    Lost {
        delivery: u32,
        cause: &'static str,
    },
    Violation {
        invariant: &'static str,
    },
}

const LOOKUP_NAMES: [&str; 4] = crate::tierb::KAD_KINDS;

/// Hashes every event and writes the selected ones.
pub struct Recorder<'a> {
    hasher: Sha256,
    buf: Vec<u8>,
    out: Option<BufWriter<Box<dyn Write + 'a>>>,
    mode: EventsMode,
    threshold: u64,
    mix: u64,
    max: u64,
    written: u64,
    dropped: u64,
    error: Option<io::Error>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl<'a> Recorder<'a> {
    pub fn new(sc: &Scenario, seed: u64, out: Option<Box<dyn Write + 'a>>) -> Self {
        let m = &sc.metrics;
        Recorder {
            hasher: Sha256::new(),
            buf: Vec::with_capacity(1 << 16),
            out: out.map(|o| BufWriter::with_capacity(1 << 16, o)),
            mode: m.events,
            threshold: (m.event_sample * u64::MAX as f64) as u64,
            mix: splitmix(seed),
            max: m.max_events,
            written: 0,
            dropped: 0,
            error: None,
        }
    }

    fn sampled(&self, node: u32) -> bool {
        match self.mode {
            EventsMode::Full => true,
            EventsMode::None => false,
            EventsMode::Sampled => splitmix(u64::from(node) ^ self.mix) <= self.threshold,
        }
    }

    pub fn record(&mut self, t: u64, ev: &TraceEvent) {
        self.encode(t, ev);
        if self.out.is_none() || self.mode == EventsMode::None {
            return;
        }
        let keep = match ev {
            TraceEvent::Up { node } | TraceEvent::Down { node, .. } | TraceEvent::RelayBack { node } => {
                self.sampled(*node)
            }
            TraceEvent::Sent { from, to, group, .. } => self.sampled(*from) || (!group && self.sampled(*to)),
            TraceEvent::Delivered { node, .. } => self.sampled(*node),
            TraceEvent::Lookup { origin, .. } => self.sampled(*origin),
            TraceEvent::Fault { .. } | TraceEvent::Lost { .. } | TraceEvent::Violation { .. } => true,
        };
        if !keep {
            return;
        }
        if self.written >= self.max {
            self.dropped += 1;
            return;
        }
        self.written += 1;
        let secs = t as f64 / 1e6;
        let Some(out) = self.out.as_mut() else { return };
        let r = match ev {
            TraceEvent::Up { node } => writeln!(out, r#"{{"t":{secs:.6},"ev":"up","node":{node}}}"#),
            TraceEvent::Down { node, silent } => {
                writeln!(out, r#"{{"t":{secs:.6},"ev":"down","node":{node},"silent":{silent}}}"#)
            }
            TraceEvent::Sent {
                msg,
                from,
                to,
                group,
                size,
            } => {
                let field = if *group { "group" } else { "to" };
                writeln!(
                    out,
                    r#"{{"t":{secs:.6},"ev":"sent","msg":{msg},"from":{from},"{field}":{to},"bytes":{size}}}"#
                )
            }
            TraceEvent::Delivered { delivery, node, path } => writeln!(
                out,
                r#"{{"t":{secs:.6},"ev":"delivered","delivery":{delivery},"node":{node},"path":"{}"}}"#,
                path.name()
            ),
            TraceEvent::Lookup {
                kind,
                origin,
                ok,
                hops,
                latency_us,
            } => writeln!(
                out,
                r#"{{"t":{secs:.6},"ev":"lookup","kind":"{}","origin":{origin},"ok":{ok},"hops":{hops},"latency_ms":{:.3}}}"#,
                LOOKUP_NAMES.get(usize::from(*kind)).unwrap_or(&"?"),
                *latency_us as f64 / 1e3
            ),
            TraceEvent::Fault { index, start } => {
                let what = if *start { "fault" } else { "heal" };
                writeln!(out, r#"{{"t":{secs:.6},"ev":"{what}","fault":{index}}}"#)
            }
            TraceEvent::RelayBack { node } => writeln!(out, r#"{{"t":{secs:.6},"ev":"relay_back","node":{node}}}"#),
            TraceEvent::Lost { delivery, cause } => {
                writeln!(
                    out,
                    r#"{{"t":{secs:.6},"ev":"lost","delivery":{delivery},"cause":"{cause}"}}"#
                )
            }
            TraceEvent::Violation { invariant } => {
                writeln!(out, r#"{{"t":{secs:.6},"ev":"violation","invariant":"{invariant}"}}"#)
            }
        };
        if let Err(e) = r
            && self.error.is_none()
        {
            self.error = Some(e);
        }
    }

    fn encode(&mut self, t: u64, ev: &TraceEvent) {
        let b = &mut self.buf;
        b.extend_from_slice(&t.to_le_bytes());
        let mut put = |tag: u8, words: &[u64]| {
            b.push(tag);
            for w in words {
                b.extend_from_slice(&w.to_le_bytes());
            }
        };
        match ev {
            TraceEvent::Up { node } => put(1, &[u64::from(*node)]),
            TraceEvent::Down { node, silent } => put(2, &[u64::from(*node), u64::from(*silent)]),
            TraceEvent::Sent {
                msg,
                from,
                to,
                group,
                size,
            } => put(
                3,
                &[
                    u64::from(*msg),
                    u64::from(*from),
                    u64::from(*to),
                    u64::from(*group),
                    u64::from(*size),
                ],
            ),
            TraceEvent::Delivered { delivery, node, path } => {
                put(4, &[u64::from(*delivery), u64::from(*node), *path as u64])
            }
            TraceEvent::Lookup {
                kind,
                origin,
                ok,
                hops,
                latency_us,
            } => put(
                5,
                &[
                    u64::from(*kind),
                    u64::from(*origin),
                    u64::from(*ok),
                    u64::from(*hops),
                    *latency_us,
                ],
            ),
            TraceEvent::Fault { index, start } => put(6, &[u64::from(*index), u64::from(*start)]),
            TraceEvent::RelayBack { node } => put(7, &[u64::from(*node)]),
            TraceEvent::Lost { delivery, cause } => {
                put(8, &[u64::from(*delivery)]);
                b.extend_from_slice(cause.as_bytes());
            }
            TraceEvent::Violation { invariant } => {
                put(9, &[]);
                b.extend_from_slice(invariant.as_bytes());
            }
        }
        if self.buf.len() >= 1 << 16 {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
    }

    /// The trace hash (hex), lines written, lines left out by the cap.
    pub fn finish(mut self) -> io::Result<(String, u64, u64)> {
        self.hasher.update(&self.buf);
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        Ok((hex::encode(self.hasher.finalize()), self.written, self.dropped))
    }
}
