//! Vectorisable element-wise math for the CPU kernels, and the dispatch that compiles a
//! kernel once per instruction set and runs the variant this CPU supports.
//!
//! The functions here are branch-free (`if` on values compiles to selects), so loops over
//! slices that call them vectorise; `std`'s `exp`, `erf` and friends are calls into a
//! scalar library routine per element. A kernel is a [`Kernel`] value whose `run` is
//! `#[inline(always)]`: [`Simd::run`] calls it from inside a function compiled with the
//! CPU's features, so the kernel's loops are vectorised for AVX-512 or AVX2 + FMA. Rust
//! has no portable SIMD on stable and no well-kept crate offers these functions for plain
//! loops, hence the hand-written polynomials.

/// A kernel to run with the best instruction set available: `run::<true>` may use fused
/// multiply-add (the CPU has it), `run::<false>` must not.
pub(crate) trait Kernel {
    type Output;

    /// Must be `#[inline(always)]`, so that it is compiled inside the caller's
    /// `target_feature` function.
    fn run<const FMA: bool>(self) -> Self::Output;
}

/// The compiled variant of a kernel this CPU runs, as a proof that the CPU was checked.
///
/// [`Simd::run`] executes AVX2 or AVX-512 instructions on the strength of this value
/// alone, so a `Simd` must never name a variant the CPU lacks. The level is a private
/// field and the only constructors are [`Simd::detect`] and [`Simd::supported`], which
/// both keep just the variants runtime feature detection ([`Level::available`]) found:
/// code outside this module (the kernels, their tests) can copy a detected value but
/// cannot make one up, so no safe code can reach an instruction the CPU does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Simd(Level);

/// The instruction sets a kernel is compiled for; private to this module (see [`Simd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    /// Every variant, best first.
    const ALL: [Self; if cfg!(target_arch = "x86_64") { 3 } else { 1 }] = [
        #[cfg(target_arch = "x86_64")]
        Self::Avx512,
        #[cfg(target_arch = "x86_64")]
        Self::Avx2,
        Self::Portable,
    ];

    /// Whether this CPU has the variant's instructions (runtime feature detection).
    fn available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
        }
    }
}

impl Simd {
    /// The best variant for this CPU (detected once).
    pub(crate) fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            Simd(
                Level::ALL
                    .into_iter()
                    .find(|l| l.available())
                    .unwrap_or(Level::Portable),
            )
        })
    }

    /// Every variant this CPU can run, best first (for tests that compare them).
    #[cfg(test)]
    pub(crate) fn supported() -> Vec<Self> {
        Level::ALL
            .into_iter()
            .filter(|l| l.available())
            .map(Simd)
            .collect()
    }

    /// Runs `kernel` compiled for this variant.
    pub(crate) fn run<K: Kernel>(self, kernel: K) -> K::Output {
        match self.0 {
            Level::Portable => kernel.run::<false>(),
            // SAFETY: a `Simd` holding these levels exists only where `Level::available`
            // found the CPU's features: its field is private to this module, whose only
            // constructors (`detect`, `supported`) filter on `available`.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { x86::avx2(kernel) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { x86::avx512(kernel) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Kernel;

    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<K: Kernel>(kernel: K) -> K::Output {
        kernel.run::<true>()
    }

    /// # Safety
    ///
    /// The CPU must support AVX-512F (which implies FMA).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<K: Kernel>(kernel: K) -> K::Output {
        kernel.run::<true>()
    }
}

