use super::{POW2_EIGHTHS, POW2_SIXTEENTHS, Simd};
use std::arch::x86_64::*;

/// 16 lanes of AVX-512F.
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

/// 8 lanes of AVX2, with FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

/// The exponent field of an f32.
const EXPONENT: i32 = 0x7F80_0000;

impl Simd for Avx512 {
    const LANES: usize = 16;
    const FUSED: bool = true;
    type F = __m512;
    type D = __m512d;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16_pair(p: *const u16) -> (__m512, __m512) {
        unsafe {
            // In AVX-512F, a zero-extension (a shuffle) and a shift per vector: the in-lane
            // unpacks of the AVX2 version need AVX-512BW at this width, and are no faster here.
            let low = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())));
            let high = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(16).cast())));
            (_mm512_castsi512_ps(low), _mm512_castsi512_ps(high))
        }
    }
    #[inline(always)]
    unsafe fn store(a: __m512, p: *mut f32) {
        unsafe { _mm512_storeu_ps(p, a) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fnmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn pow2_fraction(k: __m512) -> __m512 {
        unsafe {
            let bits = _mm512_castps_si512(k);
            let table = _mm512_loadu_si512(POW2_SIXTEENTHS.as_ptr().cast());
            let frac = _mm512_permutexvar_epi32(bits, table);
            let exp = _mm512_and_si512(_mm512_slli_epi32::<19>(bits), _mm512_set1_epi32(EXPONENT));
            _mm512_castsi512_ps(_mm512_add_epi32(frac, exp))
        }
    }
    #[inline(always)]
    unsafe fn any_gt(a: __m512, b: __m512) -> bool {
        unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b) != 0 }
    }
    #[inline(always)]
    unsafe fn zero_f64() -> Self::D {
        unsafe { _mm512_setzero_pd() }
    }
    #[inline(always)]
    unsafe fn add_f64(acc: Self::D, a: __m512) -> Self::D {
        unsafe {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))));
            _mm512_add_pd(acc, _mm512_add_pd(lo, hi))
        }
    }
    #[inline(always)]
    unsafe fn reduce_f64(acc: Self::D) -> f64 {
        let mut lanes = [0.0f64; 8];
        unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), acc) }
        lanes.iter().sum()
    }
}

impl Simd for Avx2 {
    const LANES: usize = 8;
    const FUSED: bool = true;
    type F = __m256;
    type D = __m256d;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16_pair(p: *const u16) -> (__m256, __m256) {
        unsafe {
            // Each 128-bit half of a vector holds 4 values: broadcast 8 values to both halves
            // (a load), then one in-lane byte shuffle per vector moves values 0-3 into the high
            // halves of the low lane's 32-bit lanes and 4-7 into the high lane's, zeroing the rest.
            let spread = _mm256_setr_epi8(
                -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13,
                -1, -1, 14, 15,
            );
            let low = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast())), spread);
            let high = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(8).cast())), spread);
            (_mm256_castsi256_ps(low), _mm256_castsi256_ps(high))
        }
    }
    #[inline(always)]
    unsafe fn store(a: __m256, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, a) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fnmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn pow2_fraction(k: __m256) -> __m256 {
        unsafe {
            let bits = _mm256_castps_si256(k);
            let table = _mm256_loadu_si256(POW2_EIGHTHS.as_ptr().cast());
            let frac = _mm256_permutevar8x32_epi32(table, bits);
            let exp = _mm256_and_si256(_mm256_slli_epi32::<20>(bits), _mm256_set1_epi32(EXPONENT));
            _mm256_castsi256_ps(_mm256_add_epi32(frac, exp))
        }
    }
    #[inline(always)]
    unsafe fn any_gt(a: __m256, b: __m256) -> bool {
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b)) != 0 }
    }
    #[inline(always)]
    unsafe fn zero_f64() -> Self::D {
        unsafe { _mm256_setzero_pd() }
    }
    #[inline(always)]
    unsafe fn add_f64(acc: Self::D, a: __m256) -> Self::D {
        unsafe {
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(a));
            _mm256_add_pd(acc, _mm256_add_pd(lo, hi))
        }
    }
    #[inline(always)]
    unsafe fn reduce_f64(acc: Self::D) -> f64 {
        let mut lanes = [0.0f64; 4];
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), acc) }
        lanes.iter().sum()
    }
}
