//! The binary's global allocator: mimalloc, which keeps freed pages for reuse (glibc returns
//! every block over 32 MiB to the kernel, so each training step would page-fault its
//! (B × M) buffers afresh), wrapped to track live and peak heap bytes for benchmarks.
//! Elsewhere (library users, tests) the counters stay at 0.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc as System;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct PeakTrackingAllocator;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for PeakTrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grow(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Starts a new peak measurement from the current live size.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Peak live heap bytes since the last `reset_peak` (0 when the allocator is not installed).
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

pub fn current_bytes() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// True when the binary installed the tracking allocator.
pub fn is_tracking() -> bool {
    current_bytes() > 0
}

/// Sets mimalloc's options for this workload; an option's `MIMALLOC_…` variable in the
/// environment wins over the value set here.
///
/// - Freed pages are kept instead of returned to the kernel (`MIMALLOC_PURGE_DELAY`), so a
///   training step's large buffers are reused instead of page-faulted anew every step (28k → 1k
///   minor faults over a 5-step benchmark).
/// - No transparent huge pages (`MIMALLOC_ALLOW_THP`). On VMs that hand freed memory back to
///   the host (virtio-balloon free page reporting), the first touch of every fresh 2 MiB page
///   faults on the host too: 2 GiB took 21–26 s to touch where 4 KiB pages took 0.7 s. That
///   made a ResNet-50 or CLIP finetuning benchmark process 25–33 s instead of 9–11 s. What huge
///   pages gain once faulted in is small: at most ≈ 5 % of an SAE step, nothing measurable in a
///   finetuning step. Where first touches are cheap, `MIMALLOC_ALLOW_THP=1` turns them back on.
pub fn configure_allocator() {
    // `mi_option_purge_delay` and `mi_option_allow_thp` in mimalloc v3's `mi_option_e`
    // (libmimalloc-sys 0.1.49, pinned).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
    for (option, variable, value) in [
        (MI_OPTION_PURGE_DELAY, "MIMALLOC_PURGE_DELAY", -1),
        (MI_OPTION_ALLOW_THP, "MIMALLOC_ALLOW_THP", 0),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: sets a process-wide allocator option; valid at any time.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}
