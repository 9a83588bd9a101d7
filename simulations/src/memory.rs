//! The process's resident memory, read from `/proc/self/status` (Linux). Tier A reports it per
//! node: most of a real node's cost is memory. Elsewhere every reading is `None`.

use std::fs;

/// `bytes` in MiB, as the outputs report memory.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident set size now, in bytes (`VmRSS`).
pub fn resident_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

/// The highest resident set size since the start or the last [`reset_peak`], in bytes (`VmHWM`).
pub fn peak_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Starts the peak over from the current resident size, so that one run's peak does not include
/// an earlier run's in the same process (`calibrate` runs several). Best effort: a kernel that
/// refuses leaves the peak as it was.
pub fn reset_peak() {
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
}
