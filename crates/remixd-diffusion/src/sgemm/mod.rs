//! `x · Wᵀ` for large linear layers on CPUs with AVX-512: weights packed once at load,
//! a cache-blocked f32 product.
//!
//! candle's CPU matmul runs on the `gemm` crate, which on an AVX-512 machine reached
//! about a fifth of the cores' FMA peak for the FLUX.2 transformer's shapes (thousands of
//! tokens × thousands of channels; 93 % of a forward pass was its kernel and packing),
//! and a half-precision weight was widened to f32 in a separate pass for every product.
//! This module follows the layout of optimised BLAS libraries:
//!
//! - at load, `W` (`n × k`) is rearranged, at its stored precision (f32, bf16 or f16:
//!   the same memory as before), into panels of [`NR`] output columns × [`KC`] inputs,
//!   row after row of `NR` consecutive columns, zero-padded at the edges;
//! - per product, `x` (`m × k`) is rearranged likewise into micro-panels of [`MR`] rows ×
//!   `KC` inputs (one pass over the activations);
//! - each task takes a block of at most [`MC`] rows and a run of column panels; per block
//!   of `KC` inputs it runs the micro-kernel over every (column panel, row micro-panel)
//!   pair, so that the column panel (at most 32 KiB) stays in L1 while the rows' block
//!   (in L2) streams past it;
//! - the micro-kernel keeps an `MR × NR` tile of the output in 24 AVX-512 registers and,
//!   per input channel, loads the panel's two vectors (widening bf16 or f16 on the fly,
//!   exactly) and broadcasts `MR` row values, two FMAs each; the tile is added to the
//!   output with masked stores, so the edges need no scalar code.
//!
//! Measured on one core of an AMD EPYC with AVX-512 (the FLUX.2 klein 4B projections,
//! 1280 tokens): 150–180 GFLOP/s, against about 50 for candle's matmul and 70–90 for
//! PyTorch's (MKL). [`PackedWeight::new`] answers `None` without AVX-512 or off the CPU;
//! the caller then keeps candle's layer. [`attention`] runs both products of attention
//! on the same micro-kernel.

pub(crate) mod attention;

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Rows of the micro-kernel's output tile.
const MR: usize = 12;
/// Columns of the micro-kernel's output tile (two AVX-512 vectors of f32).
const NR: usize = 32;
/// Input channels per block: a column panel is `KC × NR` values (32 KiB in f32).
const KC: usize = 256;
/// Rows per task at most (the task's rows are `MC × KC` f32 = 144 KiB, for L2).
const MC: usize = MR * 12;
/// Column panels per task.
const PANELS_PER_TASK: usize = 16;

/// A bf16 value's bits (the upper half of an f32).
#[derive(Debug, Clone, Copy, Default)]
#[repr(transparent)]
struct Bf16(u16);

/// An IEEE half-precision value's bits.
#[derive(Debug, Clone, Copy, Default)]
#[repr(transparent)]
struct F16(u16);

/// The panels at the weight's stored precision.
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<Bf16>),
    F16(Vec<F16>),
}

/// A linear layer's weight `(n, k)`, packed for the AVX-512 product.
#[derive(Clone)]
pub(crate) struct PackedWeight {
    panels: Arc<Panels>,
    n: usize,
    k: usize,
    isa: Avx512,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = match *self.panels {
            Panels::F32(_) => "f32",
            Panels::Bf16(_) => "bf16",
            Panels::F16(_) => "f16",
        };
        write!(f, "PackedWeight({}, {}, {dtype})", self.n, self.k)
    }
}

