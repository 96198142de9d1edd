//! Vectorized exp for the non-positive arguments the online softmax produces.

use crate::simd::Simd;

/// Arguments below this give 0: e^-87 is the smallest normal f32 order of magnitude, and a
/// term that small is below f32 resolution of the row's largest term (which is 1).
pub(crate) const EXP_UNDERFLOW: f32 = -87.0;

// Cody-Waite split of ln 2 and the Cephes minimax polynomial for e^r on [-ln2/2, ln2/2].
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// e^u for u <= 0, accurate to about 1 ulp. Arguments below [`EXP_UNDERFLOW`] (and -inf)
/// give exactly 0; NaN propagates.
#[inline(always)]
pub(crate) unsafe fn exp_nonpositive<S: Simd>(u: S::F) -> S::F {
    unsafe {
        // max(lo, u) keeps a NaN `u` (maxps returns its second operand on NaN).
        let x = S::max(S::splat(EXP_UNDERFLOW - 0.5), u);
        let n = S::round(S::mul(x, S::splat(LOG2E)));
        let r = S::fnmadd(n, S::splat(LN2_HI), x);
        let r = S::fnmadd(n, S::splat(LN2_LO), r);
        let mut p = S::splat(P[0]);
        for &c in &P[1..] {
            p = S::fmadd(p, r, S::splat(c));
        }
        let y = S::fmadd(p, S::mul(r, r), S::add(r, S::splat(1.0)));
        S::zero_where_below(u, S::splat(EXP_UNDERFLOW), S::scale2(y, n))
    }
}

/// Largest magnitudes between these need no scaling: n squares of deviations of values
/// below 2^480 stay finite for any n below 2^40, and squares of deviations of values above
/// 2^-400 (down to 2^-53 of the largest) stay normal.
const SAFE_HIGH: f64 = 3.121_748_550_315_992_2e144; // 2^480
const SAFE_LOW: f64 = 3.872_591_914_849_318e-121; // 2^-400

/// A power of two that brings the largest magnitude of `values` near 1 (below 4) when it
/// lies outside [2^-400, 2^480], where sums and squares of the values could overflow to
/// inf (and their differences to NaN) or underflow to 0; 1 otherwise. Multiplying by a power of
/// two is exact, so means, deviations and correlations of the scaled values are those of the
/// values scaled, bit for bit, wherever the unscaled computation neither overflows nor
/// underflows. Non-finite values are left to the caller's checks (scale 1).
pub(crate) fn unit_scale(values: &[f64]) -> f64 {
    let peak = values.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
    if peak == 0.0 || !peak.is_finite() || (SAFE_LOW..=SAFE_HIGH).contains(&peak) {
        return 1.0;
    }
    // peak = m 2^e with m in [1, 2) (e = -1023 for subnormals); 2^-e is a normal float for e
    // in [-1022, 1022], and peak 2^-e < 4 at the clamped ends.
    let e = (((peak.to_bits() >> 52) & 0x7ff) as i32 - 1023).clamp(-1022, 1022);
    f64::from_bits(((1023 - e) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{Isa, Portable};

    /// e^x for LANES inputs at `x`, written to `out`.
    unsafe fn exp_block<S: Simd>(x: &[f32], out: &mut [f32]) {
        unsafe { S::store(exp_nonpositive::<S>(S::load(x.as_ptr())), out.as_mut_ptr()) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn exp_avx512(x: &[f32], out: &mut [f32]) {
        unsafe { exp_block::<crate::simd::Avx512>(x, out) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_avx2(x: &[f32], out: &mut [f32]) {
        unsafe { exp_block::<crate::simd::Avx2>(x, out) }
    }

    fn exp_with(isa: Isa, x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0.0; 16];
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => exp_avx512(x, &mut out),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    exp_avx2(&x[..8], &mut out[..8]);
                    exp_avx2(&x[8..], &mut out[8..]);
                }
                _ => {
                    exp_block::<Portable>(&x[..8], &mut out[..8]);
                    exp_block::<Portable>(&x[8..], &mut out[8..]);
                }
            }
        }
        out
    }

    fn ulps(got: f32, x: f32) -> u32 {
        let want = f64::from(x).exp() as f32;
        (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_one_ulp_over_its_range() {
        for isa in Isa::supported() {
            let mut worst = 0;
            let n = 1 << 21;
            for chunk in 0..n / 16 {
                let x: [f32; 16] =
                    std::array::from_fn(|k| -(EXP_UNDERFLOW.abs()) * ((chunk * 16 + k) as f32 / n as f32));
                let y = exp_with(isa, &x);
                for k in 0..16 {
                    worst = worst.max(ulps(y[k], x[k]));
                }
            }
            assert!(worst <= 1, "{isa}: exp is off by {worst} ulp");
        }
    }

    #[test]
    fn unit_scale_is_a_power_of_two_that_brings_extremes_near_one() {
        assert_eq!(unit_scale(&[]), 1.0);
        assert_eq!(unit_scale(&[0.0, -0.0]), 1.0);
        assert_eq!(unit_scale(&[1.0, -3.0, 1e100, 1e-100]), 1.0, "ordinary values are left alone");
        assert_eq!(unit_scale(&[1.0, f64::NAN]), 1.0);
        for peak in [f64::MAX, -f64::MAX, 1e300, 2e145, 1e-130, 1e-300, f64::MIN_POSITIVE, 5e-324] {
            let s = unit_scale(&[peak / 3.0, peak]);
            assert_eq!(s.to_bits() & ((1 << 52) - 1), 0, "{peak}: {s} is not a power of two");
            let scaled = (peak * s).abs();
            assert!((2f64.powi(-52)..4.0).contains(&scaled), "{peak} scales to {scaled}");
        }
    }

    #[test]
    fn exp_edge_values() {
        for isa in Isa::supported() {
            let mut x = [0.0f32; 16];
            x[..6].copy_from_slice(&[0.0, -0.0, f32::NEG_INFINITY, -87.5, -1e30, f32::NAN]);
            let y = exp_with(isa, &x);
            assert_eq!(&y[..5], &[1.0, 1.0, 0.0, 0.0, 0.0], "{isa}");
            assert!(y[5].is_nan(), "{isa}: NaN must propagate");
        }
    }
}
