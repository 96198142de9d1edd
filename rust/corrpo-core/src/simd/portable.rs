use super::Simd;
use half::{bf16, f16};

/// Eight plain lanes; the compiler vectorizes the loops for whatever the target offers.
/// Only operations that vectorize on every baseline are used: a fused multiply-add or
/// `round_ties_even` would become a libm call per lane where the target lacks them.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

const L: usize = 8;
type V = [f32; L];

#[inline(always)]
fn map(f: impl Fn(usize) -> f32) -> V {
    std::array::from_fn(f)
}

impl Simd for Portable {
    const LANES: usize = L;
    type F = V;

    #[inline(always)]
    unsafe fn splat(x: f32) -> V {
        [x; L]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        unsafe { p.cast::<V>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> V {
        let raw = unsafe { p.cast::<[u16; L]>().read_unaligned() };
        map(|i| f16::from_bits(raw[i]).to_f32())
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> V {
        let raw = unsafe { p.cast::<[u16; L]>().read_unaligned() };
        map(|i| bf16::from_bits(raw[i]).to_f32())
    }
    #[inline(always)]
    unsafe fn store(a: V, p: *mut f32) {
        unsafe { p.cast::<V>().write_unaligned(a) }
    }
    #[inline(always)]
    unsafe fn add(a: V, b: V) -> V {
        map(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: V, b: V) -> V {
        map(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: V, b: V) -> V {
        map(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn fmadd(a: V, b: V, c: V) -> V {
        map(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn fnmadd(a: V, b: V, c: V) -> V {
        map(|i| c[i] - a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn max(a: V, b: V) -> V {
        map(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn round(a: V) -> V {
        // Adding 1.5 * 2^23 pushes the fraction out under round-to-nearest-even; exact for
        // |a| < 2^22, which covers the exp arguments (|a| <= 127).
        const SHIFT: f32 = 12_582_912.0;
        map(|i| (a[i] + SHIFT) - SHIFT)
    }
    #[inline(always)]
    unsafe fn scale2(y: V, n: V) -> V {
        map(|i| y[i] * f32::from_bits(((n[i] as i32).wrapping_add(127) as u32) << 23))
    }
    #[inline(always)]
    unsafe fn zero_where_below(x: V, limit: V, v: V) -> V {
        map(|i| if x[i] < limit[i] { 0.0 } else { v[i] })
    }
    #[inline(always)]
    unsafe fn any_gt(a: V, b: V) -> bool {
        (0..L).any(|i| a[i] > b[i])
    }
}
