mod common;

use common::Rng;
use corrpo_core::correlation::average_ranks;
use corrpo_core::{
    Advantage, Error, Gate, Method, RegularizeConfig, Undefined, correlation, fingerprint, regularize,
    rollout_correlations,
};
use proptest::prelude::*;

#[test]
fn ranks_average_ties() {
    assert_eq!(average_ranks(&[10.0, 20.0, 20.0, 30.0, 20.0]), vec![1.0, 3.0, 3.0, 5.0, 3.0]);
    assert_eq!(average_ranks(&[-0.0, 0.0]), vec![1.5, 1.5]);
}

/// Pearson from the textbook one-pass sums, in f64: an independent formula.
fn pearson_sums(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (sx, sy): (f64, f64) = (x.iter().sum(), y.iter().sum());
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
    let sxx: f64 = x.iter().map(|a| a * a).sum();
    let syy: f64 = y.iter().map(|b| b * b).sum();
    (n * sxy - sx * sy) / ((n * sxx - sx * sx).sqrt() * (n * syy - sy * sy).sqrt())
}

proptest! {
    #[test]
    fn pearson_matches_textbook_formula(seed in any::<u64>(), n in 3usize..200) {
        let mut rng = Rng(seed);
        let x: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let y: Vec<f64> = x.iter().map(|v| 0.3 * v + rng.normal()).collect();
        let got = correlation(&x, &y, Method::Pearson, 2).unwrap();
        prop_assert!((got - pearson_sums(&x, &y)).abs() < 1e-10);
    }

    #[test]
    fn spearman_is_invariant_to_monotone_maps(seed in any::<u64>(), n in 3usize..200) {
        let mut rng = Rng(seed);
        let x: Vec<f64> = (0..n).map(|_| (rng.normal() * 4.0).round()).collect();
        let y: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mapped: Vec<f64> = x.iter().map(|v| v.exp() * 3.0 + 1.0).collect();
        let a = correlation(&x, &y, Method::Spearman, 2);
        let b = correlation(&mapped, &y, Method::Spearman, 2);
        prop_assert_eq!(a, b);
    }
}

#[test]
fn perfect_and_inverted_correlations() {
    let x: Vec<f64> = (0..20).map(f64::from).collect();
    let down: Vec<f64> = x.iter().map(|v| (-v).exp()).collect();
    assert_eq!(correlation(&x, &down, Method::Spearman, 8), Ok(-1.0));
    let affine: Vec<f64> = x.iter().map(|v| 2.0 * v - 7.0).collect();
    assert!((correlation(&x, &affine, Method::Pearson, 8).unwrap() - 1.0).abs() < 1e-15);
}

#[test]
fn undefined_correlations_say_why() {
    let x = [1.0, 2.0, 3.0];
    assert_eq!(correlation(&x, &x, Method::Spearman, 8), Err(Undefined::TooFewTokens { n: 3, min: 8 }));
    assert_eq!(correlation(&[0.1; 9], &[1.0; 9], Method::Pearson, 8), Err(Undefined::ConstantX));
    let ramp: Vec<f64> = (0..9).map(f64::from).collect();
    assert_eq!(correlation(&ramp, &[0.1; 9], Method::Spearman, 8), Err(Undefined::ConstantY));
}

