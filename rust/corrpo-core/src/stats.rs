//! Per-token statistics of softmax(z / tau) from ONE read of the logits (SPEC 2).
//!
//! Each row is swept once with online accumulators relative to a running maximum m:
//! S0 = sum e^u, S1 = sum e^u u, S2 = sum e^2u with u = (z - m) / tau. Blocks of
//! 4 vectors accumulate in f32 registers and are flushed into f64 registers every few blocks,
//! so f32 rounding never sees more than a few dozen terms. The emitted token is left out of
//! the sweep (read as -inf) and merged in f64 at the end: that gives 1 - p_y and
//! sum_{j != y} p_j^2 directly, so grad_norm keeps full precision when p_y is close to 1
//! instead of cancelling.

use crate::element::Element;
use crate::error::{Error, Location, LogitsFault, Result, TokenFault};
use crate::exp::{EXP_MIN, exp};
use crate::simd::{Isa, Portable, Simd};
use rayon::prelude::*;

/// Vectors per block (even: elements are loaded in pairs of vectors): independent
/// accumulator chains that hide FMA latency.
const UNROLL: usize = 4;
/// f32 accumulators per moment: vector k of a block adds into accumulator k % ACCS. Fewer
/// than UNROLL keeps AVX2's 16 registers from spilling; the chains stay short (UNROLL / ACCS
/// dependent adds per block).
const ACCS: usize = 2;
/// Blocks between f32 -> f64 flushes: each f32 lane sums UNROLL / ACCS * FLUSH_EVERY = 32
/// terms (at most 2e-6 relative rounding error, typically 3e-7) before it is widened.
const FLUSH_EVERY: usize = 16;
/// Widest vector, in lanes; sizes the padded tail buffer.
const MAX_LANES: usize = 16;
/// A rise of the running maximum by more than this (in units of u) underflows every
/// earlier term to 0 in f64.
const F64_EXP_UNDERFLOW: f64 = 745.0;

/// A read-only [rows, cols] matrix of logits whose rows may be `row_stride` elements apart
/// (a slice of a padded-vocabulary tensor needs no copy).
#[derive(Clone, Copy, Debug)]
pub struct Logits<'a, E> {
    data: &'a [E],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, E: Element> Logits<'a, E> {
    pub fn new(data: &'a [E], rows: usize, cols: usize, row_stride: usize) -> Result<Self> {
        if row_stride < cols && rows > 1 {
            return Err(Error::Shape(format!("row stride {row_stride} is smaller than the row length {cols}")));
        }
        let needed = if rows == 0 { 0 } else { (rows - 1) * row_stride + cols };
        if data.len() < needed {
            return Err(Error::Shape(format!(
                "logits buffer holds {} elements, but {rows} rows of {cols} with stride {row_stride} need {needed}",
                data.len()
            )));
        }
        Ok(Logits { data, rows, cols, row_stride })
    }

    /// A contiguous [rows, cols] matrix.
    pub fn contiguous(data: &'a [E], cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(Error::Shape("logits have a vocabulary of size 0".into()));
        }
        if !data.len().is_multiple_of(cols) {
            return Err(Error::Shape(format!("{} logits do not divide into rows of {cols}", data.len())));
        }
        Self::new(data, data.len() / cols, cols, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, r: usize) -> &'a [E] {
        &self.data[r * self.row_stride..r * self.row_stride + self.cols]
    }
}

/// Options of [`token_stats`].
#[derive(Clone, Copy, Debug)]
pub struct StatsOptions {
    /// Softmax temperature tau > 0: the statistics are of softmax(z / tau).
    pub temperature: f64,
    /// The instruction set; [`Isa::detect`] when `None`.
    pub isa: Option<Isa>,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions { temperature: 1.0, isa: None }
    }
}

/// Per-token statistics, one entry per row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenStats {
    /// H = -sum p log p, in nats.
    pub entropy: Vec<f32>,
    /// log p_y.
    pub logprob: Vec<f32>,
    /// c = sum p^2.
    pub collision: Vec<f32>,
    /// G = ||p - onehot(y)||_2, the norm of d(-log p_y)/dz.
    pub grad_norm: Vec<f32>,
    /// G * ||h||: the nuclear norm of the token's LM-head weight gradient (p - e_y) h^T.
    pub head_grad_norm: Option<Vec<f32>>,
}

/// The statistics of one row, in f64 before the final rounding.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RowStats {
    entropy: f64,
    logprob: f64,
    collision: f64,
    grad_norm: f64,
}

