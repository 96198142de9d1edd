//! Pearson and Spearman correlation in f64 (SPEC 4).

use crate::math::unit_scale;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Method {
    /// Pearson correlation of average ranks (ties share their mean rank), as
    /// `scipy.stats.spearmanr`.
    #[default]
    Spearman,
    Pearson,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Spearman => "spearman",
            Method::Pearson => "pearson",
        }
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spearman" => Ok(Method::Spearman),
            "pearson" => Ok(Method::Pearson),
            _ => Err(format!("method must be \"spearman\" or \"pearson\", got {s:?}")),
        }
    }
}

/// Why a correlation has no value. Reported beside a NaN, never as 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undefined {
    TooFewTokens {
        n: usize,
        min: usize,
    },
    /// The first variable (entropy) is constant.
    ConstantX,
    /// The second variable (grad_norm) is constant.
    ConstantY,
}

impl Undefined {
    /// A short stable code for logs, metrics and the wire.
    pub fn code(&self) -> &'static str {
        match self {
            Undefined::TooFewTokens { .. } => "too_few_tokens",
            Undefined::ConstantX => "constant_entropy",
            Undefined::ConstantY => "constant_grad_norm",
        }
    }
}

/// Correlation of two equally long, finite samples; undefined below `min_len` points or
/// when either sample is constant.
pub fn correlation(x: &[f64], y: &[f64], method: Method, min_len: usize) -> Result<f64, Undefined> {
    debug_assert_eq!(x.len(), y.len());
    let n = x.len();
    if n < min_len.max(2) {
        return Err(Undefined::TooFewTokens { n, min: min_len });
    }
    if is_constant(x) {
        return Err(Undefined::ConstantX);
    }
    if is_constant(y) {
        return Err(Undefined::ConstantY);
    }
    Ok(match method {
        Method::Pearson => pearson(x, y),
        Method::Spearman => pearson(&average_ranks(x), &average_ranks(y)),
    })
}

// Exact equality: a two-pass variance of a constant sample can be a few ulps above 0.
fn is_constant(x: &[f64]) -> bool {
    x.iter().all(|&v| v == x[0])
}

/// Two-pass Pearson correlation of non-constant samples. The correlation is scale-free, so
/// samples near the float64 limits are scaled first ([`unit_scale`], exact), where sums of
/// squares would overflow to a NaN (values about 1e200 and up) or underflow to 0.
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (kx, ky) = (unit_scale(x), unit_scale(y));
    let mx = x.iter().map(|a| a * kx).sum::<f64>() / n;
    let my = y.iter().map(|b| b * ky).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a * kx - mx, b * ky - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// 1-based ranks; tied values share the mean of the ranks they span.
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end share their mean.
        let rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}