impl PackedWeight {
    /// Packs `w` `(n, k)` (f32, bf16 or f16, on the CPU) when this CPU has AVX-512;
    /// `None` otherwise.
    pub(crate) fn new(w: &Tensor) -> Result<Option<Self>> {
        let Some(isa) = Avx512::detect() else {
            return Ok(None);
        };
        if !w.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sgemm: a weight that is not contiguous");
        };
        let panels = match storage {
            CpuStorage::F32(v) => Panels::F32(pack_weight(&v[start..end], n, k, |x| x)),
            CpuStorage::BF16(v) => {
                Panels::Bf16(pack_weight(&v[start..end], n, k, |x| Bf16(x.to_bits())))
            }
            CpuStorage::F16(v) => {
                Panels::F16(pack_weight(&v[start..end], n, k, |x| F16(x.to_bits())))
            }
            _ => return Ok(None),
        };
        Ok(Some(Self {
            panels: Arc::new(panels),
            n,
            k,
            isa,
        }))
    }

    /// `x · Wᵀ` for `x` `(…, k)`: `(…, n)` in `x`'s dtype. f32 runs the packed product;
    /// other dtypes go through the unpacked weight with candle (slow, for tests).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((&last, lead)) = x.dims().split_last() else {
            candle_core::bail!("linear: a scalar input");
        };
        if last != self.k {
            candle_core::bail!("linear: {last} input features for a {}-wide layer", self.k);
        }
        let m: usize = lead.iter().product();
        let mut shape = lead.to_vec();
        shape.push(self.n);
        if m == 0 {
            return Tensor::zeros(shape, x.dtype(), x.device());
        }
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            let w = self
                .unpacked()?
                .to_dtype(x.dtype())?
                .to_device(x.device())?;
            return candle_core::Module::forward(&candle_nn::Linear::new(w, None), x);
        }
        // Rank 3 is read at its strides (rows of a view need no copy).
        let x3 = match lead.len() {
            2 => x.clone(),
            _ => x.reshape((1, m, self.k))?,
        };
        x3.apply_op1_no_bwd(self)?.reshape(shape)
    }

    /// The weight `(n, k)` in f32, rebuilt from the panels.
    fn unpacked(&self) -> Result<Tensor> {
        let (n, k) = (self.n, self.k);
        let panels = n.div_ceil(NR);
        let mut w = vec![0f32; n * k];
        let at = |i: usize| -> f32 {
            match &*self.panels {
                Panels::F32(v) => v[i],
                Panels::Bf16(v) => f32::from_bits((v[i].0 as u32) << 16),
                Panels::F16(v) => f16_to_f32(v[i].0),
            }
        };
        for (j, row) in w.chunks_exact_mut(k.max(1)).take(n).enumerate() {
            let (q, jj) = (j / NR, j % NR);
            for (kk, v) in row.iter_mut().enumerate() {
                let (p, kr) = (kk / KC, kk % KC);
                *v = at((p * panels + q) * KC * NR + kr * NR + jj);
            }
        }
        Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)
    }
}

/// An IEEE half's bits as f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as f32;
    sign * match exp {
        0 => man * 2f32.powi(-24),
        0x1f if man == 0.0 => f32::INFINITY,
        0x1f => f32::NAN,
        _ => (1.0 + man / 1024.0) * 2f32.powi(exp - 15),
    }
}

/// Proof that this CPU has AVX-512F: the only constructor is [`Avx512::detect`], so the
/// micro-kernel's `target_feature` code runs only where the instructions exist.
#[derive(Debug, Clone, Copy)]
struct Avx512(());

impl Avx512 {
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            if *DETECTED.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f")) {
                return Some(Avx512(()));
            }
        }
        None
    }
}

/// `W` packed: block `p` of `KC` inputs and panel `q` of `NR` output columns hold, at
/// `(p·panels + q)·KC·NR + kk·NR + j`, the weight of column `q·NR + j` for input
/// `p·KC + kk` (zero past `n`).
fn pack_weight<S: Copy + Sync, T: Copy + Default + Send>(
    w: &[S],
    n: usize,
    k: usize,
    convert: impl Fn(S) -> T + Sync,
) -> Vec<T> {
    let panels = n.div_ceil(NR);
    let mut data = vec![T::default(); k.div_ceil(KC) * panels * KC * NR];
    data.par_chunks_mut(KC * NR)
        .enumerate()
        .for_each(|(t, dst)| {
            let (p, q) = (t / panels, t % panels);
            let (k0, kc) = (p * KC, KC.min(k - p * KC));
            for j in 0..NR.min(n - q * NR) {
                let src = &w[(q * NR + j) * k + k0..][..kc];
                for (kk, &v) in src.iter().enumerate() {
                    dst[kk * NR + j] = convert(v);
                }
            }
        });
    data
}

/// The `(b, s, k)` f32 input with unit-stride rows, as `m = b·s` rows.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    s: usize,
    batch_stride: usize,
    token_stride: usize,
}