/// Computes [`TokenStats`] for every row, in parallel over rows. Results are bit-identical
/// for any number of threads: each row is reduced by exactly one thread in a fixed order.
pub fn token_stats<E: Element>(
    logits: Logits<'_, E>,
    token_ids: &[i64],
    hidden_norms: Option<&[f32]>,
    options: StatsOptions,
) -> Result<TokenStats> {
    let rows = logits.rows();
    if token_ids.len() != rows {
        return Err(Error::Shape(format!("{} token ids for {rows} rows of logits", token_ids.len())));
    }
    if let Some(h) = hidden_norms {
        if h.len() != rows {
            return Err(Error::Shape(format!("{} hidden norms for {rows} rows of logits", h.len())));
        }
        if let Some(i) = h.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(Error::Value {
                field: "hidden_norms",
                index: i,
                reason: format!("{} is not a finite non-negative norm", h[i]),
            });
        }
    }
    let inv_tau = inverse_temperature(options.temperature)?;
    let isa = options.isa.unwrap_or_else(Isa::detect);
    if !isa.is_supported() {
        return Err(Error::Config(format!("this CPU does not support the {isa} instruction set")));
    }

    // Small rows are batched per task so scheduling does not dominate.
    let min_rows_per_task = (16_384 / logits.cols().max(1)).max(1);
    let per_row: Vec<Result<RowStats>> = (0..rows)
        .into_par_iter()
        .with_min_len(min_rows_per_task)
        .map(|r| row_stats(logits.row(r), token_ids[r], inv_tau, isa).map_err(|f| f.at(r)))
        .collect();

    let mut out = TokenStats {
        entropy: Vec::with_capacity(rows),
        logprob: Vec::with_capacity(rows),
        collision: Vec::with_capacity(rows),
        grad_norm: Vec::with_capacity(rows),
        head_grad_norm: hidden_norms.map(|_| Vec::with_capacity(rows)),
    };
    for (r, row) in per_row.into_iter().enumerate() {
        let s = row?;
        out.entropy.push(s.entropy as f32);
        out.logprob.push(s.logprob as f32);
        out.collision.push(s.collision as f32);
        out.grad_norm.push(s.grad_norm as f32);
        if let (Some(head), Some(h)) = (out.head_grad_norm.as_mut(), hidden_norms) {
            head.push((s.grad_norm * f64::from(h[r])) as f32);
        }
    }
    Ok(out)
}

/// Validates tau and returns 1/tau as the f32 the sweep multiplies by.
pub fn inverse_temperature(temperature: f64) -> Result<f32> {
    let inv = (1.0 / temperature) as f32;
    if !(temperature > 0.0 && temperature.is_finite() && inv.is_finite() && inv > 0.0) {
        return Err(Error::Config(format!(
            "temperature must be a finite number > 0 whose inverse is a finite float32, got {temperature}"
        )));
    }
    Ok(inv)
}

/// A row-level fault before its location is known.
#[derive(Debug)]
enum RowFault {
    Logits(LogitsFault),
    Token(TokenFault),
}

impl RowFault {
    fn at(self, row: usize) -> Error {
        let at = Location::row(row);
        match self {
            RowFault::Logits(fault) => Error::Logits { at, fault },
            RowFault::Token(fault) => Error::Token { at, fault },
        }
    }
}

/// The statistics of one row of logits with emitted token `token`. `isa` must be supported
/// (checked by `token_stats`, the only caller).
fn row_stats<E: Element>(row: &[E], token: i64, inv_tau: f32, isa: Isa) -> std::result::Result<RowStats, RowFault> {
    let vocab = row.len();
    let y = usize::try_from(token)
        .ok()
        .filter(|&y| y < vocab)
        .ok_or(RowFault::Token(TokenFault::OutOfRange { token, vocab }))?;

    let mut acc = Online::EMPTY;
    sweep(isa, row, y, inv_tau, &mut acc);
    let z_y = row[y].to_f32();

    if acc.is_finite() && z_y.is_finite() {
        return Ok(acc.finish(z_y, inv_tau));
    }
    if let Some((col, value)) = first_non_finite(row) {
        return Err(RowFault::Logits(LogitsFault::NonFinite { col, value }));
    }
    debug_assert_eq!(z_y, f32::NEG_INFINITY, "finite logits left a non-finite accumulator");
    // A -inf target among finite entries is a token problem; a row of -inf is a logits one.
    Err(if acc.s0 > 0.0 {
        RowFault::Token(TokenFault::ImpossibleToken { token })
    } else {
        RowFault::Logits(LogitsFault::AllNegInf)
    })
}

fn first_non_finite<E: Element>(row: &[E]) -> Option<(usize, f32)> {
    row.iter().map(|x| x.to_f32()).enumerate().find(|(_, x)| x.is_nan() || *x == f32::INFINITY)
}

