use super::{POW2_EIGHTHS, Simd};
use half::f16;

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
    const FUSED: bool = false;
    type F = V;
    type D = [f64; L / 2];

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
    unsafe fn load_bf16_pair(p: *const u16) -> (V, V) {
        let raw = unsafe { p.cast::<[u16; 2 * L]>().read_unaligned() };
        // A bfloat16 is the high half of an f32.
        let widen = |bits: u16| f32::from_bits(u32::from(bits) << 16);
        (map(|i| widen(raw[i])), map(|i| widen(raw[L + i])))
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
    unsafe fn pow2_fraction(k: V) -> V {
        map(|i| {
            let bits = k[i].to_bits();
            f32::from_bits(POW2_EIGHTHS[(bits & 7) as usize].wrapping_add((bits << 20) & 0x7F80_0000))
        })
    }
    #[inline(always)]
    unsafe fn any_gt(a: V, b: V) -> bool {
        (0..L).any(|i| a[i] > b[i])
    }
    #[inline(always)]
    unsafe fn zero_f64() -> [f64; L / 2] {
        [0.0; L / 2]
    }
    #[inline(always)]
    unsafe fn add_f64(acc: [f64; L / 2], a: V) -> [f64; L / 2] {
        std::array::from_fn(|i| acc[i] + (f64::from(a[i]) + f64::from(a[i + L / 2])))
    }
    #[inline(always)]
    unsafe fn reduce_f64(acc: [f64; L / 2]) -> f64 {
        acc.iter().sum()
    }
}
