//! A BF16 matrix product for x86-64 CPUs with the AVX-512 BF16 dot product (`vdpbf16ps`: AMD
//! Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later), detected at run time.
//!
//! Candle's CPU matmul, and the `gemm` crate under it, have no BF16 kernel: a BF16 product is
//! an F32 one between two conversions, at the F32 rate. `vdpbf16ps` multiplies 32 BF16 pairs
//! per instruction into 16 F32 sums, twice the F32 FMA's rate, and reads half the bytes.
//!
//! The values: each product of two BF16 numbers is exact in F32 (8-bit significands), and the
//! products are summed in F32 in a fixed order (pairs of `k`, in blocks of [`KC`]), so a result
//! differs from the F32 product of the same (widened) values only in the rounding of that sum,
//! before the caller rounds it once more to BF16. Like every use of the instruction (oneDNN's,
//! PyTorch's), subnormal BF16 inputs count as zero and subnormal sums are flushed to zero (at
//! magnitudes below 1.2e-38). The results do not depend on the number of threads: each output
//! element is summed by one task, in the same order.
//!
//! The structure is the classic one (Goto and van de Geijn): for each block of [`KC`] values of
//! `k`, the right operand's block is packed into panels of [`NR`] columns (each pair of rows
//! interleaved, as the instruction reads them) and the left operand's into panels of [`MR`] rows
//! (each pair of `k` as one 32-bit word, which the kernel broadcasts); tasks of up to [`MC`] rows
//! (and, when there are few rows, a group of columns) run the [`MR`] x [`NR`] micro-kernel over
//! their panels, writing the sums (rounded to BF16 when `k` fits one block) or adding them into an
//! F32 result.

use rayon::prelude::*;

/// Rows of the left operand per micro-kernel call (24 accumulator registers of 32).
pub(crate) const MR: usize = 12;
/// Columns of the result per micro-kernel call (two vectors of 16 F32 sums).
pub(crate) const NR: usize = 32;
/// Values of `k` per block. Measured on a Zen 4 core (1 MiB L2): blocks of 2,048 (a packed
/// right-operand panel of 128 KiB, streamed from L2) ran a weight gradient's long `k` 20-30%
/// faster than blocks of 384 (24 KiB, L1-resident), whose extra passes over the result and
/// parallel regions cost more than the cache misses they save.
pub(crate) const KC: usize = 2048;
/// At most this many rows per task (a packed left-operand block of at most 384 KiB, in L2).
pub(crate) const MC: usize = 96;

/// A strided matrix of BF16 values (as their bits): element `(r, c)` is
/// `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(crate) data: &'a [u16],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl Mat<'_> {
    /// Whether every element the strides reach lies in `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|r| (self.cols - 1).checked_mul(self.cs).and_then(|c| r.checked_add(c)));
        last.is_some_and(|last| last < self.data.len())
    }

    /// Element `(r, c)`.
    ///
    /// # Safety
    /// `r < rows`, `c < cols`, and the matrix [in bounds](Self::in_bounds).
    #[inline(always)]
    unsafe fn at(&self, r: usize, c: usize) -> u16 {
        // SAFETY: the caller's contract.
        unsafe { *self.data.get_unchecked(r * self.rs + c * self.cs) }
    }
}

/// The most column panels for which the left operand is read in place rather than packed.
const IN_PLACE_PANELS: usize = 16;

/// Whether this CPU has the instructions the kernel needs and the environment does not turn it
/// off (`CANDLE_FIT_BF16_GEMM=off`: BF16 products widened to F32, as on other CPUs, for
/// comparisons). Read once per process.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("CANDLE_FIT_BF16_GEMM").map_or(true, |v| v != "off") && cpu_has_instructions()
    })
}