#[test]
fn rollouts_split_the_ragged_batch() {
    let mut rng = Rng(9);
    let lengths = [10, 3, 0, 25];
    let n: usize = lengths.iter().sum();
    let h: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
    let g: Vec<f64> = h.iter().map(|v| 1.0 - v + 0.1 * rng.uniform()).collect();
    let got = rollout_correlations(&h, &g, &lengths, Method::Spearman, 8).unwrap();
    assert_eq!(got.iter().map(|r| r.n_tokens).collect::<Vec<_>>(), lengths);
    assert_eq!(got[0].rho, correlation(&h[..10], &g[..10], Method::Spearman, 8));
    assert_eq!(got[1].rho, Err(Undefined::TooFewTokens { n: 3, min: 8 }));
    assert_eq!(got[2].rho, Err(Undefined::TooFewTokens { n: 0, min: 8 }));
    assert_eq!(got[3].rho, correlation(&h[13..], &g[13..], Method::Spearman, 8));
    assert!(got[3].value() < -0.8);

    assert!(matches!(rollout_correlations(&h, &g, &[1, 2], Method::Spearman, 8), Err(Error::Shape(_))));
    assert!(matches!(rollout_correlations(&h, &g, &lengths, Method::Spearman, 1), Err(Error::Config(_))));
    let mut bad = h.clone();
    bad[12] = f64::NAN;
    let err = rollout_correlations(&bad, &g, &lengths, Method::Spearman, 8).unwrap_err();
    assert_eq!(err.to_string(), "entropy[12]: NaN is not finite");
}

#[test]
fn fingerprint_pools_and_groups_by_token() {
    // Token 5 appears twice: the per-id view averages it before correlating.
    let h = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6];
    let g: Vec<f64> = h.iter().map(|v| 1.0 - v).collect();
    let ids = [5, 1, 2, 3, 4, 5, 6, 7, 8];
    let f = fingerprint(&h, &g, Some(&ids), Some(&[9]), Method::Spearman, 2).unwrap();
    assert_eq!(f.n_tokens, 9);
    assert!((f.pooled.unwrap() + 1.0).abs() < 1e-12);
    assert_eq!(f.n_unique_tokens, Some(8));
    let mean_h = [0.9, 0.5, 0.3, 0.7, 0.15, 0.8, 0.4, 0.6];
    let mean_g = mean_h.map(|v| 1.0 - v);
    assert_eq!(f.unique, Some(correlation(&mean_h, &mean_g, Method::Spearman, 2)));
    assert_eq!((f.n_rollouts, f.n_rollouts_defined), (Some(1), Some(1)));
    assert_eq!(f.rollout_mean, f.pooled.ok());
    assert!((f.entropy_mean - 0.5).abs() < 1e-12 && (f.grad_norm_mean - 0.5).abs() < 1e-12);
}

fn config(coef: f64, gate: Gate, advantage: Advantage) -> RegularizeConfig {
    RegularizeConfig { coef, gate, threshold: 1.0, advantage }
}

#[test]
fn regularized_rewards_and_grpo_advantages() {
    let rewards = [1.0, 0.0, 1.0, 0.0, 5.0];
    let rho = [-0.5, 0.2, f64::NAN, -0.9, 0.4];
    let out = regularize(Some(&rewards), &rho, &[4, 1], config(0.1, Gate::None, Advantage::Grpo)).unwrap();
    assert_eq!(out.rewards, vec![1.05, -0.020000000000000004, 1.0, 0.09000000000000001, 4.96]);
    assert_eq!(out.applied, vec![true, true, false, true, true]);
    assert_eq!(out.rho_undefined, vec![false, false, true, false, false]);
    let r = &out.rewards[..4];
    let mean = r.iter().sum::<f64>() / 4.0;
    let sd = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
    for (a, x) in out.advantages.iter().zip(r) {
        assert!((a - (x - mean) / (sd + 1e-6)).abs() < 1e-12);
    }
    assert_eq!(out.advantages[4], 0.0, "a group of one has no baseline");
}

#[test]
fn gate_correct_only_pays_right_answers() {
    let out =
        regularize(Some(&[1.0, 0.0]), &[-0.5, -0.5], &[2], config(0.2, Gate::Correct, Advantage::DrGrpo)).unwrap();
    assert_eq!(out.rewards, vec![1.1, 0.0]);
    assert_eq!(out.applied, vec![true, false]);
    assert!((out.advantages[0] - 0.55).abs() < 1e-12 && (out.advantages[1] + 0.55).abs() < 1e-12);
    let none = regularize(None, &[-0.5, 0.5], &[2], config(0.1, Gate::None, Advantage::None)).unwrap();
    assert_eq!(none.advantages, vec![0.05, -0.05]);
}

