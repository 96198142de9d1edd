//! The vectorized exp of the token-statistics sweep, for arguments in [`EXP_MIN`, 0].
//!
//! On AVX2, and for 2-byte logits on any instruction set, the sweep is bound by arithmetic,
//! not memory, and the exp is most of that arithmetic. This one costs 6 FMA-port operations
//! and 5 others per vector (the Cephes-style exp it replaced: 11 and 8 on AVX2):
//! - the caller clamps the argument to [`EXP_MIN`, 0] (which also makes -inf finite for its
//!   `e^u u` term), so there are no range checks;
//! - with L lanes per vector, one FMA with a magic constant rounds m = round(x L / ln 2) and
//!   leaves m + 127 L in the low mantissa bits: m = L n + j gives the exponent n (a shift and
//!   a mask) and the index j of 2^(j / L) in a table of L entries held in one register (a
//!   lane permute, no memory gather);
//! - r = x - m ln2 / L is one FMA (two without FMA); |r| <= ln2 / 2L = 0.043, where
//!   1 + r + D2 r^2 + D3 r^3 is within 7.6e-8 of e^r: 2 FMAs;
//! - e^x = t + (t r) q with t = 2^n 2^(j / L): 2 more. At the clamp, m = -127 L: n = -127 and
//!   j = 0, where t is +0, so -inf contributes exactly 0.
//!
//! The rounding of ln 2 to f32 (by 1.9e-9) makes the reduction compute e^(x (1 + 2.7e-9)),
//! i.e. a change of the temperature by 3e-9: relative error 2.4e-7 at x = -88, 3e-8 at
//! x = -10. In all, relative error <= 4.5e-7 (`EXP_MAX_REL_ERROR`) wherever e^x is a normal f32
//! (x >= -87.33); below that the result is within 2^-126 of e^x, and exactly 0 at the clamp.
//! A relative error of 4e-7 per term moves H by at most 4e-7 (1 + E|u - H|) and G and c by
//! about 1e-6 of their size, within SPEC 2's 1e-4 relative and 1e-5 / 1e-6 absolute bounds.

use crate::simd::Simd;

/// The lowest argument: callers clamp to it (-inf included) and get exactly 0 for it. Any x
/// in [-88.05, -88.01] rounds to m = -127 L for both 8 and 16 lanes.
pub(crate) const EXP_MIN: f32 = -88.03;

/// The largest relative error against the exact e^x where the result is a normal f32 (the unit
/// tests check every 17th f32 of that range and random samples of it).
#[cfg(test)]
const EXP_MAX_REL_ERROR: f64 = 4.5e-7;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an integer, which
/// lands in the low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;
/// ln 2 rounded to f32, for the one-FMA reduction (ln2 / L is exact: L is a power of two).
const LN2: f32 = std::f32::consts::LN_2;
/// Cody-Waite split of ln 2 for targets without FMA: m * LN2_HI / L is exact for |m| < 2^14.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// e^r = 1 + r (1 + r (D2 + r D3)) on [-ln2/16, ln2/16], minimax in relative error (7.6e-8)
/// with D2 rounded to f32 before D3 was refitted.
const D2: f32 = 0.500_057_5;
const D3: f32 = 0.166_199_12;