/// Whether this CPU has AVX-512F/BW/VL and AVX-512 BF16.
pub(crate) fn cpu_has_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Where the micro-kernel writes: F32 sums, or the sums rounded to BF16 (`half`'s rounding).
#[derive(Clone, Copy)]
enum Dst {
    F32(*mut f32),
    Bf16(*mut u16),
}

// SAFETY: the tasks write disjoint elements of the buffer (see `run`), which outlives them.
unsafe impl Send for Dst {}
// SAFETY: as above.
unsafe impl Sync for Dst {}

/// `c = a b` (`a` is `[m, k]`, `b` `[k, n]`, `c` row-major `[m, n]`, every element written), the
/// products in BF16 summed in F32. `parallel` allows splitting the product over rayon's
/// threads (the caller runs several products side by side otherwise). `None` when the CPU lacks
/// the instructions ([`cpu_has_instructions`]), or when the shapes disagree or a stride reaches past its
/// data (nothing written).
pub(crate) fn gemm(a: Mat<'_>, b: Mat<'_>, c: &mut [f32], parallel: bool) -> Option<()> {
    if !valid(&a, &b) || c.len() != a.rows * b.cols {
        return None;
    }
    // SAFETY: the operands are valid and `c` holds the `[m, n]` result.
    unsafe { run(&a, &b, Dst::F32(c.as_mut_ptr()), parallel) };
    Some(())
}

/// [`gemm`] with the result rounded to BF16 (round to nearest even; a NaN made quiet, as
/// `half::bf16::from_f32`), written to `c` (`[m, n]`, every element written).
pub(crate) fn gemm_bf16(
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [std::mem::MaybeUninit<half::bf16>],
    parallel: bool,
) -> Option<()> {
    if !valid(&a, &b) || c.len() != a.rows * b.cols {
        return None;
    }
    if a.cols <= KC {
        // One block of `k`: the micro-kernel rounds its sums itself.
        // SAFETY: as in `gemm`; `bf16` is `u16` bits.
        unsafe { run(&a, &b, Dst::Bf16(c.as_mut_ptr().cast()), parallel) };
    } else {
        let mut sums = vec![0f32; c.len()];
        gemm(a, b, &mut sums, parallel)?;
        for (d, &s) in c.iter_mut().zip(&sums) {
            d.write(crate::layers::fused::bf16_from_f32(s));
        }
    }
    Some(())
}

/// Whether the CPU has the instructions and the operands agree and stay in bounds.
fn valid(a: &Mat<'_>, b: &Mat<'_>) -> bool {
    cpu_has_instructions() && b.rows == a.cols && a.in_bounds() && b.in_bounds()
}

/// The product into `dst` (`[m, n]`, row-major).
///
/// # Safety
/// [`valid`] holds; `dst` points at `m * n` elements that no one else touches meanwhile; a
/// [`Dst::Bf16`] only with `a.cols <= KC`.
unsafe fn run(a: &Mat<'_>, b: &Mat<'_>, dst: Dst, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m * n {
            // SAFETY: `i < m * n`.
            unsafe {
                match dst {
                    Dst::F32(c) => c.add(i).write(0.0),
                    Dst::Bf16(c) => c.add(i).write(0),
                }
            }
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Below about a million products, splitting costs more than it saves (an attention head's
    // product: the caller splits the heads over the threads).
    let parallel = parallel && threads > 1 && m * n * k >= 1 << 20;
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // Tasks: blocks of at most MC rows, and when that leaves fewer than two tasks a thread (a
    // weight gradient's `[in, rows] x [rows, out]` has few rows), groups of columns as well.
    let workers = if parallel { threads } else { 1 };
    let per_block = (MC / MR).min(row_panels.div_ceil(workers));
    let row_blocks = row_panels.div_ceil(per_block);
    let col_groups =
        if row_blocks >= 2 * workers { 1 } else { col_panels.min((2 * workers).div_ceil(row_blocks)) };
    let per_group = col_panels.div_ceil(col_groups);
    let tasks = row_blocks * col_panels.div_ceil(per_group);
    // The left operand read in place, unpacked: row-major, `k` even (every pair in one row),
    // and few column panels (each packed word would serve few products).
    let in_place = a.cs == 1 && k % 2 == 0 && col_panels <= IN_PLACE_PANELS;
    let mut packed_a: Vec<u32> = Vec::new();
    let mut packed_b: Vec<u16> = Vec::new();
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let kcp = kc.div_ceil(2);
        let (a_panel, b_panel) = (kcp * MR, kcp * NR * 2);
        packed_a.clear();
        if !in_place {
            packed_a.resize(row_panels * a_panel, 0);
        }
        packed_b.clear();
        packed_b.resize(col_panels * b_panel, 0);
        // SAFETY (both packs): the operands are in bounds (checked above); each chunk is one
        // panel.
        let pack_a_panel =
            |(r, panel): (usize, &mut [u32])| unsafe { pack_a(a, r * MR, MR.min(m - r * MR), k0, kc, panel) };
        let pack_b_panel = |(q, panel): (usize, &mut [u16])| unsafe { pack_b(b, k0, kc, q * NR, panel) };
        let (shared_a, shared_b) = (&mut packed_a, &mut packed_b);
        if parallel {
            shared_a.par_chunks_mut(a_panel).enumerate().for_each(pack_a_panel);
            shared_b.par_chunks_mut(b_panel).enumerate().for_each(pack_b_panel);
        } else {
            shared_a.chunks_mut(a_panel).enumerate().for_each(pack_a_panel);
            shared_b.chunks_mut(b_panel).enumerate().for_each(pack_b_panel);
        }
        let (shared_a, shared_b) = (&packed_a, &packed_b);
        let task = |t: usize| {
            let (block, group) = (t % row_blocks, t / row_blocks);
            let rows = block * per_block..row_panels.min((block + 1) * per_block);
            let cols = group * per_group..col_panels.min((group + 1) * per_group);
            for q in cols {
                let bp = &shared_b[q * b_panel..(q + 1) * b_panel];
                for r in rows.clone() {
                    let (rows, cols, first) = (MR.min(m - r * MR), NR.min(n - q * NR), k0 == 0);
                    let offset = r * MR * n + q * NR;
                    // SAFETY: the CPU has the instructions (`valid`); the panels hold `kcp`
                    // pairs (in place: rows `r * MR..` of `a`, the rows past `m` reading the
                    // last one again, each with the block's pairs adjacent, `a.cs == 1` and `kc`
                    // even); the tile (rows `r * MR..`, columns `q * NR..`, clipped to `m` and
                    // `n`) lies inside the result, and no other task writes it (tasks cover
                    // disjoint row blocks and column groups).
                    unsafe {
                        if in_place {
                            let offsets = std::array::from_fn(|i| (r * MR + i.min(rows - 1)) * a.rs);
                            let ap = Rows { start: a.data.as_ptr().add(k0), offsets };
                            match dst {
                                Dst::F32(c) => kernel_f32(kcp, ap, bp, c.add(offset), n, rows, cols, first),
                                Dst::Bf16(c) => kernel_bf16(kcp, ap, bp, c.add(offset), n, rows, cols),
                            }
                        } else {
                            let ap = Packed(shared_a[r * a_panel..(r + 1) * a_panel].as_ptr());
                            match dst {
                                Dst::F32(c) => kernel_f32(kcp, ap, bp, c.add(offset), n, rows, cols, first),
                                Dst::Bf16(c) => kernel_bf16(kcp, ap, bp, c.add(offset), n, rows, cols),
                            }
                        }
                    }
                }
            }
        };
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
}

/// Packs rows `i0..i0 + rows` and values `k0..k0 + kc` of `a` into panels of [`MR`] rows: for
/// each pair `p` of `k`, the panel's [`MR`] words `a[i][k0 + 2p] | a[i][k0 + 2p + 1] << 16`
/// (zeros past the last row and past `k0 + kc`).
///
/// # Safety
/// `a` in bounds, `i0 + rows <= a.rows`, `k0 + kc <= a.cols`, `out` holds
/// `rows.div_ceil(MR) * kc.div_ceil(2) * MR` words.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_a(a: &Mat<'_>, i0: usize, rows: usize, k0: usize, kc: usize, out: &mut [u32]) {
    let kcp = kc.div_ceil(2);
    let full = kc / 2;
    let base = a.data.as_ptr();
    for (r, panel) in out.chunks_exact_mut(kcp * MR).enumerate() {
        let first = i0 + r * MR;
        let live = MR.min(rows.saturating_sub(r * MR));
        if a.rs == 1 && live == MR {
            // A transposed operand (a weight gradient's `xᵀ`): the panel's rows are adjacent in
            // each of `k`'s rows; interleave two runs of MR values per pair.
            for p in 0..full {
                let k = k0 + 2 * p;
                // SAFETY: rows `first..first + MR` and columns `k`, `k + 1` are in bounds.
                let (r0, r1) = unsafe { (base.add(first + k * a.cs), base.add(first + (k + 1) * a.cs)) };
                let dst = &mut panel[p * MR..(p + 1) * MR];
                for (ii, d) in dst.iter_mut().enumerate() {
                    // SAFETY: `ii < MR`: inside the two runs.
                    *d = unsafe { *r0.add(ii) as u32 | (*r1.add(ii) as u32) << 16 };
                }
            }
        } else {
            for ii in 0..MR {
                if ii >= live {
                    for p in 0..kcp {
                        panel[p * MR + ii] = 0;
                    }
                    continue;
                }
                let row = first + ii;
                // SAFETY (all `at` calls and reads): `row < i0 + rows <= a.rows`, columns below
                // `k0 + kc`.
                if a.cs == 1 {
                    // The pair is one (possibly unaligned) 32-bit word.
                    let start = unsafe { base.add(row * a.rs + k0) };
                    for p in 0..full {
                        panel[p * MR + ii] = unsafe { start.add(2 * p).cast::<u32>().read_unaligned() };
                    }
                } else {
                    for p in 0..full {
                        let k = k0 + 2 * p;
                        panel[p * MR + ii] = unsafe { a.at(row, k) as u32 | (a.at(row, k + 1) as u32) << 16 };
                    }
                }
            }
        }
        if full < kcp {
            for ii in 0..MR {
                // SAFETY: as above; the odd last value of `k`.
                panel[full * MR + ii] =
                    if ii < live { u32::from(unsafe { a.at(first + ii, k0 + 2 * full) }) } else { 0 };
            }
        }
    }
}

/// `_mm512_permutex2var_epi16` indices interleaving two vectors `x`, `y` of 32 values:
/// `x0 y0 x1 y1 ... x15 y15`, then `x16 y16 ... x31 y31` (`y`'s lanes numbered from 32).
const INTERLEAVE: [[u16; 32]; 2] = {
    let mut idx = [[0u16; 32]; 2];
    let mut j = 0;
    while j < 32 {
        idx[j / 16][2 * (j % 16)] = j as u16;
        idx[j / 16][2 * (j % 16) + 1] = 32 + j as u16;
        j += 1;
    }
    idx
};

/// Packs values `k0..k0 + kc` of `b`'s columns `j0..j0 + NR` into one panel: for each pair `p`
/// of `k`, the [`NR`] pairs `(b[k0 + 2p][j], b[k0 + 2p + 1][j])` in column order (zeros past the
/// last column and past `k0 + kc`).
///
/// # Safety
/// `b` in bounds, `k0 + kc <= b.rows`, `out` holds `kc.div_ceil(2) * NR * 2` values.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_b(b: &Mat<'_>, k0: usize, kc: usize, j0: usize, out: &mut [u16]) {
    let cols = NR.min(b.cols - j0);
    let full = kc / 2;
    let base = b.data.as_ptr();
    for (p, pair) in out.chunks_exact_mut(NR * 2).enumerate() {
        let k = k0 + 2 * p;
        if p < full && cols == NR && b.cs == 1 {
            // Rows `k` and `k + 1` each hold the panel's 32 columns side by side: interleave them
            // (two permutes of the two rows' vectors).
            use std::arch::x86_64::*;
            // SAFETY: rows `k`, `k + 1` and columns `j0..j0 + NR` are in bounds; `pair` holds
            // `2 * NR` values; the CPU has AVX-512F/BW (the caller's contract).
            unsafe {
                let r0 = _mm512_loadu_si512(base.add(k * b.rs + j0).cast());
                let r1 = _mm512_loadu_si512(base.add((k + 1) * b.rs + j0).cast());
                let first =
                    _mm512_permutex2var_epi16(r0, _mm512_loadu_si512(INTERLEAVE[0].as_ptr().cast()), r1);
                let second =
                    _mm512_permutex2var_epi16(r0, _mm512_loadu_si512(INTERLEAVE[1].as_ptr().cast()), r1);
                _mm512_storeu_si512(pair.as_mut_ptr().cast(), first);
                _mm512_storeu_si512(pair.as_mut_ptr().add(NR).cast(), second);
            }
        } else if p < full && b.rs == 1 {
            // A transposed operand (`Wᵀ`): each column's pair is one 32-bit word.
            for j in 0..cols {
                // SAFETY: column `j0 + j` and rows `k`, `k + 1` are in bounds.
                let word = unsafe { base.add((j0 + j) * b.cs + k).cast::<u32>().read_unaligned() };
                pair[2 * j] = word as u16;
                pair[2 * j + 1] = (word >> 16) as u16;
            }
            pair[2 * cols..].fill(0);
        } else {
            let second = k + 1 < k0 + kc;
            for j in 0..cols {
                // SAFETY: `k < k0 + kc <= b.rows`, `j0 + j < b.cols`.
                pair[2 * j] = unsafe { b.at(k, j0 + j) };
                pair[2 * j + 1] = if second { unsafe { b.at(k + 1, j0 + j) } } else { 0 };
            }
            pair[2 * cols..].fill(0);
        }
    }
}

/// Where the micro-kernel reads the left operand's pairs of `k`.
trait Lhs: Copy {
    /// The word `a[i][2p] | a[i][2p + 1] << 16` of the panel's row `i < MR`.
    ///
    /// # Safety
    /// `p` below the panel's number of pairs.
    unsafe fn word(self, p: usize, i: usize) -> u32;
}

/// A packed panel: `MR` words per pair.
#[derive(Clone, Copy)]
struct Packed(*const u32);

impl Lhs for Packed {
    #[inline(always)]
    unsafe fn word(self, p: usize, i: usize) -> u32 {
        // SAFETY: the caller's contract (the panel holds `MR` words per pair).
        unsafe { *self.0.add(p * MR + i) }
    }
}

/// `MR` rows of a row-major operand read in place (row `i` at `start + offsets[i]`, its pairs
/// adjacent): for products with few column panels, where packing would cost as much as the
/// products it serves.
#[derive(Clone, Copy)]
struct Rows {
    start: *const u16,
    offsets: [usize; MR],
}

impl Lhs for Rows {
    #[inline(always)]
    unsafe fn word(self, p: usize, i: usize) -> u32 {
        // SAFETY: the caller's contract (each row holds the block's pairs).
        unsafe { self.start.add(self.offsets[i] + 2 * p).cast::<u32>().read_unaligned() }
    }
}

/// The micro-kernel's sums: an [`MR`] x [`NR`] block over `kcp` pairs of `k`, as two vectors of
/// 16 columns per row.
///
/// # Safety
/// The CPU has AVX-512F/BW/BF16; `a` holds `kcp` pairs, `b` `kcp * NR * 2` values.
#[inline(always)]
unsafe fn sums<L: Lhs>(
    kcp: usize,
    a: L,
    b: &[u16],
) -> ([std::arch::x86_64::__m512; MR], [std::arch::x86_64::__m512; MR]) {
    use std::arch::x86_64::*;
    // SAFETY: a register operation (the caller has AVX-512F).
    let zero = unsafe { _mm512_setzero_ps() };
    let (mut lo, mut hi) = ([zero; MR], [zero; MR]);
    let bp = b.as_ptr();
    for p in 0..kcp {
        // SAFETY: `p < kcp`: the loads stay inside `a` and `b` (the caller's contract); the
        // transmutes reinterpret 512 bits as 32 BF16 values.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR * 2).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR * 2 + NR).cast()));
            for i in 0..MR {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(a.word(p, i) as i32));
                lo[i] = _mm512_dpbf16_ps(lo[i], x, b0);
                hi[i] = _mm512_dpbf16_ps(hi[i], x, b1);
            }
        }
    }
    (lo, hi)
}

