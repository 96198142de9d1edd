//! Per-rollout correlations over a ragged batch, and the batch fingerprint (SPEC 4).

use crate::correlation::{Method, Undefined, correlation};
use crate::error::{Error, Result, check_finite};
use crate::math::unit_scale;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// The smallest `min_tokens` that makes sense: a correlation needs two points.
pub const MIN_TOKENS_FLOOR: usize = 2;

/// The correlation of one rollout's per-token entropy and grad_norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RolloutCorrelation {
    pub n_tokens: usize,
    pub rho: std::result::Result<f64, Undefined>,
}

impl RolloutCorrelation {
    /// rho, or NaN when undefined.
    pub fn value(&self) -> f64 {
        self.rho.unwrap_or(f64::NAN)
    }
}

/// Checks that per-token arrays agree with the rollout lengths and hold finite values.
pub fn check_tokens(entropy: &[f64], grad_norm: &[f64], lengths: Option<&[usize]>) -> Result<()> {
    if entropy.len() != grad_norm.len() {
        return Err(Error::Shape(format!("{} entropy values but {} grad_norm values", entropy.len(), grad_norm.len())));
    }
    if let Some(lengths) = lengths {
        // Checked: a wrapped sum of huge lengths could equal the token count.
        let total = lengths.iter().try_fold(0usize, |sum, &n| sum.checked_add(n));
        if total != Some(entropy.len()) {
            let total = total.map_or_else(|| "more than usize::MAX".to_string(), |t| t.to_string());
            return Err(Error::Shape(format!(
                "rollout lengths add up to {total} tokens, but {} tokens were given",
                entropy.len()
            )));
        }
    }
    check_finite("entropy", entropy)?;
    check_finite("grad_norm", grad_norm)?;
    Ok(())
}

fn check_min_tokens(min_tokens: usize) -> Result<()> {
    if min_tokens < MIN_TOKENS_FLOOR {
        return Err(Error::Config(format!(
            "min_tokens must be at least {MIN_TOKENS_FLOOR} (a correlation needs two points), got {min_tokens}"
        )));
    }
    Ok(())
}

/// rho(entropy, grad_norm) for every rollout of a ragged batch (concatenated tokens, no
/// padding), in parallel over rollouts.
pub fn rollout_correlations(
    entropy: &[f64],
    grad_norm: &[f64],
    lengths: &[usize],
    method: Method,
    min_tokens: usize,
) -> Result<Vec<RolloutCorrelation>> {
    check_tokens(entropy, grad_norm, Some(lengths))?;
    check_min_tokens(min_tokens)?;
    let mut spans = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &n in lengths {
        spans.push(start..start + n);
        start += n;
    }
    Ok(spans
        .into_par_iter()
        .map(|span| RolloutCorrelation {
            n_tokens: span.len(),
            rho: correlation(&entropy[span.clone()], &grad_norm[span], method, min_tokens),
        })
        .collect())
}

/// Batch-level figures for monitoring the inversion over training.
#[derive(Clone, Debug, PartialEq)]
pub struct Fingerprint {
    pub method: Method,
    pub n_tokens: usize,
    /// rho over every token of the batch.
    pub pooled: std::result::Result<f64, Undefined>,
    /// Distinct token ids, when ids were given.
    pub n_unique_tokens: Option<usize>,
    /// rho over distinct token ids of (mean entropy, mean grad_norm) per id, as the paper
    /// reports it; `None` without token ids.
    pub unique: Option<std::result::Result<f64, Undefined>>,
    /// Rollouts, and those whose rho is defined, when lengths were given.
    pub n_rollouts: Option<usize>,
    pub n_rollouts_defined: Option<usize>,
    /// Mean of the defined per-rollout rho (NaN if none is defined).
    pub rollout_mean: Option<f64>,
    pub entropy_mean: f64,
    pub grad_norm_mean: f64,
}

pub fn fingerprint(
    entropy: &[f64],
    grad_norm: &[f64],
    token_ids: Option<&[i64]>,
    lengths: Option<&[usize]>,
    method: Method,
    min_tokens: usize,
) -> Result<Fingerprint> {
    check_tokens(entropy, grad_norm, lengths)?;
    check_min_tokens(min_tokens)?;
    if let Some(ids) = token_ids
        && ids.len() != entropy.len()
    {
        return Err(Error::Shape(format!("{} token ids for {} tokens", ids.len(), entropy.len())));
    }
    let n = entropy.len();
    // Summed scaled (exact), so that values near the float64 limit give their finite mean.
    let mean = |v: &[f64]| {
        let k = unit_scale(v);
        if v.is_empty() { f64::NAN } else { v.iter().map(|x| x * k).sum::<f64>() / v.len() as f64 / k }
    };

    let unique_means = token_ids.map(|ids| per_id_means(ids, entropy, grad_norm));
    let unique = unique_means.as_ref().map(|(h, g)| correlation(h, g, method, min_tokens));

    let per_rollout = lengths.map(|l| rollout_correlations(entropy, grad_norm, l, method, min_tokens)).transpose()?;
    let defined: Option<Vec<f64>> = per_rollout.as_ref().map(|rs| rs.iter().filter_map(|r| r.rho.ok()).collect());

    Ok(Fingerprint {
        method,
        n_tokens: n,
        pooled: correlation(entropy, grad_norm, method, min_tokens),
        n_unique_tokens: unique_means.as_ref().map(|(h, _)| h.len()),
        unique,
        n_rollouts: per_rollout.as_ref().map(Vec::len),
        n_rollouts_defined: defined.as_ref().map(Vec::len),
        rollout_mean: defined.as_deref().map(mean),
        entropy_mean: mean(entropy),
        grad_norm_mean: mean(grad_norm),
    })
}

/// Mean entropy and grad_norm per distinct token id, in ascending id order (summed scaled,
/// as the batch means are, so that no sum overflows).
fn per_id_means(ids: &[i64], entropy: &[f64], grad_norm: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (kh, kg) = (unit_scale(entropy), unit_scale(grad_norm));
    let mut sums: BTreeMap<i64, (f64, f64, usize)> = BTreeMap::new();
    for ((&id, &h), &g) in ids.iter().zip(entropy).zip(grad_norm) {
        let e = sums.entry(id).or_default();
        e.0 += h * kh;
        e.1 += g * kg;
        e.2 += 1;
    }
    sums.values().map(|&(h, g, c)| (h / c as f64 / kh, g / c as f64 / kg)).unzip()
}