/// Online softmax moments of the entries seen so far, relative to their maximum `m`
/// (in logit units): S0 = sum e^u, S1 = sum e^u u, S2 = sum e^2u, u = (z - m) / tau.
#[derive(Clone, Copy, Debug)]
struct Online {
    m: f32,
    s0: f64,
    s1: f64,
    s2: f64,
}

impl Online {
    /// `m` starts at the lowest finite value, not -inf, so that u = z - m is -inf (not NaN)
    /// for -inf entries; with S0 = 0 the starting m carries no weight.
    const EMPTY: Online = Online { m: f32::MIN, s0: 0.0, s1: 0.0, s2: 0.0 };

    fn is_finite(&self) -> bool {
        self.m.is_finite() && self.s0.is_finite() && self.s1.is_finite() && self.s2.is_finite()
    }

    /// Moves the reference point up to `m_new` >= m.
    fn raise(&mut self, m_new: f32, inv_tau: f32) {
        let d = (f64::from(m_new) - f64::from(self.m)) * f64::from(inv_tau);
        // `d` may be +inf (a huge rise at a tiny temperature); NaN cannot occur here.
        if self.s0 == 0.0 || d >= F64_EXP_UNDERFLOW {
            *self = Online { m: m_new, ..Online::EMPTY };
            return;
        }
        let s = (-d).exp();
        self.s1 = s * (self.s1 - d * self.s0);
        self.s0 *= s;
        self.s2 *= s * s;
        self.m = m_new;
    }

    /// Merges the emitted token's logit and derives the statistics (all in f64).
    fn finish(self, z_y: f32, inv_tau: f32) -> RowStats {
        let inv_tau = f64::from(inv_tau);
        let (m, z_y) = (f64::from(self.m), f64::from(z_y));
        let top = m.max(z_y);
        // Moments of the other entries relative to `top`; the target's own u is d_y.
        let (s0, s1, s2) = if self.s0 > 0.0 {
            let d = (m - top) * inv_tau;
            let s = d.exp();
            (s * self.s0, s * (self.s1 + d * self.s0), s * s * self.s2)
        } else {
            (0.0, 0.0, 0.0)
        };
        let d_y = (z_y - top) * inv_tau;
        let e_y = d_y.exp();
        let total0 = s0 + e_y;
        let total1 = s1 + e_y * d_y;
        let total2 = s2 + e_y * e_y;
        let ln_s0 = total0.ln();
        RowStats {
            entropy: (ln_s0 - total1 / total0).max(0.0),
            logprob: (d_y - ln_s0).min(0.0),
            collision: total2 / (total0 * total0),
            grad_norm: (s0 * s0 + s2).sqrt() / total0,
        }
    }
}

/// Accumulates `values` except `values[hole]` into `acc` with the chosen instruction set.
fn sweep<E: Element>(isa: Isa, values: &[E], hole: usize, inv_tau: f32, acc: &mut Online) {
    // At tau = 1 (the usual case) the loop leaves out the multiply by 1/tau, which is exact
    // there, so both instantiations give the same bits.
    if inv_tau == 1.0 {
        sweep_on::<E, false>(isa, values, hole, inv_tau, acc)
    } else {
        sweep_on::<E, true>(isa, values, hole, inv_tau, acc)
    }
}

