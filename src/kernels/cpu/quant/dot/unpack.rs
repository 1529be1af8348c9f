//! GGML block layouts (candle 0.11's `k_quants.rs`, llama.cpp's `ggml-quants.c`) unpacked
//! into small integers and per-group `(a, b)` pairs such that every weight is exactly
//! `a · q − b` in f32, the value candle's `to_float` produces (the same two roundings: one
//! product, one difference; `b = 0` where the type has no minimum).

use half::f16;

/// Values of the largest block (the k-quants' 256).
pub(super) const MAX_VALUES: usize = 256;
/// Groups of the block with the most groups (Q6_K: 16 groups of 16).
pub(super) const MAX_GROUPS: usize = 16;

/// One block unpacked: `q[k]` for its values, `ab[g]` for its groups.
pub(super) struct Unpacked {
    pub(super) q: [i8; MAX_VALUES],
    pub(super) ab: [(f32, f32); MAX_GROUPS],
}

impl Unpacked {
    pub(super) fn new() -> Self {
        Self {
            q: [0; MAX_VALUES],
            ab: [(0.0, 0.0); MAX_GROUPS],
        }
    }
}

/// A GGML block type whose weights are `a · q − b` per group of `GROUP` values.
pub(super) trait Block {
    /// Values per block.
    const VALUES: usize;
    /// Bytes per block.
    const BYTES: usize;
    /// Values sharing one `(a, b)`.
    const GROUP: usize;
    /// Fills `u.q[..VALUES]` and `u.ab[..VALUES / GROUP]` from one block's bytes (`BYTES`
    /// of them; a shorter slice leaves the rest as it was: callers pass whole blocks).
    fn unpack(block: &[u8], u: &mut Unpacked);
}

/// The little-endian f16 at `at`, as f32 (0 past the end: callers pass whole blocks).
#[inline(always)]
fn half_at(block: &[u8], at: usize) -> f32 {
    match block.get(at..at + 2) {
        Some(&[lo, hi]) => f16::from_le_bytes([lo, hi]).to_f32(),
        _ => 0.0,
    }
}

/// `block[range]` or an empty slice.
#[inline(always)]
fn part(block: &[u8], from: usize, len: usize) -> &[u8] {
    block.get(from..from + len).unwrap_or_default()
}

/// Q8_0: `d: f16`, then 32 `i8`; `w = q · d`.
pub(super) struct Q8_0;

impl Block for Q8_0 {
    const VALUES: usize = 32;
    const BYTES: usize = 34;
    const GROUP: usize = 32;

    #[inline(always)]
    fn unpack(block: &[u8], u: &mut Unpacked) {
        u.ab[0] = (half_at(block, 0), 0.0);
        for (q, &b) in u.q.iter_mut().zip(part(block, 2, 32)) {
            *q = b as i8;
        }
    }
}