#[test]
fn regularize_rejects_bad_input() {
    let cfg = config(0.1, Gate::None, Advantage::Grpo);
    let msg = |r: corrpo_core::Result<_>| r.map(|_: corrpo_core::Regularized| ()).unwrap_err().to_string();
    assert!(msg(regularize(None, &[0.1, 0.2], &[1, 0, 1], cfg)).contains("group_sizes[1]"));
    assert!(msg(regularize(None, &[0.1, 0.2], &[3], cfg)).contains("add up to 3"));
    assert!(msg(regularize(Some(&[f64::NAN, 0.0]), &[0.1, 0.2], &[2], cfg)).contains("rewards[0]"));
    assert!(msg(regularize(None, &[0.1, 1.5], &[2], cfg)).contains("rho[1]"));
    assert!(
        msg(regularize(None, &[0.1], &[1], config(0.1, Gate::Correct, Advantage::Grpo)))
            .contains("needs external rewards")
    );
    assert!(msg(regularize(None, &[0.1], &[1], config(f64::INFINITY, Gate::None, Advantage::Grpo))).contains("coef"));
}

#[test]
fn names_round_trip() {
    for m in [Method::Spearman, Method::Pearson] {
        assert_eq!(m.name().parse::<Method>(), Ok(m));
    }
    for g in [Gate::None, Gate::Correct] {
        assert_eq!(g.name().parse::<Gate>(), Ok(g));
    }
    for a in [Advantage::Grpo, Advantage::DrGrpo, Advantage::None] {
        assert_eq!(a.name().parse::<Advantage>(), Ok(a));
    }
    assert!("kendall".parse::<Method>().unwrap_err().contains("spearman"));
}

proptest! {
    /// Rewards near the float64 limit (about 1e308) overflow a textbook mean or variance
    /// into NaN advantages. Rewards scaled by 2^k must give the grpo advantages of the
    /// unscaled ones with eps scaled by 2^-k, and Dr. GRPO ones scaled by 2^k, for every k up
    /// to where the rewards themselves stop being finite.
    #[test]
    fn advantages_of_rewards_near_the_float64_limit(
        seed in any::<u64>(), sizes in prop::collection::vec(2usize..9, 1..5), k in 0i32..1020,
    ) {
        let mut rng = Rng(seed);
        let n: usize = sizes.iter().sum();
        let base: Vec<f64> = (0..n).map(|_| rng.normal() * 1.5).collect();
        let big: Vec<f64> = base.iter().map(|v| v * 2f64.powi(k)).collect();
        let rho = vec![f64::NAN; n];
        // The textbook formulas on the unscaled rewards, which cannot overflow.
        let mut want = (Vec::new(), Vec::new());
        let mut start = 0;
        for &size in &sizes {
            let group = &base[start..start + size];
            let mean = group.iter().sum::<f64>() / size as f64;
            let sd = (group.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (size - 1) as f64).sqrt();
            want.0.extend(group.iter().map(|v| (v - mean) / (sd + 1e-6 * 2f64.powi(-k))));
            want.1.extend(group.iter().map(|v| (v - mean) * 2f64.powi(k)));
            start += size;
        }
        for mode in [Advantage::Grpo, Advantage::DrGrpo] {
            let cfg = RegularizeConfig { coef: 0.0, gate: Gate::None, threshold: 1.0, advantage: mode };
            let want = if mode == Advantage::Grpo { &want.0 } else { &want.1 };
            match regularize(Some(&big), &rho, &sizes, cfg) {
                Ok(out) => {
                    for (got, want) in out.advantages.iter().zip(want) {
                        prop_assert!(got.is_finite(), "{mode:?} 2^{k}: {got}");
                        prop_assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "{mode:?} 2^{k}: {got} vs {want}");
                    }
                }
                Err(err) => {
                    // Only a Dr. GRPO advantage can be too large for float64, and only when
                    // the rewards span almost the whole range.
                    prop_assert!(mode == Advantage::DrGrpo && k > 1015, "{mode:?} 2^{k}: {err}");
                    prop_assert!(err.to_string().contains("overflows float64"), "{err}");
                }
            }
        }
    }

    /// Pearson is scale-free, so samples near either end of float64 must give the rho of
    /// the same samples near 1, never a NaN from squares that overflow or underflow.
    #[test]
    fn pearson_of_extreme_magnitudes(seed in any::<u64>(), n in 3usize..60, kx in -1020i32..1020, ky in -1020i32..1020) {
        let mut rng = Rng(seed);
        let x: Vec<f64> = (0..n).map(|_| 1.0 + rng.uniform()).collect();
        let y: Vec<f64> = x.iter().map(|v| 0.5 * v + rng.uniform()).collect();
        let scaled = |v: &[f64], k: i32| -> Vec<f64> { v.iter().map(|a| a * 2f64.powi(k / 2) * 2f64.powi(k - k / 2)).collect() };
        let want = correlation(&x, &y, Method::Pearson, 2).unwrap();
        let got = correlation(&scaled(&x, kx), &scaled(&y, ky), Method::Pearson, 2).unwrap();
        prop_assert!((got - want).abs() <= 1e-12, "2^{kx}, 2^{ky}: {got} vs {want}");
    }
}

