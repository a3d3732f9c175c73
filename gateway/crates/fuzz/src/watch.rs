//! Runaway allocations and hangs, caught and reproducible.
//!
//! [`Counting`] is a global allocator (the system one, counted) that the fuzzing binaries and
//! the fuzz test install. It tracks the bytes live and the peak since [`reset_peak`], so the
//! runner can refuse an input whose peak went past [`PER_INPUT_LIMIT`]; past
//! [`HARD_LIMIT`] it fails the allocation, which aborts the process before the machine
//! swaps. A watchdog thread aborts an input that runs past [`HANG_LIMIT`]. Before either
//! abort, the input being run is written to the file [`arm`] opened, with no allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Peak live bytes one input may reach above what was live before it.
pub const PER_INPUT_LIMIT: usize = 512 << 20;

/// Live bytes at which allocations fail (and the process aborts).
pub const HARD_LIMIT: usize = 3 << 30;

/// How long one input may run before the watchdog aborts the process.
pub const HANG_LIMIT: Duration = Duration::from_secs(60);

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The running input's address and length (0, 0 when none), set together.
static INPUT: Mutex<(usize, usize)> = Mutex::new((0, 0));
/// Milliseconds since [`origin`] when the current input started, plus one; 0 when idle.
static STARTED: AtomicU64 = AtomicU64::new(0);
static DUMP: Mutex<Option<File>> = Mutex::new(None);

/// The system allocator, counted (see the module docs).
pub struct Counting;

// SAFETY: every call is forwarded to `System` with the same layout; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !reserve(new_size - old) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Ordering::Relaxed);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Ordering::Relaxed);
        }
        p
    }
}

/// Counts `n` more live bytes; false (and a dump of the input) past [`HARD_LIMIT`].
fn reserve(n: usize) -> bool {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    if live > HARD_LIMIT {
        LIVE.fetch_sub(n, Ordering::Relaxed);
        dump(b"gateway-fuzz: an allocation would take live memory past the hard limit; the input is saved (see the runner's message before the abort)\n");
        return false;
    }
    PEAK.fetch_max(live, Ordering::Relaxed);
    true
}

/// Bytes live now (0 unless [`Counting`] is the global allocator).
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Starts a new peak from what is live now; returns it.
pub fn reset_peak() -> usize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The peak of live bytes since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Opens `path` as the file an abort writes the current input to, and starts the watchdog.
pub fn arm(path: &std::path::Path) -> std::io::Result<()> {
    let file = File::create(path)?;
    *DUMP.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    static WATCHDOG: OnceLock<()> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let _ = origin();
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(250));
                let started = STARTED.load(Ordering::Relaxed);
                if started == 0 {
                    continue;
                }
                let now = origin().elapsed().as_millis() as u64 + 1;
                if now.saturating_sub(started) > HANG_LIMIT.as_millis() as u64 {
                    dump(b"gateway-fuzz: an input ran past the hang limit; it is saved (see the runner's message)\n");
                    std::process::abort();
                }
            })
            .expect("starting the fuzz watchdog");
    });
    Ok(())
}

/// Closes the file [`arm`] opened (an abort then writes nowhere).
pub fn disarm() {
    *DUMP.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Marks `input` as the one running (until [`finished`] with the same input). With runs on
/// several threads, the latest one is watched.
pub fn running(input: &[u8]) {
    *INPUT.lock().unwrap_or_else(|e| e.into_inner()) = (input.as_ptr() as usize, input.len());
    STARTED.store(origin().elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
}

/// Marks `input` as done; it must still be alive when this is called.
pub fn finished(input: &[u8]) {
    let mut current = INPUT.lock().unwrap_or_else(|e| e.into_inner());
    if current.0 == input.as_ptr() as usize {
        *current = (0, 0);
        STARTED.store(0, Ordering::Relaxed);
    }
}

/// Writes the running input to the armed file and `message` to stderr, allocating nothing.
fn dump(message: &[u8]) {
    let _ = std::io::stderr().write_all(message);
    let Ok(mut guard) = DUMP.try_lock() else {
        return;
    };
    let Some(file) = guard.as_mut() else {
        return;
    };
    let Ok(current) = INPUT.try_lock() else {
        return;
    };
    let (ptr, len) = *current;
    if ptr != 0 {
        // SAFETY: `running` stored a slice that stays alive until `finished` clears it, and
        // `finished` needs this lock, which is held here.
        let input = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        let _ = file.write_all(input);
        let _ = file.flush();
    }
}