fn sweep_on<E: Element, const SCALED: bool>(isa: Isa, values: &[E], hole: usize, inv_tau: f32, acc: &mut Online) {
    match isa {
        // SAFETY: `token_stats` only passes instruction sets that `is_supported`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { sweep_avx512::<E, SCALED>(values, hole, inv_tau, acc) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { sweep_avx2::<E, SCALED>(values, hole, inv_tau, acc) },
        _ => unsafe { sweep_with::<Portable, E, SCALED>(values, hole, inv_tau, acc) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn sweep_avx512<E: Element, const SCALED: bool>(values: &[E], hole: usize, inv_tau: f32, acc: &mut Online) {
    unsafe { sweep_with::<crate::simd::Avx512, E, SCALED>(values, hole, inv_tau, acc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep_avx2<E: Element, const SCALED: bool>(values: &[E], hole: usize, inv_tau: f32, acc: &mut Online) {
    unsafe { sweep_with::<crate::simd::Avx2, E, SCALED>(values, hole, inv_tau, acc) }
}

/// The one SIMD body. Blocks of `UNROLL` vectors, flushed to f64 every `FLUSH_EVERY`
/// blocks. The block that holds `hole` and a partial last block are read from a copy with -inf
/// in place of the hole and of the missing elements, so the row is swept once, from its start.
#[inline(always)]
unsafe fn sweep_with<S: Simd, E: Element, const SCALED: bool>(
    values: &[E],
    hole: usize,
    inv_tau: f32,
    acc: &mut Online,
) {
    let block = UNROLL * S::LANES;
    let mut state = unsafe { Registers::<S, SCALED>::new(acc, inv_tau) };
    let patched = |from: usize| {
        let mut copy = [E::NEG_INF; UNROLL * MAX_LANES];
        let part = &values[from..values.len().min(from + block)];
        copy[..part.len()].copy_from_slice(part);
        if (from..from + block).contains(&hole) {
            copy[hole - from] = E::NEG_INF;
        }
        copy
    };
    let full = values.len() / block;
    let hole_block = hole / block;
    for group in (0..full).step_by(FLUSH_EVERY) {
        for b in group..full.min(group + FLUSH_EVERY) {
            if b == hole_block {
                unsafe { state.block(patched(b * block).as_ptr(), acc) };
            } else {
                unsafe { state.block(values.as_ptr().add(b * block), acc) };
            }
        }
        unsafe { state.flush() };
    }
    if full * block < values.len() {
        unsafe { state.block(patched(full * block).as_ptr(), acc) };
    }
    unsafe { state.settle(acc) };
}

/// The register accumulators of a sweep, relative to `acc.m`: f32 sums of the current few
/// blocks, and per-lane f64 sums of the blocks before them.
struct Registers<S: Simd, const SCALED: bool> {
    m: S::F,
    inv_tau: S::F,
    inv_tau_scalar: f32,
    s0: [S::F; ACCS],
    s1: [S::F; ACCS],
    s2: [S::F; ACCS],
    wide: [S::D; 3],
}

impl<S: Simd, const SCALED: bool> Registers<S, SCALED> {
    #[inline(always)]
    unsafe fn new(acc: &Online, inv_tau: f32) -> Self {
        unsafe {
            let zero = S::splat(0.0);
            Registers {
                m: S::splat(acc.m),
                inv_tau: S::splat(inv_tau),
                inv_tau_scalar: inv_tau,
                s0: [zero; ACCS],
                s1: [zero; ACCS],
                s2: [zero; ACCS],
                wide: [S::zero_f64(); 3],
            }
        }
    }

    /// One block of `UNROLL * LANES` elements at `p`.
    #[inline(always)]
    unsafe fn block<E: Element>(&mut self, p: *const E, acc: &mut Online) {
        unsafe {
            let mut v = [S::splat(0.0); UNROLL];
            for pair in 0..UNROLL / 2 {
                (v[2 * pair], v[2 * pair + 1]) = E::load_pair::<S>(p.add(2 * pair * S::LANES));
            }
            let mut block_max = v[0];
            for &vk in &v[1..] {
                block_max = S::max(block_max, vk);
            }
            if S::any_gt(block_max, self.m) {
                self.settle(acc);
                acc.raise(S::reduce_max(block_max), self.inv_tau_scalar);
                self.m = S::splat(acc.m);
            }
            // -inf (masked entries, padding) becomes EXP_MIN, where e is exactly 0, so
            // e * x is 0 rather than 0 * -inf = NaN. maxps keeps a NaN u.
            let mut x = v;
            for k in 0..UNROLL {
                let d = S::sub(v[k], self.m);
                let u = if SCALED { S::mul(d, self.inv_tau) } else { d };
                x[k] = S::max(S::splat(EXP_MIN), u);
            }
            let e = exp::<S, UNROLL>(x);
            for k in 0..UNROLL {
                let a = k % ACCS;
                self.s0[a] = S::add(self.s0[a], e[k]);
                self.s1[a] = S::fmadd(e[k], x[k], self.s1[a]);
                self.s2[a] = S::fmadd(e[k], e[k], self.s2[a]);
            }
        }
    }

    /// Adds the f32 register sums into the per-lane f64 sums and clears them.
    #[inline(always)]
    unsafe fn flush(&mut self) {
        unsafe {
            let zero = S::splat(0.0);
            for (wide, part) in self.wide.iter_mut().zip([&mut self.s0, &mut self.s1, &mut self.s2]) {
                let mut sum = part[0];
                for &a in &part[1..] {
                    sum = S::add(sum, a);
                }
                *wide = S::add_f64(*wide, sum);
                *part = [zero; ACCS];
            }
        }
    }

    /// Adds every register sum into the scalar accumulators and clears the registers.
    #[inline(always)]
    unsafe fn settle(&mut self, acc: &mut Online) {
        unsafe {
            self.flush();
            acc.s0 += S::reduce_f64(self.wide[0]);
            acc.s1 += S::reduce_f64(self.wide[1]);
            acc.s2 += S::reduce_f64(self.wide[2]);
            self.wide = [S::zero_f64(); 3];
        }
    }
}
