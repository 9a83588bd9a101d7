//! The process's resident memory, read from `/proc/self/status` (Linux). Tier A reports it per
//! node: most of a real node's cost is memory. Elsewhere every reading is `None`.

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};

/// The highest peak of the phases closed by [`close_phase`] since the last [`reset_peak`].
static CLOSED_PHASES_PEAK: AtomicU64 = AtomicU64::new(0);

/// The highest [`resident_bytes`] read in the current phase. A reading can be above the kernel's
/// `VmHWM` (seen once in CI, by 0.15 MiB; most likely a peak that jemalloc gave back with
/// `madvise` before the kernel next updated its mark), so the peaks count the readings too.
static PHASE_READ_PEAK: AtomicU64 = AtomicU64::new(0);

/// `bytes` in MiB, as the outputs report memory.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident set size now, in bytes (`VmRSS`). Counts in the peaks.
pub fn resident_bytes() -> Option<u64> {
    let now = status_field("VmRSS:")?;
    PHASE_READ_PEAK.fetch_max(now, Ordering::Relaxed);
    Some(now)
}

/// The highest resident set size since the start or the last [`reset_peak`], in bytes: the
/// kernel's `VmHWM`, or the peak of a phase closed before it, if higher.
pub fn peak_bytes() -> Option<u64> {
    let hwm = phase_peak_bytes()?;
    Some(hwm.max(CLOSED_PHASES_PEAK.load(Ordering::Relaxed)))
}

/// The highest resident set size since the last [`reset_peak`] or [`close_phase`], in bytes
/// (`VmHWM`, or the highest [`resident_bytes`] read since, if higher).
pub fn phase_peak_bytes() -> Option<u64> {
    let hwm = status_field("VmHWM:")?;
    Some(hwm.max(PHASE_READ_PEAK.load(Ordering::Relaxed)))
}

/// Starts the peak over from the current resident size, so that one run's peak does not include
/// an earlier run's in the same process (`calibrate` runs several). Best effort: a kernel that
/// refuses leaves the peak as it was.
pub fn reset_peak() {
    CLOSED_PHASES_PEAK.store(0, Ordering::Relaxed);
    clear_hwm();
}

/// Ends a phase of the run: returns its peak ([`phase_peak_bytes`]) and starts the next phase's
/// from the current resident size, while [`peak_bytes`] keeps counting both. Tier A closes its
/// set-up this way, when every client has run at once. Best effort, as [`reset_peak`]: where the
/// kernel refuses, the next phase's peak includes this one's.
pub fn close_phase() -> Option<u64> {
    let peak = phase_peak_bytes()?;
    CLOSED_PHASES_PEAK.fetch_max(peak, Ordering::Relaxed);
    clear_hwm();
    Some(peak)
}

fn clear_hwm() {
    PHASE_READ_PEAK.store(0, Ordering::Relaxed);
    let _ = fs::write("/proc/self/clear_refs", "5");
}

fn status_field(name: &str) -> Option<u64> {
    parse_kib(&fs::read_to_string("/proc/self/status").ok()?, name)
}

/// The value of a `name   123 kB` line, in bytes.
fn parse_kib(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_line_in_kib_is_read_in_bytes() {
        let status = "Name:\ttidings-sim\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_kib(status, "VmRSS:"), Some(1024 * 1024));
        assert_eq!(parse_kib(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(parse_kib(status, "VmSwap:"), None);
        assert_eq!(parse_kib("VmRSS:\tmany kB\n", "VmRSS:"), None);
        assert_eq!(parse_kib("VmRSS:\t12 MB\n", "VmRSS:"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_size_and_a_peak_at_least_as_high() {
        let now = resident_bytes().expect("VmRSS on Linux");
        let peak = peak_bytes().expect("VmHWM on Linux");
        assert!(now > 0);
        assert!(peak >= now);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_reading_counts_in_the_peak() {
        // Only the whole peak: another test closing a phase meanwhile starts the phase's over.
        let read = resident_bytes().expect("VmRSS on Linux");
        assert!(peak_bytes().expect("VmHWM on Linux") >= read);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_closed_phase_still_counts_in_the_peak() {
        // A phase that touched 64 MiB, then freed it: the next phase starts lower, the whole
        // peak stays at least as high as the closed phase's.
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        drop(big);
        let first = close_phase().expect("VmHWM on Linux");
        let next = phase_peak_bytes().expect("VmHWM on Linux");
        assert!(peak_bytes().expect("VmHWM on Linux") >= first);
        assert!(peak_bytes().expect("VmHWM on Linux") >= next);
    }
}
