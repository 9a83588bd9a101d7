//! A stand-in for `web-time` 1.1.0, patched into the workspace
//! (`[patch.crates-io]` in the root `Cargo.toml`).
//!
//! libp2p (Kademlia's query and per-peer timeouts, its bucket replacement
//! timer and record expiry, the swarm's idle-connection deadline, the relay's
//! rate limiter, ping's round trips) and yamux (its round-trip measurement,
//! which sizes stream windows) read the time through `web_time::Instant`,
//! which off the web is `std::time::Instant`: the wall clock. Their timers
//! already follow tokio's clock (see the `futures-timer` patch); their
//! readings did not, so in the simulator, where an hour of virtual time may
//! take minutes or hours of wall time, a lookup timed out after 20 seconds of
//! the machine's time, however much virtual time had passed.
//!
//! Here `Instant` is [`tokio::time::Instant`]: the real monotonic clock in a
//! running node (and outside any runtime), and the virtual clock when the
//! simulator pauses time. `SystemTime` stays the system's: libp2p uses it
//! only for peer-record sequence numbers and for the relay's reservation
//! expiry, which the client turns back into a duration against its own
//! `SystemTime`, so the two readings cancel out.

pub use std::time::{Duration, SystemTime, SystemTimeError, TryFromFloatSecsError, UNIX_EPOCH};
pub use tokio::time::Instant;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn instants_follow_the_paused_clock_not_the_wall() {
        let start = Instant::now();
        let wall = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3600));
        assert!(
            wall.elapsed() < Duration::from_secs(60),
            "an hour of virtual time is not an hour here"
        );
    }

    #[test]
    fn outside_a_runtime_instants_are_the_machines() {
        let a = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(a.elapsed() >= Duration::from_millis(5));
    }
}