/// The mask of the first `count` (at most 16) lanes.
#[inline(always)]
fn lanes(count: usize) -> u16 {
    ((1u32 << count.min(16)) - 1) as u16
}

/// The micro-kernel into F32: the sums written (`first`) or added into `rows` rows and `cols`
/// columns at `c` (row stride `ldc`).
///
/// # Safety
/// As [`sums`]; `rows <= MR`, `cols <= NR`; `c` points at `rows` rows of `ldc` (the last one
/// `cols` long) that no one else reads or writes meanwhile.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel_f32<L: Lhs>(
    kcp: usize,
    a: L,
    b: &[u16],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    first: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    let (lo, hi) = unsafe { sums(kcp, a, b) };
    let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
    for i in 0..rows {
        // SAFETY: row `i < rows`, the columns below `cols` (masked lanes are not accessed).
        unsafe {
            let row = c.add(i * ldc);
            let (mut l, mut h) = (lo[i], hi[i]);
            if !first {
                l = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), l);
                h = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row.wrapping_add(16)), h);
            }
            _mm512_mask_storeu_ps(row, m0, l);
            _mm512_mask_storeu_ps(row.wrapping_add(16), m1, h);
        }
    }
}

/// 16 F32 values rounded to BF16 as `crate::layers::fused::bf16_from_f32` rounds them.
#[inline(always)]
unsafe fn round(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: register operations only (the caller has AVX-512F/BW).
    unsafe {
        let bits = _mm512_castps_si512(v);
        let upper = _mm512_srli_epi32::<16>(bits);
        let bias = _mm512_add_epi32(_mm512_and_si512(upper, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let quiet = _mm512_or_si512(upper, _mm512_set1_epi32(0x40));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
    }
}

/// The micro-kernel into BF16: the sums rounded and written into `rows` rows and `cols`
/// columns at `c` (row stride `ldc`).
///
/// # Safety
/// As [`kernel_f32`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kernel_bf16<L: Lhs>(
    kcp: usize,
    a: L,
    b: &[u16],
    c: *mut u16,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    let (lo, hi) = unsafe { sums(kcp, a, b) };
    let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
    for i in 0..rows {
        // SAFETY: row `i < rows`, the columns below `cols` (masked lanes are not accessed).
        unsafe {
            let row = c.add(i * ldc);
            _mm256_mask_storeu_epi16(row.cast(), m0, round(lo[i]));
            _mm256_mask_storeu_epi16(row.wrapping_add(16).cast(), m1, round(hi[i]));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use super::*;
    use crate::layers::fused::bf16_from_f32;

    /// BF16 bits of normal values, from a fixed seed.
    fn values(len: usize, seed: u64) -> Vec<u16> {
        let mut rng = candle_ckpt::Rng::seeded(seed);
        (0..len).map(|_| half::bf16::from_f64(rng.normal_f64()).to_bits()).collect()
    }

    fn row_major(data: &[u16], rows: usize, cols: usize) -> Mat<'_> {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The rounded kernel writes `bf16_from_f32` of the F32 kernel's sums, bit for bit: one
    /// block of `k` (rounded in the micro-kernel) and several (rounded after), full and partial
    /// tiles.
    #[test]
    fn rounded_products_are_the_f32_sums_rounded() {
        if !cpu_has_instructions() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for (m, k, n) in [(1, 1, 1), (12, 2, 32), (25, 67, 33), (3, KC + 1, 5)] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let (a, b) = (row_major(&a, m, k), row_major(&b, k, n));
            for parallel in [false, true] {
                let mut sums = vec![0f32; m * n];
                gemm(a, b, &mut sums, parallel).expect("valid operands");
                let mut rounded = vec![MaybeUninit::uninit(); m * n];
                gemm_bf16(a, b, &mut rounded, parallel).expect("valid operands");
                for (r, s) in rounded.iter().zip(&sums) {
                    // SAFETY: `gemm_bf16` wrote every element.
                    assert_eq!(unsafe { r.assume_init() }.to_bits(), bf16_from_f32(*s).to_bits());
                }
            }
        }
    }

    /// The vector rounding is `bf16_from_f32` on the values where rounding is delicate: ties to
    /// even both ways, the largest finite values rounding to infinity, infinities, NaNs of both
    /// signs with payloads, subnormals and zeros.
    #[test]
    fn vector_rounding_is_bf16_from_f32() {
        if !cpu_has_instructions() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let special: Vec<f32> = [
            0x3f80_8000u32, // 1 + 2^-8: a tie, rounds down to even
            0x3f81_8000,    // a tie that rounds up to even
            0x3f80_8001,
            0x7f7f_ffff, // f32::MAX: rounds to infinity
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0001, // quiet NaN with payload
            0x7f80_0001, // signalling NaN
            0xffa0_0000,
            0x0000_0001, // the smallest subnormal
            0x807f_ffff,
            0x0000_0000,
            0x8000_0000,
            0x4049_0fdb, // pi
            0xc2f6_e979,
            0x3380_0000,
        ]
        .into_iter()
        .map(f32::from_bits)
        .collect();
        let mut out = [0u16; 16];
        // SAFETY: the CPU has the instructions (checked); 16 values in and out.
        unsafe {
            use std::arch::x86_64::*;
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn round16(v: &[f32], out: &mut [u16; 16]) {
                // SAFETY: 16 values in `v` and `out`.
                unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), round(_mm512_loadu_ps(v.as_ptr()))) }
            }
            round16(&special, &mut out);
        }
        for (v, o) in special.iter().zip(out) {
            assert_eq!(o, bf16_from_f32(*v).to_bits(), "{:#010x}", v.to_bits());
        }
    }

    /// Mismatched shapes and strides that reach past the data are refused, nothing written.
    #[test]
    fn refuses_bad_operands() {
        // Elsewhere every call is refused for the CPU alone: the test would prove nothing.
        if !cpu_has_instructions() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let data = values(12, 3);
        let a = row_major(&data, 3, 4);
        let mut c = vec![7f32; 9];
        assert!(gemm(a, row_major(&data, 3, 4), &mut c, true).is_none(), "k disagrees");
        let past = Mat { data: &data, rows: 4, cols: 3, rs: 3, cs: 2 };
        assert!(gemm(a, past, &mut c, true).is_none(), "reaches past the data");
        assert!(gemm(a, row_major(&data, 4, 3), &mut c[..8], true).is_none(), "short result");
        assert!(c.iter().all(|&v| v == 7.0));
    }
}