#[test]
fn overflowing_regularized_rewards_are_errors_not_inf() {
    let cfg = config(-f64::MAX, Gate::None, Advantage::None);
    let err = regularize(Some(&[0.0, f64::MAX]), &[0.5, 0.5], &[2], cfg).unwrap_err();
    assert!(matches!(err, Error::Value { field: "rewards", index: 1, .. }), "{err}");
    assert!(err.to_string().contains("r - coef * rho"), "{err}");
    // MAX is 4/3 MAX above the mean of [MAX, -MAX, -MAX]: no float64 holds that Dr. GRPO
    // advantage ...
    let spread = [0.0, f64::MAX, -f64::MAX, -f64::MAX];
    let err =
        regularize(Some(&spread), &[f64::NAN; 4], &[1, 3], config(0.1, Gate::None, Advantage::DrGrpo)).unwrap_err();
    assert!(matches!(err, Error::Value { field: "rewards", index: 1, .. }), "{err}");
    assert!(err.to_string().contains("drgrpo advantage (r~ minus the mean of its group) overflows"), "{err}");
    // ... but GRPO's are those of [2, -1, -1] (eps vanishes against an std of 2 MAX / sqrt(3)).
    let out = regularize(Some(&spread), &[f64::NAN; 4], &[1, 3], config(0.1, Gate::None, Advantage::Grpo)).unwrap();
    let sd = 3f64.sqrt();
    for (got, want) in out.advantages.iter().zip([0.0, 2.0 / sd, -1.0 / sd, -1.0 / sd]) {
        assert!((got - want).abs() < 1e-12, "{:?}", out.advantages);
    }
    // Subnormal rewards are no trouble either.
    let tiny = regularize(Some(&[5e-324, 0.0, 1e-320]), &[f64::NAN; 3], &[3], config(0.1, Gate::None, Advantage::Grpo))
        .unwrap();
    assert!(tiny.advantages.iter().all(|a| a.is_finite()));
}

#[test]
fn fingerprint_means_of_values_near_the_float64_limit() {
    let h = [f64::MAX, f64::MAX / 2.0, f64::MAX, f64::MAX / 4.0];
    let g = [0.1, 0.4, 0.2, 0.3];
    let f = fingerprint(&h, &g, Some(&[1, 2, 1, 2]), None, Method::Pearson, 2).unwrap();
    assert_eq!(f.entropy_mean, f64::MAX * 0.6875);
    assert!(f.pooled.unwrap().is_finite() && f.unique.unwrap().unwrap().is_finite());
}
