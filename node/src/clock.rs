//! Injected wall-clock time.
//!
//! The node reads the time only through a [`Clock`], so tests and the simulator
//! can run it on a clock of their own. Timers use tokio's clock, which the
//! simulator pauses and advances.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, from the system or from a test.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Self(Arc::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        }))
    }

    /// A clock that returns whatever `time` holds.
    pub fn manual(time: Arc<AtomicU64>) -> Self {
        Self(Arc::new(move || time.load(Ordering::Relaxed)))
    }

    /// Wall time that follows tokio's clock from `start_ms` on: virtual time
    /// when the clock is paused (the simulator), real time otherwise.
    pub fn tokio(start_ms: u64) -> Self {
        let base = tokio::time::Instant::now();
        Self(Arc::new(move || {
            start_ms.saturating_add(u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX))
        }))
    }

    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now_ms())
    }
}