/// e^x of each of N vectors, x in [`EXP_MIN`, 0] (callers clamp); a NaN x gives NaN. Each
/// step runs across all N vectors before the next, so the in-order front end always has N
/// independent operations to issue. Plain loops, not closures: a closure handed to generic
/// code (`array::from_fn`) may not be inlined into a `#[target_feature]` caller.
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd, const N: usize>(x: [S::F; N]) -> [S::F; N] {
    unsafe {
        let lanes = S::LANES as f32;
        let magic = ROUNDER + 127.0 * lanes;
        let (mut k, mut m, mut r, mut q) = (x, x, x, [S::splat(D3); N]);
        for i in 0..N {
            k[i] = S::fmadd(x[i], S::splat(LOG2E * lanes), S::splat(magic));
        }
        for i in 0..N {
            m[i] = S::sub(k[i], S::splat(magic));
        }
        for i in 0..N {
            r[i] = if S::FUSED {
                S::fnmadd(m[i], S::splat(LN2 / lanes), x[i])
            } else {
                // Unfused, c - a * b rounds the product: split ln 2 so the large part is exact.
                let hi = S::fnmadd(m[i], S::splat(LN2_HI / lanes), x[i]);
                S::fnmadd(m[i], S::splat(LN2_LO / lanes), hi)
            };
        }
        for c in [D2, 1.0] {
            for i in 0..N {
                q[i] = S::fmadd(q[i], r[i], S::splat(c));
            }
        }
        // A NaN x leaves NaN in r and q, and NaN * anything is NaN.
        for i in 0..N {
            let t = S::pow2_fraction(k[i]);
            k[i] = S::fmadd(S::mul(t, r[i]), q[i], t);
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{Isa, Portable};
    use proptest::prelude::*;

    #[derive(Clone, Copy)]
    enum Op {
        Exp,
        Pow2Fraction,
    }

    /// `op` of LANES inputs at `x`, written to `out`.
    unsafe fn apply<S: Simd>(op: Op, x: &[f32], out: &mut [f32]) {
        unsafe {
            let v = S::load(x.as_ptr());
            let y = match op {
                Op::Exp => exp::<S, 1>([v])[0],
                Op::Pow2Fraction => S::pow2_fraction(v),
            };
            S::store(y, out.as_mut_ptr())
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn apply_avx512(op: Op, x: &[f32], out: &mut [f32]) {
        unsafe { apply::<crate::simd::Avx512>(op, x, out) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn apply_avx2(op: Op, x: &[f32], out: &mut [f32]) {
        unsafe { apply::<crate::simd::Avx2>(op, x, out) }
    }

    /// Lanes of one vector, which is also the size of the 2^(j / L) table.
    fn lanes(isa: Isa) -> usize {
        if isa == Isa::Avx512 { 16 } else { 8 }
    }

    /// `op` of 16 arguments with one instruction set.
    fn apply_with(isa: Isa, op: Op, x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0.0; 16];
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => apply_avx512(op, x, &mut out),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    apply_avx2(op, &x[..8], &mut out[..8]);
                    apply_avx2(op, &x[8..], &mut out[8..]);
                }
                _ => {
                    apply::<Portable>(op, &x[..8], &mut out[..8]);
                    apply::<Portable>(op, &x[8..], &mut out[8..]);
                }
            }
        }
        out
    }

    fn exp_with(isa: Isa, x: &[f32; 16]) -> [f32; 16] {
        apply_with(isa, Op::Exp, x)
    }

    /// Smallest x whose e^x is a normal f32: ln(2^-126) = -87.336.
    const NORMAL_FROM: f32 = -87.33;

    /// The largest relative error of `exp_with(isa)` over `xs` (all in [NORMAL_FROM, 0]).
    fn worst_relative_error(isa: Isa, xs: impl Iterator<Item = f32>) -> (f64, f32) {
        let mut worst = (0.0, 0.0);
        let mut buf = [0.0f32; 16];
        let mut fill = 0;
        let check = |buf: &[f32; 16], worst: &mut (f64, f32)| {
            let y = exp_with(isa, buf);
            for (&x, &got) in buf.iter().zip(&y) {
                let want = f64::from(x).exp();
                let rel = (f64::from(got) - want).abs() / want;
                if rel > worst.0 || rel.is_nan() {
                    *worst = (rel, x);
                }
            }
        };
        for x in xs {
            buf[fill] = x;
            fill += 1;
            if fill == 16 {
                check(&buf, &mut worst);
                fill = 0;
            }
        }
        buf[fill..].fill(0.0);
        check(&buf, &mut worst);
        worst
    }

    #[test]
    fn relative_error_over_every_17th_float_of_the_normal_range() {
        // All f32 in [NORMAL_FROM, 0] in bit order (denser near 0, as floats are), with
        // stride 17 so every exponent and every table entry is hit many times.
        let (lo, hi) = ((-0.0f32).to_bits(), NORMAL_FROM.to_bits());
        for isa in Isa::supported() {
            let (worst, at) = worst_relative_error(isa, (lo..=hi).step_by(17).map(f32::from_bits));
            assert!(worst <= EXP_MAX_REL_ERROR, "{isa}: relative error {worst:e} at x = {at}");
        }
    }

    proptest! {
        #[test]
        fn relative_error_on_random_arguments(xs in prop::collection::vec(NORMAL_FROM..=0.0f32, 16)) {
            for isa in Isa::supported() {
                let (worst, at) = worst_relative_error(isa, xs.iter().copied());
                prop_assert!(worst <= EXP_MAX_REL_ERROR, "{}: relative error {:e} at x = {}", isa, worst, at);
            }
        }
    }

    #[test]
    fn below_the_normal_range_results_are_within_2_pow_minus_126_and_0_at_the_clamp() {
        for isa in Isa::supported() {
            // Every f32 from the clamp up to the normal range, 16 at a time.
            let xs: Vec<f32> = (NORMAL_FROM.to_bits()..=EXP_MIN.to_bits()).map(f32::from_bits).collect();
            for chunk in xs.chunks(16) {
                let mut x = [EXP_MIN; 16];
                x[..chunk.len()].copy_from_slice(chunk);
                let y = exp_with(isa, &x);
                for (&x, &y) in x.iter().zip(&y) {
                    let err = (f64::from(y) - f64::from(x).exp()).abs();
                    assert!(y >= 0.0 && err < 2f64.powi(-126), "{isa}: e^{x} = {y}");
                }
            }
            let mut x = [-1.0f32; 16];
            x[..3].copy_from_slice(&[EXP_MIN, 0.0, -0.0]);
            let y = exp_with(isa, &x);
            assert_eq!(y[0].to_bits(), 0, "{isa}: the clamp value gives +0");
            assert_eq!((y[1], y[2]), (1.0, 1.0), "{isa}: e^0 is exactly 1");
        }
    }

    #[test]
    fn pow2_fraction_is_the_correctly_rounded_power_for_every_entry_and_exponent() {
        for isa in Isa::supported() {
            let l = lanes(isa);
            let magic = f64::from(ROUNDER) + 127.0 * l as f64;
            for n in -127..=0i32 {
                let ks: Vec<f32> = (0..l).map(|j| (magic + (l as i32 * n) as f64 + j as f64) as f32).collect();
                let mut k = [0.0f32; 16];
                k.chunks_mut(l).for_each(|chunk| chunk.copy_from_slice(&ks));
                let got = apply_with(isa, Op::Pow2Fraction, &k);
                for (j, got) in got[..l].iter().enumerate() {
                    let entry = 2f64.powf(j as f64 / l as f64) as f32;
                    let want = if n == -127 {
                        // Exponent field 0: only the mantissa is left, and it is 0 for j = 0.
                        f32::from_bits(entry.to_bits() & 0x7F_FFFF)
                    } else {
                        entry * 2f32.powi(n)
                    };
                    assert_eq!(got.to_bits(), want.to_bits(), "{isa}: n = {n}, j = {j}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn nan_propagates() {
        for isa in Isa::supported() {
            let mut x = [-1.0f32; 16];
            x[3] = f32::NAN;
            let y = exp_with(isa, &x);
            assert!(y[3].is_nan(), "{isa}: NaN must propagate");
            assert!(y.iter().enumerate().all(|(k, v)| k == 3 || (f64::from(*v) - (-1f64).exp()).abs() < 1e-7));
        }
    }
}