impl<'a> Rows<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, k: usize) -> Result<(Self, usize)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("sgemm: the input is {:?}, not f32", storage.dtype());
        };
        let (Ok(&[b, s, kx]), Ok(&[sb, ss, sk])) = (
            <&[usize; 3]>::try_from(layout.dims()),
            <&[usize; 3]>::try_from(layout.stride()),
        ) else {
            candle_core::bail!("sgemm: the input is not 3-D");
        };
        if kx != k || (k > 1 && sk != 1) {
            candle_core::bail!(
                "sgemm: an input of shape {:?} and strides {:?}",
                [b, s, kx],
                [sb, ss, sk]
            );
        }
        let rows = Self {
            data: data.as_slice(),
            start: layout.start_offset(),
            s,
            batch_stride: sb,
            token_stride: ss,
        };
        let m = b * s;
        // The last row ends last, so with this check no `row` runs past the storage.
        if m * k > 0 && rows.offset(m - 1) + k > rows.data.len() {
            candle_core::bail!("sgemm: the input's layout runs past its storage");
        }
        Ok((rows, m))
    }

    fn offset(&self, row: usize) -> usize {
        self.start + (row / self.s) * self.batch_stride + (row % self.s) * self.token_stride
    }

    /// Channels `from..from + len` of row `row` (of `b·s`).
    fn row(&self, row: usize, from: usize, len: usize) -> &'a [f32] {
        let first = self.offset(row) + from;
        &self.data[first..first + len]
    }
}

/// `x` packed: block `p` of `KC` inputs and micro-panel `r` of `MR` rows hold, at
/// `(p·row_panels + r)·KC·MR + kk·MR + i`, row `r·MR + i`'s input `p·KC + kk` (zero past
/// the last row).
fn pack_rows(x: &Rows, m: usize, k: usize) -> Vec<f32> {
    let row_panels = m.div_ceil(MR);
    let mut data = vec![0f32; k.div_ceil(KC) * row_panels * KC * MR];
    data.par_chunks_mut(KC * MR)
        .enumerate()
        .for_each(|(t, dst)| {
            let (p, r) = (t / row_panels, t % row_panels);
            let (k0, kc) = (p * KC, KC.min(k - p * KC));
            for i in 0..MR.min(m - r * MR) {
                for (kk, &v) in x.row(r * MR + i, k0, kc).iter().enumerate() {
                    dst[kk * MR + i] = v;
                }
            }
        });
    data
}

impl CustomOp1 for PackedWeight {
    fn name(&self) -> &'static str {
        "sgemm-packed"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = Rows::new(storage, layout, self.k)?;
        let rows = pack_rows(&x, m, self.k);
        let out = match &*self.panels {
            Panels::F32(w) => self.product(&rows, w, m),
            Panels::Bf16(w) => self.product(&rows, w, m),
            Panels::F16(w) => self.product(&rows, w, m),
        };
        Ok((CpuStorage::F32(out), Shape::from((1, m, self.n))))
    }
}

/// The output buffer shared by the tasks, each of which writes its own tiles only.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the tasks write disjoint sets of elements through the pointer (see
// `PackedWeight::product`), and the buffer outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer to element `offset`; writing through it is the caller's business.
    fn at(&self, offset: usize) -> *mut f32 {
        debug_assert!(offset < self.len);
        self.ptr.wrapping_add(offset)
    }
}

impl PackedWeight {
    /// The `m × n` product of the packed rows and panels, in parallel over (row block,
    /// run of column panels) tasks.
    fn product<T: PanelValue>(&self, rows: &[f32], w: &[T], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 || k == 0 {
            return out;
        }
        let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
        let col_tasks = col_panels.div_ceil(PANELS_PER_TASK);
        // Enough tasks to keep every thread busy: smaller row blocks when there are few.
        let threads = rayon::current_num_threads();
        let row_blocks = (2 * threads).div_ceil(col_tasks).max(1);
        let block = row_panels.div_ceil(row_blocks).clamp(1, MC / MR);
        let row_tasks = row_panels.div_ceil(block);
        let shared = Out {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        let isa = self.isa;
        (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
            // Consecutive tasks share their column panels (in L3).
            let (cb, rb) = (t / row_tasks, t % row_tasks);
            let micro_panels = rb * block..row_panels.min((rb + 1) * block);
            let panels = cb * PANELS_PER_TASK..col_panels.min((cb + 1) * PANELS_PER_TASK);
            for p in 0..k.div_ceil(KC) {
                let kc = KC.min(k - p * KC);
                for q in panels.clone() {
                    let panel = &w[(p * col_panels + q) * KC * NR..][..kc * NR];
                    let (j0, cols) = (q * NR, NR.min(n - q * NR));
                    for r in micro_panels.clone() {
                        let a = &rows[(p * row_panels + r) * KC * MR..][..kc * MR];
                        let tile_rows = MR.min(m - r * MR);
                        let first = r * MR * n + j0;
                        // SAFETY: the CPU has AVX-512F (`isa`). `a` holds `kc × MR` and
                        // `panel` `kc × NR` values. The tile's `tile_rows × cols`
                        // elements, rows `n` apart from `first`, lie inside the `m × n`
                        // output (row `r·MR + tile_rows - 1 < m`, column `j0 + cols ≤ n`),
                        // the pointer comes from the whole output buffer, and no other
                        // task writes them: tasks own disjoint (rows, column panels)
                        // pairs, and one task's tiles are disjoint. Nothing reads the
                        // buffer until every task is done.
                        unsafe {
                            kernel(
                                isa,
                                kc,
                                a,
                                panel,
                                shared.at(first),
                                n,
                                tile_rows,
                                cols,
                                p > 0,
                            );
                        }
                    }
                }
            }
        });
        out
    }
}

