//! Numeric helpers: exact power-of-two scaling of samples near the f64 limits.

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
}