/// `a·b + c`, fused where the instruction is known to exist (elsewhere `mul_add` would
/// call a slow library routine).
#[inline(always)]
pub(crate) fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` to about 2 ulp for `x ≤ 88`, 0 below `-87.3` (where f32 results would be
/// subnormal), `exp(88)` above 88. Cody–Waite reduction `x = n·ln 2 + r`,
/// `|r| ≤ ln 2 / 2`, and the Cephes `expf` polynomial for `e^r`.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LO: f32 = -87.3;
    const HI: f32 = 88.0;
    // 1.5·2²³: adding it rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = if x < LO { LO } else { x };
    let xc = if xc > HI { HI } else { xc };
    let t = mul_add::<FMA>(xc, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = mul_add::<FMA>(-n, LN2_HI, xc);
    let r = mul_add::<FMA>(-n, LN2_LO, r);
    let p = 1.987_569_2e-4;
    let p = mul_add::<FMA>(p, r, 1.398_199_9e-3);
    let p = mul_add::<FMA>(p, r, 8.333_452e-3);
    let p = mul_add::<FMA>(p, r, 4.166_579_6e-2);
    let p = mul_add::<FMA>(p, r, 1.666_666_5e-1);
    let p = mul_add::<FMA>(p, r, 0.5);
    let p = mul_add::<FMA>(p, r * r, r) + 1.0;
    // 2ⁿ from the integer in `t`'s mantissa; `n` lies in [-126, 127].
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2 = f32::from_bits(((n + 127) << 23) as u32);
    if x < LO {
        0.0
    } else {
        p * pow2
    }
}

/// `erf(x)` to within 1e-6 absolute (the formula: 1.5e-7; f32 rounding adds the rest): Abramowitz and Stegun's formula 7.1.26,
/// `1 - t·P(t)·e^{-x²}` with `t = 1 / (1 + p·|x|)`, carrying the sign of `x` (the same
/// approximation PyTorch vectorises for its exact GELU).
#[inline(always)]
pub(crate) fn erf<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / mul_add::<FMA>(0.327_591_1, a, 1.0);
    let p = mul_add::<FMA>(1.061_405_4, t, -1.453_152_1);
    let p = mul_add::<FMA>(p, t, 1.421_413_7);
    let p = mul_add::<FMA>(p, t, -0.284_496_74);
    let p = mul_add::<FMA>(p, t, 0.254_829_6);
    let y = mul_add::<FMA>(-p * t, exp::<FMA>(-a * a), 1.0);
    y.copysign(x)
}

/// The exact (erf) GELU, `x·(1 + erf(x/√2))/2`.
#[inline(always)]
pub(crate) fn gelu_erf<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// SiLU, `x / (1 + e^{-x})`.
#[inline(always)]
pub(crate) fn silu<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp::<FMA>(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every point of a grid over `[lo, hi]` with each supported variant,
    /// against `reference` in f64; returns the largest absolute and relative errors.
    fn errors(
        lo: f64,
        hi: f64,
        f: fn(Simd, &[f32], &mut [f32]),
        reference: impl Fn(f64) -> f64,
    ) -> (f64, f64) {
        let n = 200_001;
        let xs: Vec<f32> = (0..n)
            .map(|i| (lo + (hi - lo) * i as f64 / (n - 1) as f64) as f32)
            .collect();
        let (mut abs, mut rel) = (0f64, 0f64);
        for simd in Simd::supported() {
            let mut ys = vec![0f32; n];
            f(simd, &xs, &mut ys);
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = reference(x as f64);
                let err = (y as f64 - want).abs();
                abs = abs.max(err);
                rel = rel.max(err / want.abs().max(1e-30));
            }
        }
        (abs, rel)
    }

    /// Maps a slice with one of the functions, as a kernel.
    struct Map<'a> {
        xs: &'a [f32],
        ys: &'a mut [f32],
        which: u8,
    }

    impl Kernel for Map<'_> {
        type Output = ();
        #[inline(always)]
        fn run<const FMA: bool>(self) {
            for (y, &x) in self.ys.iter_mut().zip(self.xs) {
                *y = match self.which {
                    0 => exp::<FMA>(x),
                    1 => erf::<FMA>(x),
                    2 => gelu_erf::<FMA>(x),
                    _ => silu::<FMA>(x),
                };
            }
        }
    }

    #[test]
    fn only_detected_variants_are_handed_out() {
        let supported = Simd::supported();
        // The portable variant runs everywhere, and comes last (best first).
        assert_eq!(supported.last(), Some(&Simd(Level::Portable)));
        assert!(supported.iter().all(|s| s.0.available()), "{supported:?}");
        // `detect` picks the best of them.
        assert_eq!(Some(&Simd::detect()), supported.first());
        #[cfg(target_arch = "x86_64")]
        {
            let has = |l: Level| supported.contains(&Simd(l));
            assert_eq!(
                has(Level::Avx512),
                std::arch::is_x86_feature_detected!("avx512f")
            );
            assert_eq!(
                has(Level::Avx2),
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            );
        }
    }

    #[test]
    fn exp_is_accurate() {
        let f = |s: Simd, xs: &[f32], ys: &mut [f32]| s.run(Map { xs, ys, which: 0 });
        let (_, rel) = errors(-87.0, 88.0, f, f64::exp);
        assert!(rel < 3e-7, "exp relative error {rel}");
        for simd in Simd::supported() {
            let mut ys = [1f32; 3];
            simd.run(Map {
                xs: &[-100.0, f32::NEG_INFINITY, 0.0],
                ys: &mut ys,
                which: 0,
            });
            assert_eq!(ys, [0.0, 0.0, 1.0], "{simd:?}");
        }
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        let erf_ref = |x: f64| candle_core::cpu::erf::erf_f64(x);
        let f = |s: Simd, xs: &[f32], ys: &mut [f32]| s.run(Map { xs, ys, which: 1 });
        let (abs, _) = errors(-10.0, 10.0, f, erf_ref);
        assert!(abs < 1e-6, "erf absolute error {abs}");
        let gelu_ref =
            |x: f64| 0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
        let f = |s: Simd, xs: &[f32], ys: &mut [f32]| s.run(Map { xs, ys, which: 2 });
        let (abs, _) = errors(-12.0, 12.0, f, gelu_ref);
        assert!(abs < 2e-6, "gelu absolute error {abs}");
        // Relative error where the value is not tiny (x > -3: |gelu| ≥ 4e-3).
        let (_, rel) = errors(-3.0, 12.0, f, gelu_ref);
        assert!(rel < 1e-4, "gelu relative error {rel}");
    }

    #[test]
    fn silu_is_accurate() {
        let f = |s: Simd, xs: &[f32], ys: &mut [f32]| s.run(Map { xs, ys, which: 3 });
        let (abs, _) = errors(-100.0, 100.0, f, |x| x / (1.0 + (-x).exp()));
        assert!(abs < 1e-5, "silu absolute error {abs}");
        let (_, rel) = errors(-20.0, 100.0, f, |x| x / (1.0 + (-x).exp()));
        assert!(rel < 1e-6, "silu relative error {rel}");
    }
}
