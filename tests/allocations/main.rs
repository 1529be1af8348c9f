//! Allocation tests, in a binary of their own: a counting global allocator (one per binary)
//! watches what a layer allocates. The counters are global, so the tests take
//! [`counting::serial`] for their whole run: no other test of this binary allocates while
//! one measures.

#[path = "../suite/common/mod.rs"]
mod common;

mod adalora_alloc;
mod dora_alloc;
mod kv_cache_alloc;
mod no_weight_alloc;
mod quant_alloc;

pub mod counting {
    //! The system allocator, with counters: the largest single allocation, and the number of
    //! allocations of one watched size, while a closure runs; and the bytes held now.

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Mutex, MutexGuard};

    struct Counting;

    /// Whether [`largest_during`] is recording.
    static ON: AtomicBool = AtomicBool::new(false);
    /// The largest allocation seen while `ON`.
    static LARGEST: AtomicUsize = AtomicUsize::new(0);
    /// Allocation size (bytes) to count exactly; 0: none.
    static WATCH: AtomicUsize = AtomicUsize::new(0);
    /// Allocations of exactly `WATCH` bytes seen.
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    /// Bytes allocated and not yet freed, by every thread.
    static LIVE: AtomicUsize = AtomicUsize::new(0);

    static SERIAL: Mutex<()> = Mutex::new(());

    fn note(size: usize) {
        if ON.load(Ordering::Relaxed) {
            LARGEST.fetch_max(size, Ordering::Relaxed);
        }
        let w = WATCH.load(Ordering::Relaxed);
        if w != 0 && size == w {
            SEEN.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `size` bytes as held when the allocation `ptr` succeeded; returns `ptr`.
    fn held(ptr: *mut u8, size: usize) -> *mut u8 {
        if !ptr.is_null() {
            LIVE.fetch_add(size, Ordering::Relaxed);
        }
        ptr
    }

    // SAFETY: forwards every call to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            held(unsafe { System.alloc(layout) }, layout.size())
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            held(unsafe { System.alloc_zeroed(layout) }, layout.size())
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            let moved = unsafe { System.realloc(ptr, layout, new_size) };
            if !moved.is_null() {
                LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            }
            held(moved, new_size)
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Held by each test for its whole run, so that the tests of this binary run one at a
    /// time even under the harness's parallel threads (a failed test's poison is ignored).
    pub fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` and returns the largest single allocation (bytes) it made.
    pub fn largest_during(f: impl FnOnce()) -> usize {
        LARGEST.store(0, Ordering::SeqCst);
        ON.store(true, Ordering::SeqCst);
        f();
        ON.store(false, Ordering::SeqCst);
        LARGEST.load(Ordering::SeqCst)
    }

    /// The bytes allocated and not yet freed, by every thread of the process.
    pub fn live_bytes() -> usize {
        LIVE.load(Ordering::SeqCst)
    }

    /// Runs `f` and returns how many allocations of exactly `bytes` bytes it made.
    pub fn exact_size_allocations(bytes: usize, f: impl FnOnce()) -> usize {
        SEEN.store(0, Ordering::SeqCst);
        WATCH.store(bytes, Ordering::SeqCst);
        f();
        WATCH.store(0, Ordering::SeqCst);
        SEEN.load(Ordering::SeqCst)
    }
}
