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
