//! tidings-sim: the Tidings network simulator.
//!
//! Researchers describe a network in a TOML [`scenario`] (population, latency, churn, workload,
//! faults, adversaries, metrics, sweeps) and run it. Two tiers read the same files:
//!
//! - **Tier A** ([`tiera`]) runs the real node — libp2p, MLS, mailboxes, the store — for every
//!   host, in one process on tokio's paused clock, over a simulated network.
//! - **Tier B** ([`tierb`]) is a deterministic discrete-event model of the same protocols
//!   (Kademlia, relay mailboxes with custody receipts, direct/relayed/mailbox delivery, churn,
//!   faults, adversaries) for 100k+ nodes.
//!
//! A run writes a manifest, an event trace, a CSV summary and SVG plots ([`output`], [`plot`]);
//! [`sweep`] expands a scenario's sweep into runs, shards them across machines and merges the
//! results with confidence intervals; [`calibrate`] compares the tiers on the same scenario. The `tidings-sim` binary is the command line for all of it.

pub mod calibrate;
pub mod memory;
pub mod output;
pub mod plot;
pub mod rng;
pub mod scenario;
pub mod sweep;
pub mod tiera;
pub mod tierb;
pub mod trace;

/// The tool's version, recorded in every manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
