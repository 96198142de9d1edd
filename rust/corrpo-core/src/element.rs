//! The logit element types: f32, IEEE f16 and bfloat16.

use crate::simd::Simd;
use half::{bf16, f16};

/// A logit element type. Half types are widened to f32 in registers as they are loaded.
pub trait Element: Copy + Send + Sync + 'static {
    /// The value that pads a partial block: it contributes nothing to any statistic.
    const NEG_INF: Self;
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    /// Loads `2 * S::LANES` elements as two f32 vectors, in memory order (so every element
    /// type gives the results of its f32 widening, bit for bit).
    #[doc(hidden)]
    #[allow(private_bounds, private_interfaces)]
    unsafe fn load_pair<S: Simd>(p: *const Self) -> (S::F, S::F);
}

impl Element for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    #[allow(private_bounds, private_interfaces)]
    unsafe fn load_pair<S: Simd>(p: *const Self) -> (S::F, S::F) {
        unsafe { (S::load(p), S::load(p.add(S::LANES))) }
    }
}

impl Element for f16 {
    const NEG_INF: Self = f16::NEG_INFINITY;
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    #[allow(private_bounds, private_interfaces)]
    unsafe fn load_pair<S: Simd>(p: *const Self) -> (S::F, S::F) {
        unsafe { (S::load_f16(p.cast()), S::load_f16(p.add(S::LANES).cast())) }
    }
}

impl Element for bf16 {
    const NEG_INF: Self = bf16::NEG_INFINITY;
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    #[allow(private_bounds, private_interfaces)]
    unsafe fn load_pair<S: Simd>(p: *const Self) -> (S::F, S::F) {
        unsafe { S::load_bf16_pair(p.cast()) }
    }
}
