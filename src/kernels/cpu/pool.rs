//! Work buffers reused across calls: the fused ops' saved intermediates and backward
//! temporaries (and the thin split's row-major copy of a factor) come from a small
//! process-wide pool and go back to it when dropped, so a
//! training step does not allocate (and fault in) the same buffers again every step.
//!
//! The pool is bounded ([`MAX_BUFFERS`] buffers, [`MAX_BYTES`] in all): a buffer that
//! would exceed either is freed instead. Outputs handed to candle (the layer output and
//! the gradients) are not pooled: candle owns and frees them.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, WithDType};

/// Most buffers the pool keeps.
pub(crate) const MAX_BUFFERS: usize = 16;

/// Most bytes (of capacity) the pool keeps.
pub(crate) const MAX_BYTES: usize = 256 << 20;

/// Free buffers (f32 and f64 ones, as candle storages so one pool serves both), each with
/// its capacity in bytes, oldest first.
static POOL: Mutex<Vec<(CpuStorage, usize)>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<(CpuStorage, usize)>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `len` elements taken from the pool, returned to it on drop.
#[derive(Debug)]
pub(crate) struct Scratch<T: WithDType>(Vec<T>);

impl<T: WithDType> Scratch<T> {
    /// `len` elements whose values are unspecified (what the buffer's last user left, or
    /// zeros), for a caller that writes every one of them before reading any (a product
    /// that replaces its destination, [`super::Accum::Replace`]): the smallest pooled
    /// buffer of `T` that holds them, or a new one, never filled first. (Every user in the
    /// crate writes its buffer whole, so none takes a zeroed one.)
    pub(crate) fn overwritten(len: usize) -> Self {
        if len == 0 {
            return Self(Vec::new());
        }
        let mut v = take::<T>(len).unwrap_or_default();
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, T::from_f64(0.0));
        }
        Self(v)
    }

    /// `len` zeros (the tests' check that a reused buffer comes back at the asked length).
    #[cfg(test)]
    fn zeros(len: usize) -> Self {
        let mut buffer = Self::overwritten(len);
        buffer.0.fill(T::from_f64(0.0));
        buffer
    }

    /// An existing vector, returned to the pool when dropped (the tests' way to offer it
    /// one of any capacity).
    #[cfg(test)]
    fn from_vec(v: Vec<T>) -> Self {
        Self(v)
    }

    /// The vector, no longer returned to the pool (an output handed to candle).
    pub(crate) fn into_vec(mut self) -> Vec<T> {
        std::mem::take(&mut self.0)
    }
}

/// A saved intermediate of either dtype (a pooled buffer as a candle storage, without
/// being a tensor), returned to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Pooled(Option<CpuStorage>);

impl Pooled {
    /// Keeps `s` until dropped.
    pub(crate) fn new<T: WithDType>(s: Scratch<T>) -> Self {
        Self(Some(T::to_cpu_storage_owned(s.into_vec())))
    }

    /// The buffer, when its elements are `T`s.
    pub(crate) fn slice<T: WithDType>(&self) -> Option<&[T]> {
        T::cpu_storage_as_slice(self.0.as_ref()?).ok()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            give_storage(s);
        }
    }
}

impl<T: WithDType> Deref for Scratch<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: WithDType> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0
    }
}

impl<T: WithDType> Drop for Scratch<T> {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

/// The best-fitting pooled buffer of `T` with room for `len` elements, at most twice as
/// large (a large buffer is kept for a large request).
fn take<T: WithDType>(len: usize) -> Option<Vec<T>> {
    let want = len.checked_mul(T::DTYPE.size_in_bytes())?;
    let most = want.saturating_mul(2).max(4096);
    let mut pool = pool();
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, (s, bytes))| s.dtype() == T::DTYPE && (want..=most).contains(bytes))
        .min_by_key(|(_, (_, bytes))| *bytes)
        .map(|(i, _)| i)?;
    let (storage, _) = pool.remove(best);
    drop(pool);
    T::cpu_storage_data(storage).ok()
}

/// Keeps `v` for reuse (see [`give_storage`]).
fn give<T: WithDType>(v: Vec<T>) {
    if v.capacity() > 0 {
        give_storage(T::to_cpu_storage_owned(v));
    }
}

/// Keeps an f32 or f64 buffer for reuse, evicting the oldest buffers to stay within the
/// bounds (a buffer larger than [`MAX_BYTES`], or of another dtype, is freed).
fn give_storage(s: CpuStorage) {
    let bytes = match &s {
        CpuStorage::F32(v) => v.capacity().saturating_mul(4),
        CpuStorage::F64(v) => v.capacity().saturating_mul(8),
        _ => 0,
    };
    if bytes == 0 || bytes > MAX_BYTES {
        return;
    }
    let mut evicted = Vec::new();
    {
        let mut pool = pool();
        pool.push((s, bytes));
        let mut total: usize = pool.iter().map(|(_, b)| b).sum();
        while pool.len() > MAX_BUFFERS || total > MAX_BYTES {
            let (old, b) = pool.remove(0);
            total -= b;
            evicted.push(old);
        }
    }
    drop(evicted); // freed outside the lock
}

/// The pool's buffer count and bytes (for tests).
#[cfg(test)]
pub(crate) fn pooled() -> (usize, usize) {
    let pool = pool();
    (pool.len(), pool.iter().map(|(_, b)| b).sum())
}

/// `len` elements of `v` starting at a 64-byte boundary (a cache line: the packed products'
/// panels are read a whole line at a time), `v` grown with zeros as needed: a thread's
/// panel buffer, kept across products.
pub(crate) fn cache_aligned<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> Option<&mut [T]> {
    let slack = 64 / std::mem::size_of::<T>().max(1);
    if v.len() < len + slack {
        v.resize(len + slack, T::default());
    }
    let start = v.as_ptr().align_offset(64);
    v.get_mut(start..start.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers of many sizes and both dtypes never grow the pool past its bounds, and a
    /// reused buffer comes back zero-filled at the asked length.
    #[test]
    fn pool_stays_bounded_and_zeroed() {
        for i in 0..200usize {
            let len = 1 + (i * 7919) % 50_000;
            let mut a = Scratch::<f32>::zeros(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0.0));
            a.iter_mut().for_each(|v| *v = 1.0);
            let b = Scratch::<f64>::zeros(len / 2 + 1);
            assert!(b.iter().all(|&v| v == 0.0));
            drop((a, b));
            let (count, bytes) = pooled();
            assert!(
                count <= MAX_BUFFERS && bytes <= MAX_BYTES,
                "{count} {bytes}"
            );
        }
        // A buffer for overwriting comes at the asked length, reused or new.
        for len in [1, 999, 20_000, 70_000] {
            let mut a = Scratch::<f32>::overwritten(len);
            assert_eq!(a.len(), len);
            a.iter_mut().for_each(|v| *v = 2.0);
        }
        // A buffer over the byte bound is never kept.
        drop(Scratch::<f64>::from_vec(Vec::with_capacity(
            MAX_BYTES / 8 + 1,
        )));
        assert!(pooled().1 <= MAX_BYTES);
    }
}
