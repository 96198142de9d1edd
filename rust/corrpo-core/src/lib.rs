//! corrpo-core: the native core of corrpo, with no Python in it.
//!
//! - [`stats`]: entropy, logprob, collision mass and logit-gradient norm of every token
//!   from one SIMD read of its logits (f32, f16, bf16).
//! - [`correlation`], [`rollouts`]: Pearson/Spearman per rollout of a ragged batch, and
//!   the batch fingerprint of the entropy-gradient inversion.
//! - [`rewards`]: CorR-PO regularized rewards and GRPO/Dr. GRPO group advantages.

pub mod correlation;
pub mod element;
pub mod error;
mod exp;
mod math;
pub mod rewards;
pub mod rollouts;
pub mod simd;
pub mod stats;

pub use correlation::{Method, Undefined, correlation};
pub use element::Element;
pub use error::{Error, Location, LogitsFault, Result, TokenFault, check_finite};
pub use half::{bf16, f16};
pub use rewards::{Advantage, Gate, RegularizeConfig, Regularized, regularize};
pub use rollouts::{Fingerprint, RolloutCorrelation, fingerprint, rollout_correlations};
pub use simd::Isa;
pub use stats::{Logits, StatsOptions, TokenStats, token_stats};