/// A panel's element type: loads of 16 consecutive values widened to f32.
trait PanelValue: Copy + Sync {
    /// Loads `ptr[0..16]` as f32.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F and the 16 values are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
impl PanelValue for f32 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(ptr) }
    }
}

#[cfg(target_arch = "x86_64")]
impl PanelValue for Bf16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 is the upper half of an f32: widen to 32 bits and shift (exact).
        // SAFETY: the caller's contract (16 × 2 bytes).
        unsafe {
            let bits = _mm256_loadu_si256(ptr as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl PanelValue for F16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 × 2 bytes); the conversion is exact.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(ptr as *const __m256i)) }
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl PanelValue for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl PanelValue for Bf16 {}
#[cfg(not(target_arch = "x86_64"))]
impl PanelValue for F16 {}

/// The micro-kernel: `C = A·B` (or `C += A·B` when `accumulate`) for the `rows × cols`
/// top-left corner of an `MR × NR` tile, with `A` a packed row micro-panel (`kc × MR`)
/// and `B` a packed column panel (`kc × NR`); `C`'s rows are `ldc` apart.
///
/// # Safety
///
/// `1 ≤ rows ≤ MR`, `1 ≤ cols ≤ NR`; `c` points into an allocation holding the
/// `rows × cols` elements at `c + i·ldc + j`, which nothing else accesses meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<T: PanelValue>(
    isa: Avx512,
    kc: usize,
    a: &[f32],
    b: &[T],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    let _ = isa;
    assert!(a.len() >= kc * MR && b.len() >= kc * NR && rows <= MR && cols <= NR);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` proves AVX-512F; the operands' lengths are checked above and the
    // output is the caller's contract.
    unsafe {
        x86::kernel(kc, a, b, c, ldc, rows, cols, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("sgemm: no AVX-512 ({c:?}, {ldc}, {accumulate})")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PanelValue, MR, NR};
    use std::arch::x86_64::*;

    /// See [`super::kernel`].
    ///
    /// # Safety
    ///
    /// As [`super::kernel`], with `a` and `b` holding `kc·MR` and `kc·NR` values, and
    /// the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel<T: PanelValue>(
        kc: usize,
        a: &[f32],
        b: &[T],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut lo = [_mm512_setzero_ps(); MR];
        let mut hi = [_mm512_setzero_ps(); MR];
        let (a, b) = (a.as_ptr(), b.as_ptr());
        for kk in 0..kc {
            // SAFETY: `kk < kc`, so the reads stay within `a` and `b`.
            unsafe {
                let b_lo = T::load16(b.add(kk * NR));
                let b_hi = T::load16(b.add(kk * NR + 16));
                let a_row = a.add(kk * MR);
                for i in 0..MR {
                    let ai = _mm512_set1_ps(*a_row.add(i));
                    lo[i] = _mm512_fmadd_ps(ai, b_lo, lo[i]);
                    hi[i] = _mm512_fmadd_ps(ai, b_hi, hi[i]);
                }
            }
        }
        let mask = |from: usize| -> __mmask16 {
            let n = cols.saturating_sub(from).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        let (m_lo, m_hi) = (mask(0), mask(16));
        for i in 0..MR {
            if i >= rows {
                break;
            }
            // SAFETY: row `i < rows` and the masked columns `< cols` are the caller's
            // elements; masked-off lanes are neither read nor written.
            unsafe {
                let row = c.add(i * ldc);
                let (mut v_lo, mut v_hi) = (lo[i], hi[i]);
                if accumulate {
                    v_lo = _mm512_add_ps(v_lo, _mm512_maskz_loadu_ps(m_lo, row));
                    v_hi = _mm512_add_ps(v_hi, _mm512_maskz_loadu_ps(m_hi, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m_lo, v_lo);
                _mm512_mask_storeu_ps(row.add(16), m_hi, v_hi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, max_diff};
    use candle_core::{Device, Module};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    /// The packed product against candle's.
    fn check(x: &Tensor, w: &Tensor) {
        let want = candle_nn::Linear::new(w.to_dtype(DType::F32).unwrap(), None)
            .forward(x)
            .unwrap();
        let Some(packed) = PackedWeight::new(w).unwrap() else {
            assert!(Avx512::detect().is_none());
            return;
        };
        let got = packed.forward(x).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = max_diff(&got, &want);
        assert!(
            diff <= 1e-5 * max_abs(&want).max(1e-30),
            "{:?} × {:?}: {diff}",
            x.dims(),
            w.dims()
        );
        // The panels give the weight back exactly.
        let w32 = w.to_dtype(DType::F32).unwrap();
        assert_eq!(max_diff(&packed.unpacked().unwrap(), &w32), 0.0);
    }

    #[test]
    fn matches_candles_product() {
        // Edges in every dimension: rows not a multiple of MR or of a row block,
        // columns not a multiple of NR or of a task's panels, inputs not a multiple of
        // KC (and fewer than KC), a single row.
        for (m, k, n) in [
            (1, 16, 32),
            (32, 16, 32),
            (33, 300, 47),
            (200, 256, 512),
            (333, 513, 600),
            (1000, 64, 1100),
            (50, 1, 3),
        ] {
            check(&randn(&[1, m, k]), &randn(&[n, k]));
        }
        // Two batch entries, a plain matrix, four dimensions.
        check(&randn(&[2, 70, 40]), &randn(&[90, 40]));
        check(&randn(&[70, 40]), &randn(&[90, 40]));
        check(&randn(&[2, 3, 20, 40]), &randn(&[90, 40]));
    }

    #[test]
    fn strided_inputs_and_half_precision_weights() {
        // Rows of a wider tensor (a view), and a transposed pair.
        let wide = randn(&[2, 60, 100]);
        check(&wide.narrow(2, 30, 50).unwrap(), &randn(&[70, 50]));
        let t = randn(&[60, 2, 50]).transpose(0, 1).unwrap();
        check(&t, &randn(&[70, 50]));
        // Weights kept in bf16 or f16 are widened exactly in the kernel.
        let x = randn(&[1, 100, 300]);
        for dtype in [DType::BF16, DType::F16] {
            check(
                &x,
                &(randn(&[77, 300]) * 3.0).unwrap().to_dtype(dtype).unwrap(),
            );
        }
    }

    #[test]
    fn f16_bits_convert_exactly() {
        for (bits, want) in [
            (0x0000u16, 0.0f32),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x0001, 2f32.powi(-24)),
            (0x03ff, 1023.0 * 2f32.powi(-24)),
            (0x3555, 0.333_251_95),
            (0x7c00, f32::INFINITY),
            (0xfc00, f32::NEG_INFINITY),
        ] {
            assert_eq!(f16_to_f32(bits), want, "{bits:#x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn other_dtypes_and_empty_inputs() {
        let w = randn(&[8, 16]);
        let Some(packed) = PackedWeight::new(&w).unwrap() else {
            return;
        };
        // f64 runs candle's product on the unpacked weight.
        let x = randn(&[1, 5, 16]).to_dtype(DType::F64).unwrap();
        let want = x
            .broadcast_matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
            .unwrap();
        let got = packed.forward(&x).unwrap();
        assert_eq!(got.dtype(), DType::F64);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&f32(&got), &f32(&want)) < 1e-5);
        // No rows: an empty output; the wrong width: an error.
        let empty = Tensor::zeros((0, 4, 16), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(packed.forward(&empty).unwrap().dims(), &[0, 4, 8]);
        let err = packed.forward(&randn(&[2, 15])).unwrap_err().to_string();
        assert!(
            err.contains("15 input features for a 16-wide layer"),
            "{err}"
        );
    }
}
