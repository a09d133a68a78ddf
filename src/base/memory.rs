//! Memory of one phase of work, for benchmarks: the peak of live heap bytes (the binary's
//! tracking allocator) and, on Linux, the peak resident set size and its parts at the phase's
//! end (/proc/self/status). Resident size counts mapped file pages (a feature store's shards);
//! those are page cache the kernel can drop at any time, so heap and anonymous memory are what
//! a run really holds.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::alloc;

/// What a phase used, in bytes (None where the platform does not say).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PhaseMemory {
    /// Peak live heap since the phase began (0 when the tracking allocator is not installed).
    pub peak_heap: usize,
    /// Peak resident set size (VmHWM) since the phase began.
    pub peak_rss: Option<usize>,
    /// Anonymous resident memory at the phase's end (heap, stacks, runtime).
    pub rss_anon: Option<usize>,
    /// Resident mapped file pages at the phase's end.
    pub rss_file: Option<usize>,
}

/// Starts a phase: resets the heap peak and, where the kernel allows, the resident-size peak.
pub fn begin_phase() {
    alloc::reset_peak();
    // "5" resets VmHWM to the current resident size (Linux ≥ 4.0); elsewhere the write fails and
    // the peak then covers the process's whole life, which the report says via peak_rss = None.
    let resets = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    RSS_PEAK_RESETS.store(resets, Ordering::Relaxed);
}

/// What the phase begun by the last `begin_phase` used so far.
pub fn phase_memory() -> PhaseMemory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| status_kib(&status, name).map(|kib| kib * 1024);
    let resets = RSS_PEAK_RESETS.load(Ordering::Relaxed);
    PhaseMemory {
        peak_heap: alloc::peak_bytes(),
        peak_rss: field("VmHWM").filter(|_| resets),
        rss_anon: field("RssAnon"),
        rss_file: field("RssFile"),
    }
}

/// Whether the last `begin_phase` could reset the resident-size peak.
static RSS_PEAK_RESETS: AtomicBool = AtomicBool::new(false);

/// A "Name:   123 kB" line of /proc/self/status, in KiB.
fn status_kib(status: &str, name: &str) -> Option<usize> {
    let line = status.lines().find(|l| l.split(':').next() == Some(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Memory the system can give without swapping (MemAvailable), where the platform says.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    status_kib(&meminfo, "MemAvailable").map(|kib| kib as u64 * 1024)
}

/// Bytes as MiB with one decimal, "-" when unknown.
pub fn mib(bytes: Option<usize>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_fields_in_kib() {
        let status = "Name:\tmono\nVmHWM:\t  204800 kB\nRssAnon:\t   1024 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(204800));
        assert_eq!(status_kib(status, "RssAnon"), Some(1024));
        assert_eq!(status_kib(status, "RssFile"), None);
        assert_eq!(mib(Some(3 << 20)), "3.0");
        assert_eq!(mib(None), "-");
    }
}
