//! The process's resident memory, read from `/proc/self/status`, and its CPU time, from
//! `/proc/self/stat` (Linux). Tier A reports memory per node (most of a real node's cost is
//! memory) and the CPU time its set-up and its measured run took. Elsewhere every reading is
//! `None`.

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

/// The CPU time (user and system, all threads) the process has used so far, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    parse_cpu_seconds(&fs::read_to_string("/proc/self/stat").ok()?)
}

/// `utime` + `stime` of a `/proc/<pid>/stat` line, in seconds. Both count in the kernel's
/// `USER_HZ`, which is 100 on every Linux platform.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: fields are counted from the
    // last ')', after which field 3 (the state) comes first.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.checked_add(stime)? as f64 / 100.0)
}

/// Wall time and the process's CPU time from a start, read in laps.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    wall: std::time::Instant,
    cpu: Option<f64>,
}

impl Stopwatch {
    pub fn start() -> Self {
        Self {
            wall: std::time::Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    /// The wall time and CPU seconds (`None` where the CPU time cannot be read) since the start
    /// or the last lap; the next lap counts from now.
    pub fn lap(&mut self) -> (std::time::Duration, Option<f64>) {
        let now = Self::start();
        let taken = (
            now.wall.saturating_duration_since(self.wall),
            now.cpu.zip(self.cpu).map(|(now, then)| now - then),
        );
        *self = now;
        taken
    }
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

    #[test]
    fn cpu_time_is_user_plus_system_ticks_counted_after_the_command_name() {
        // Fields 14 and 15 (utime, stime) are 250 and 50 ticks; the name holds ") 9 9".
        let stat = "4242 (sim ) 9 9) R 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.0));
        assert_eq!(parse_cpu_seconds("4242 (sim) R 1 2"), None);
        assert_eq!(parse_cpu_seconds("no parenthesis"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_cpu_time_grows_while_it_computes() {
        let before = cpu_seconds().expect("/proc/self/stat on Linux");
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        let mut now = before;
        while now <= before && wall.elapsed() < std::time::Duration::from_secs(20) {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            now = cpu_seconds().expect("/proc/self/stat on Linux");
        }
        assert!(now > before, "no CPU time counted in 20 s of computing ({x})");
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
