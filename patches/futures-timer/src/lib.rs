//! A stand-in for `futures-timer` 3.0.3, patched into the workspace
//! (`[patch.crates-io]` in the root `Cargo.toml`).
//!
//! The original crate runs its own timer thread on the wall clock. libp2p
//! uses its `Delay` for request timeouts, idle connections, pings, Kademlia
//! queries and more. Here `Delay` is a [`tokio::time::Sleep`], so every libp2p
//! timer follows tokio's clock: the real clock in a running node, and the
//! virtual clock when the simulator pauses time (`tokio::time::pause`) and
//! lets it jump from one timer to the next. The API is the original's:
//! `Delay::new`, `Delay::reset` and `Future<Output = ()>`.
//!
//! A `Delay` must be created and polled inside a tokio runtime with its time
//! driver enabled; every Tidings binary and test runs libp2p that way.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// A future that completes once its duration has passed on tokio's clock.
#[derive(Debug)]
pub struct Delay {
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Delay {
    /// A delay that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        Delay {
            sleep: Box::pin(tokio::time::sleep(dur)),
        }
    }

    /// Restarts the delay: it completes `dur` from now.
    pub fn reset(&mut self, dur: Duration) {
        self.sleep.as_mut().reset(tokio::time::Instant::now() + dur);
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.sleep.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_delay_follows_the_paused_clock_and_can_be_reset() {
        let start = tokio::time::Instant::now();
        Delay::new(Duration::from_secs(3600)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3600),
            "virtual time jumped to the deadline"
        );
        let mut d = Delay::new(Duration::from_secs(10));
        d.reset(Duration::from_secs(20));
        d.await;
        assert_eq!(start.elapsed(), Duration::from_secs(3620));
    }
}
