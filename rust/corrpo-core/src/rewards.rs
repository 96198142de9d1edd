//! CorR-PO regularized rewards and group advantages (SPEC 5).

use crate::error::{Error, Result, check_finite};
use crate::math::unit_scale;
use std::str::FromStr;

/// Added to the group standard deviation in `grpo` advantages, as in verl.
pub const GRPO_EPS: f64 = 1e-6;

/// Where the correlation term applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Gate {
    /// Every rollout.
    #[default]
    None,
    /// Only rollouts whose external reward is at least the threshold, so a wrong answer is
    /// never paid for its geometry.
    Correct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Advantage {
    /// (r - mean) / (std + 1e-6) per group, unbiased std.
    #[default]
    Grpo,
    /// r - mean per group (Dr. GRPO: no std normalization).
    DrGrpo,
    /// The regularized reward itself, no baseline.
    None,
}

macro_rules! named_enum {
    ($ty:ty, $what:literal, $($variant:path => $name:literal),+) => {
        impl $ty {
            pub fn name(self) -> &'static str {
                match self { $($variant => $name),+ }
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($name => Ok($variant),)+
                    _ => Err(format!(concat!($what, " must be one of {:?}, got {:?}"), [$($name),+], s)),
                }
            }
        }
    };
}

named_enum!(Gate, "gate", Gate::None => "none", Gate::Correct => "correct");
named_enum!(Advantage, "advantage", Advantage::Grpo => "grpo", Advantage::DrGrpo => "drgrpo", Advantage::None => "none");

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegularizeConfig {
    pub coef: f64,
    pub gate: Gate,
    pub threshold: f64,
    pub advantage: Advantage,
}

impl Default for RegularizeConfig {
    fn default() -> Self {
        RegularizeConfig { coef: 0.1, gate: Gate::None, threshold: 1.0, advantage: Advantage::Grpo }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Regularized {
    /// r - coef * rho where the term applies, else r.
    pub rewards: Vec<f64>,
    pub advantages: Vec<f64>,
    /// Whether the correlation term changed this rollout's reward.
    pub applied: Vec<bool>,
    /// Whether rho was undefined (NaN) and so contributed nothing.
    pub rho_undefined: Vec<bool>,
}

/// r~ = r - coef * rho per rollout, then advantages per group. `rewards` of `None` means
/// verifier-free (r = 0). `group_sizes` partitions the rollouts in order.
///
/// Every output is finite: rewards near the float64 limit give the advantages they should
/// (computed on rewards scaled by a power of two), and an r~ or a Dr. GRPO advantage that
/// float64 cannot hold is an error naming the rollout, never an inf or a NaN.
pub fn regularize(
    rewards: Option<&[f64]>,
    rho: &[f64],
    group_sizes: &[usize],
    config: RegularizeConfig,
) -> Result<Regularized> {
    let n = rho.len();
    check(rewards, rho, group_sizes, &config)?;

    let mut out = Regularized {
        rewards: Vec::with_capacity(n),
        advantages: Vec::with_capacity(n),
        applied: Vec::with_capacity(n),
        rho_undefined: Vec::with_capacity(n),
    };
    for (i, &rho_i) in rho.iter().enumerate() {
        let r = rewards.map_or(0.0, |r| r[i]);
        let undefined = rho_i.is_nan();
        let gated_in = match config.gate {
            Gate::None => true,
            Gate::Correct => r >= config.threshold,
        };
        let applied = gated_in && !undefined && config.coef != 0.0;
        let value = if applied { r - config.coef * rho_i } else { r };
        if !value.is_finite() {
            return Err(Error::Value {
                field: "rewards",
                index: i,
                reason: format!(
                    "r - coef * rho = {r:e} - {:e} * {rho_i} overflows float64: scale the rewards or coef down",
                    config.coef
                ),
            });
        }
        out.rewards.push(value);
        out.applied.push(applied);
        out.rho_undefined.push(undefined);
    }

    let mut start = 0;
    for &size in group_sizes {
        let group = &out.rewards[start..start + size];
        let advantages = group_advantages(group, config.advantage);
        if let Some(j) = advantages.iter().position(|a| !a.is_finite()) {
            return Err(Error::Value {
                field: "rewards",
                index: start + j,
                reason: format!(
                    "its {} advantage (r~ minus the mean of its group) overflows float64: the rewards of its group \
                     span more than float64 holds; scale the rewards (or coef) down",
                    config.advantage.name()
                ),
            });
        }
        out.advantages.extend(advantages);
        start += size;
    }
    Ok(out)
}

fn check(rewards: Option<&[f64]>, rho: &[f64], group_sizes: &[usize], config: &RegularizeConfig) -> Result<()> {
    let n = rho.len();
    if let Some(r) = rewards {
        if r.len() != n {
            return Err(Error::Shape(format!("{} rewards for {n} correlations", r.len())));
        }
        check_finite("rewards", r)?;
    }
    if let Some(i) = rho.iter().position(|v| !(v.is_nan() || (-1.0..=1.0).contains(v))) {
        return Err(Error::Value {
            field: "rho",
            index: i,
            reason: format!("{} is not a correlation in [-1, 1] (NaN marks an undefined one)", rho[i]),
        });
    }
    if let Some(g) = group_sizes.iter().position(|&s| s == 0) {
        return Err(Error::Value {
            field: "group_sizes",
            index: g,
            reason: "a group must hold at least one rollout".into(),
        });
    }
    let total: usize = group_sizes.iter().sum();
    if total != n {
        return Err(Error::Shape(format!("group sizes add up to {total} rollouts, but {n} were given")));
    }
    if !config.coef.is_finite() {
        return Err(Error::Config(format!("coef must be finite, got {}", config.coef)));
    }
    if config.gate == Gate::Correct {
        if rewards.is_none() {
            return Err(Error::Config("gate \"correct\" needs external rewards to compare with the threshold".into()));
        }
        if !config.threshold.is_finite() {
            return Err(Error::Config(format!("threshold must be finite, got {}", config.threshold)));
        }
    }
    Ok(())
}

/// Advantages of one group. A group of one has no baseline and gets 0 under `grpo` and
/// `drgrpo`.
///
/// Finite rewards near the float64 limit (about 1e308) overflow in their sum or in the
/// squares of their deviations, which would turn into NaN advantages. The group is scaled by
/// a power of two first ([`unit_scale`]: exact, and 1 for ordinary rewards, which so get the
/// same bits as the textbook formula): `grpo` is scale-free (eps is scaled alike) and always
/// finite; `drgrpo` is scaled back and is inf only where float64 cannot hold the result.
fn group_advantages(r: &[f64], mode: Advantage) -> Vec<f64> {
    let n = r.len();
    if mode == Advantage::None {
        return r.to_vec();
    }
    if n == 1 {
        return vec![0.0];
    }
    let scale = unit_scale(r);
    let x: Vec<f64> = r.iter().map(|v| v * scale).collect();
    let mean = x.iter().sum::<f64>() / n as f64;
    match mode {
        Advantage::DrGrpo => x.iter().map(|v| (v - mean) / scale).collect(),
        _ => {
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
            let denom = var.sqrt() + GRPO_EPS * scale;
            x.iter().map(|v| (v - mean) / denom).collect()
        }
    }
}