/// The 6-bit scales and minimums of a Q4_K / Q5_K block's 8 groups, `(scales, mins)`,
/// group `j` in byte `j` (little-endian) of each: the 12 scale bytes at byte 4 unpacked
/// with llama.cpp's masks (the `utmp` shuffle of its `ggml_vec_dot_q4_K_q8_K`; candle's
/// `get_scale_min_k4` group by group). Zero past the end: callers pass whole blocks.
#[inline(always)]
pub(super) fn k4_scale_bytes(block: &[u8]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| {
        block
            .get(4 + 4 * i..8 + 4 * i)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    let (s0, s1, s2) = (word(0), word(1), word(2));
    let join = |lo: u32, hi: u32| (u64::from(hi) << 32) | u64::from(lo);
    (
        join(s0 & LOW6, (s2 & LOW4) | (((s0 >> 6) & LOW2) << 4)),
        join(s1 & LOW6, ((s2 >> 4) & LOW4) | (((s1 >> 6) & LOW2) << 4)),
    )
}

/// The `(d · scale, dmin · min)` pairs of the 8 groups of a Q4_K / Q5_K block.
#[inline(always)]
fn k4_groups(block: &[u8], ab: &mut [(f32, f32); MAX_GROUPS]) {
    let (d, dmin) = (half_at(block, 0), half_at(block, 2));
    let (scales, mins) = k4_scale_bytes(block);
    let pairs = scales.to_le_bytes().into_iter().zip(mins.to_le_bytes());
    for (ab, (sc, m)) in ab.iter_mut().zip(pairs) {
        *ab = (d * f32::from(sc), dmin * f32::from(m));
    }
}

/// Q4_K: `d, dmin: f16`, 12 scale bytes, 128 nibble bytes; groups of 32 with
/// `w = (d · sc) · q − dmin · m`. Each 32 bytes hold 64 values: low nibbles first.
pub(super) struct Q4K;

impl Block for Q4K {
    const VALUES: usize = 256;
    const BYTES: usize = 144;
    const GROUP: usize = 32;

    #[inline(always)]
    fn unpack(block: &[u8], u: &mut Unpacked) {
        k4_groups(block, &mut u.ab);
        for (q, qs) in
            u.q.chunks_exact_mut(64)
                .zip(part(block, 16, 128).chunks_exact(32))
        {
            let (lo, hi) = q.split_at_mut(32);
            for ((lo, hi), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                *lo = (b & 0xF) as i8;
                *hi = (b >> 4) as i8;
            }
        }
    }
}

/// Q5_K: `d, dmin: f16`, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes; Q4_K's
/// layout with a fifth bit per value (bit `2j` / `2j + 1` of `qh[l]` for the low / high
/// nibbles of chunk `j`).
pub(super) struct Q5K;

impl Block for Q5K {
    const VALUES: usize = 256;
    const BYTES: usize = 176;
    const GROUP: usize = 32;

    #[inline(always)]
    fn unpack(block: &[u8], u: &mut Unpacked) {
        k4_groups(block, &mut u.ab);
        let qh = part(block, 16, 32);
        let chunks =
            u.q.chunks_exact_mut(64)
                .zip(part(block, 48, 128).chunks_exact(32));
        for (j, (q, qs)) in chunks.enumerate() {
            let (lo, hi) = q.split_at_mut(32);
            let shift = 2 * j as u32;
            for (((lo, hi), &b), &h) in lo.iter_mut().zip(hi.iter_mut()).zip(qs).zip(qh) {
                let h = h >> shift;
                *lo = ((b & 0xF) | ((h & 1) << 4)) as i8;
                *hi = ((b >> 4) | ((h & 2) << 3)) as i8;
            }
        }
    }
}

/// Q6_K: 128 low-nibble bytes, 64 high-2-bit bytes, 16 `i8` scales, `d: f16`; groups of
/// 16 with `w = (d · sc) · (q − 32)`. Each half block (128 values) takes 64 `ql` and 32
/// `qh` bytes: values `l`, `l + 32`, `l + 64`, `l + 96` (`l < 32`) are the low nibble of
/// `ql[l]`, of `ql[l + 32]`, the high nibble of `ql[l]`, of `ql[l + 32]`, each with bits
/// `2k, 2k + 1` of `qh[l]` on top (`k` = 0, 1, 2, 3).
pub(super) struct Q6K;

impl Block for Q6K {
    const VALUES: usize = 256;
    const BYTES: usize = 210;
    const GROUP: usize = 16;

    #[inline(always)]
    fn unpack(block: &[u8], u: &mut Unpacked) {
        let d = half_at(block, 208);
        for (ab, &sc) in u.ab.iter_mut().zip(part(block, 192, 16)) {
            *ab = (d * f32::from(sc as i8), 0.0);
        }
        let halves =
            u.q.chunks_exact_mut(128)
                .zip(part(block, 0, 128).chunks_exact(64))
                .zip(part(block, 128, 64).chunks_exact(32));
        for ((q, ql), qh) in halves {
            let (ql0, ql1) = ql.split_at(32);
            let (q01, q23) = q.split_at_mut(64);
            let (q0, q1) = q01.split_at_mut(32);
            let (q2, q3) = q23.split_at_mut(32);
            let values = q0.iter_mut().zip(q1).zip(q2).zip(q3);
            for ((((((q0, q1), q2), q3), &a), &b), &h) in values.zip(ql0).zip(ql1).zip(qh) {
                *q0 = ((a & 0xF) | ((h & 3) << 4)) as i8 - 32;
                *q1 = ((b & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
                *q2 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                *q3 = ((b >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
            }
        }
    }
}
