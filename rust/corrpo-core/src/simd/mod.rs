//! One SIMD body, several instruction sets.
//!
//! Kernels are written once, generic over [`Simd`], and marked `#[inline(always)]`. Each
//! instruction set gets a thin `#[target_feature]` entry point that instantiates the generic
//! body, so LLVM compiles the same source with AVX-512, with AVX2+FMA+F16C, or portably,
//! and [`Isa::detect`] picks one at run time.

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use portable::Portable;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// An instruction set a kernel can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust over 8-lane arrays; the compiler vectorizes it for the baseline target.
    Portable,
    /// AVX2 with FMA and F16C (Haswell, Zen 1 and later).
    Avx2,
    /// AVX-512F (Skylake-SP, Ice Lake, Zen 4 and later).
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the instruction set.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Isa::Avx2.is_supported() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every instruction set this CPU supports, widest last.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_supported()).collect()
    }

    /// The widest supported instruction set, unless the environment variable `CORRPO_SIMD`
    /// names a narrower one (useful to rule out a SIMD path when chasing a discrepancy).
    /// Read once per process.
    pub fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let widest = *Isa::supported().last().expect("portable is always supported");
            match std::env::var("CORRPO_SIMD").ok().map(|v| v.parse::<Isa>()) {
                Some(Ok(isa)) if isa.is_supported() => isa,
                _ => widest,
            }
        })
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == s)
            .ok_or_else(|| format!("unknown SIMD instruction set {s:?}: expected portable, avx2 or avx512"))
    }
}

/// The mantissa bits of 2^(j/16), j = 0..15 (correctly rounded; the exponent field is 0, and
/// `pow2_fraction` adds the exponent).
const POW2_SIXTEENTHS: [u32; 16] = [
    0x0, 0x5aac3, 0xb95c2, 0x11c3d3, 0x1837f0, 0x1ef532, 0x25fed7, 0x2d583f, 0x3504f3, 0x3d08a4, 0x45672a, 0x4e248c,
    0x5744fd, 0x60ccdf, 0x6ac0c7, 0x75257d,
];

/// The mantissa bits of 2^(j/8), j = 0..7: every other entry of [`POW2_SIXTEENTHS`].
const POW2_EIGHTHS: [u32; 8] = {
    let mut eighths = [0; 8];
    let mut j = 0;
    while j < 8 {
        eighths[j] = POW2_SIXTEENTHS[2 * j];
        j += 1;
    }
    eighths
};

/// The vector operations the kernels use. Implementors are zero-sized markers.
///
/// # Safety
/// Every method may only be called on a CPU that supports the implementor's instruction set,
/// from code compiled with those target features (the `#[target_feature]` entry points).
pub(crate) trait Simd: Copy {
    const LANES: usize;
    /// Whether `fmadd` and `fnmadd` round once (a fused multiply-add instruction).
    const FUSED: bool;
    type F: Copy;
    /// f64 accumulators, one per pair of lanes of `F`.
    type D: Copy;

    unsafe fn splat(x: f32) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    /// Loads `LANES` IEEE half floats and widens them in registers.
    unsafe fn load_f16(p: *const u16) -> Self::F;
    /// Loads `2 * LANES` bfloat16 values and widens them in registers (a bfloat16 is the high
    /// half of an f32), in memory order: lanes hold the same values as an f32 load of the
    /// widened data, so bfloat16 logits give bit for bit the results of their f32 widening.
    unsafe fn load_bf16_pair(p: *const u16) -> (Self::F, Self::F);
    unsafe fn store(a: Self::F, p: *mut f32);
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn sub(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// a * b + c
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// c - a * b
    unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// x86 `maxps` semantics: `if a > b { a } else { b }`, so a NaN in `b` is kept.
    unsafe fn max(a: Self::F, b: Self::F) -> Self::F;
    /// 2^(m / LANES) for k = 1.5 * 2^23 + 127 LANES + m, where m = LANES n + j with j in
    /// [0, LANES) and n in [-126, 0]: the table entry 2^(j / LANES) picked by the low bits of
    /// k, with n + 127 (the next bits of k) as its exponent. For n = -127 the exponent field is
    /// 0: a subnormal below 2^-126, +0 for j = 0.
    unsafe fn pow2_fraction(k: Self::F) -> Self::F;
    /// Whether any lane of `a` is greater than the same lane of `b`.
    unsafe fn any_gt(a: Self::F, b: Self::F) -> bool;

    unsafe fn zero_f64() -> Self::D;
    /// `acc + (low half of a + high half of a)`, lane by lane, in f64.
    unsafe fn add_f64(acc: Self::D, a: Self::F) -> Self::D;
    /// Sum of the lanes, in lane order.
    unsafe fn reduce_f64(acc: Self::D) -> f64;

    #[inline(always)]
    unsafe fn to_array(a: Self::F) -> [f32; 16] {
        let mut out = [0.0f32; 16];
        unsafe { Self::store(a, out.as_mut_ptr()) };
        out
    }

    #[inline(always)]
    unsafe fn reduce_max(a: Self::F) -> f32 {
        let lanes = unsafe { Self::to_array(a) };
        lanes[..Self::LANES].iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}
