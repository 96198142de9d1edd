mod common;

use common::{Rng, assert_close, reference};
use corrpo_core::{
    Element, Error, Isa, Logits, LogitsFault, StatsOptions, TokenFault, TokenStats, bf16, f16, token_stats,
};
use proptest::prelude::*;

fn run<E: Element>(data: &[E], cols: usize, ids: &[i64], tau: f64, isa: Isa) -> corrpo_core::Result<TokenStats> {
    let logits = Logits::contiguous(data, cols)?;
    token_stats(logits, ids, None, StatsOptions { temperature: tau, isa: Some(isa) })
}

fn check_rows<E: Element>(data: &[E], cols: usize, ids: &[i64], tau: f64, what: &str) {
    for isa in Isa::supported() {
        let s = run(data, cols, ids, tau, isa).unwrap_or_else(|e| panic!("{what} on {isa}: {e}"));
        for (r, &y) in ids.iter().enumerate() {
            let row: Vec<f64> = data[r * cols..(r + 1) * cols].iter().map(|v| f64::from(v.to_f32())).collect();
            let want = reference(&row, y as usize, tau);
            let got = (s.entropy[r], s.logprob[r], s.collision[r], s.grad_norm[r]);
            assert_close(got, &want, &format!("{what}, {isa}, row {r}"));
        }
    }
}

/// Rows of `cols` logits: `scale` * normal noise, some entries -inf, the target finite.
fn random_rows(rng: &mut Rng, rows: usize, cols: usize, scale: f64, masked: f64) -> (Vec<f32>, Vec<i64>) {
    let mut data = Vec::with_capacity(rows * cols);
    let mut ids = Vec::with_capacity(rows);
    for _ in 0..rows {
        let y = rng.below(cols);
        for j in 0..cols {
            let masked_out = j != y && rng.uniform() < masked;
            data.push(if masked_out { f32::NEG_INFINITY } else { (scale * rng.normal()) as f32 });
        }
        ids.push(y as i64);
    }
    (data, ids)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn matches_f64_reference(
        rows in 1usize..5,
        cols in 1usize..700,
        scale in prop::sample::select(vec![1e-3, 1.0, 4.0, 30.0, 1e4]),
        masked in prop::sample::select(vec![0.0, 0.3, 0.97]),
        tau in prop::sample::select(vec![0.25, 1.0, 3.0]),
        seed in any::<u64>(),
    ) {
        let (data, ids) = random_rows(&mut Rng(seed), rows, cols, scale, masked);
        check_rows(&data, cols, &ids, tau, "f32");
        let halves: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        check_rows(&halves, cols, &ids, tau, "f16");
        let brains: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        check_rows(&brains, cols, &ids, tau, "bf16");
    }

    #[test]
    fn half_precision_gives_the_bits_of_its_f32_widening(
        cols in 1usize..700,
        tau in prop::sample::select(vec![0.5, 1.0]),
        seed in any::<u64>(),
    ) {
        // A server that receives bf16 or f16 logits and a trainer that widened them to f32
        // must get the same numbers, bit for bit.
        let (data, ids) = random_rows(&mut Rng(seed), 3, cols, 4.0, 0.1);
        let brains: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        let halves: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        for isa in Isa::supported() {
            let widened: Vec<f32> = brains.iter().map(|v| v.to_f32()).collect();
            prop_assert_eq!(run(&brains, cols, &ids, tau, isa).unwrap(), run(&widened, cols, &ids, tau, isa).unwrap());
            let widened: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
            prop_assert_eq!(run(&halves, cols, &ids, tau, isa).unwrap(), run(&widened, cols, &ids, tau, isa).unwrap());
        }
    }

    #[test]
    fn isas_agree_with_each_other(cols in 1usize..400, seed in any::<u64>()) {
        let (data, ids) = random_rows(&mut Rng(seed), 3, cols, 5.0, 0.1);
        let base = run(&data, cols, &ids, 1.0, Isa::Portable).unwrap();
        for isa in Isa::supported() {
            let s = run(&data, cols, &ids, 1.0, isa).unwrap();
            for r in 0..3 {
                prop_assert!((s.entropy[r] - base.entropy[r]).abs() <= 2e-5 * base.entropy[r].max(1.0));
                prop_assert!((s.grad_norm[r] - base.grad_norm[r]).abs() <= 2e-6);
            }
        }
    }
}

#[test]
fn full_vocabulary_rows() {
    let cols = 151_936;
    let (data, ids) = random_rows(&mut Rng(7), 3, cols, 3.0, 0.0);
    check_rows(&data, cols, &ids, 1.0, "V=151936");
    check_rows(&data, cols, &ids, 0.7, "V=151936, tau=0.7");
}

#[test]
fn target_anywhere_in_the_row() {
    // The sweep reads the target's block from a copy with the target masked out. Every
    // position (first, last, both sides of block edges, the padded tail) must match the
    // reference; the target is the row's largest logit, so counting it in the sweep, or
    // masking a neighbour instead, would show. 203 columns: 3 AVX-512 blocks of 64 and
    // 6 AVX2 blocks of 32, then a tail.
    let cols = 203;
    let mut rng = Rng(13);
    let base: Vec<f32> = (0..cols).map(|_| rng.normal() as f32).collect();
    for y in 0..cols {
        let mut row = base.clone();
        row[y] = 6.0;
        check_rows(&row, cols, &[y as i64], 1.0, &format!("f32, target at {y}"));
        let brains: Vec<bf16> = row.iter().map(|&v| bf16::from_f32(v)).collect();
        check_rows(&brains, cols, &[y as i64], 1.0, &format!("bf16, target at {y}"));
        let halves: Vec<f16> = row.iter().map(|&v| f16::from_f32(v)).collect();
        check_rows(&halves, cols, &[y as i64], 0.5, &format!("f16, target at {y}"));
    }
}

#[test]
fn increasing_and_decreasing_rows_force_many_rescales() {
    let cols = 5_000;
    let up: Vec<f32> = (0..cols).map(|j| j as f32 * 0.01).collect();
    let down: Vec<f32> = up.iter().rev().copied().collect();
    check_rows(&[up, down].concat(), cols, &[17, 4_000], 1.0, "monotone");
}

#[test]
fn grad_norm_keeps_precision_when_target_dominates() {
    // p_y = 1 - ~1e-10: sqrt(1 - 2 p_y + c) would cancel to noise, and so would a plain
    // f64 reference, so the expectation is the closed form: with a = e^-30 and S = 1 + 999a,
    // 1 - p_y = 999a/S and sum_{j!=y} p_j^2 = 999a^2/S^2.
    let cols = 1_000;
    let mut row = vec![-10.0f32; cols];
    row[3] = 20.0;
    let a = (-30.0f64).exp();
    let want = a * (999.0f64 * 999.0 + 999.0).sqrt() / (1.0 + 999.0 * a);
    for isa in Isa::supported() {
        let s = run(&row, cols, &[3], 1.0, isa).unwrap();
        let rel = (f64::from(s.grad_norm[0]) - want).abs() / want;
        assert!(rel < 1e-6, "{isa}: grad_norm {} vs {want} (relative error {rel})", s.grad_norm[0]);
    }
}

#[test]
fn huge_magnitudes() {
    let cols = 300;
    let mut rng = Rng(3);
    let data: Vec<f32> = (0..2 * cols).map(|_| (1e4 * (2.0 * rng.uniform() - 1.0)) as f32).collect();
    check_rows(&data, cols, &[5, 299], 1.0, "|z|~1e4");
    let offset: Vec<f32> = (0..cols).map(|j| 1e4 + (j % 7) as f32).collect();
    check_rows(&offset, cols, &[0], 1.0, "z~1e4+small");
}

#[test]
fn tiny_vocabularies() {
    check_rows(&[0.3f32], 1, &[0], 1.0, "V=1");
    let s = run(&[0.3f32], 1, &[0], 1.0, Isa::detect()).unwrap();
    assert_eq!((s.entropy[0], s.logprob[0], s.grad_norm[0]), (0.0, 0.0, 0.0));
    check_rows(&[0.3f32, -1.2, 5.0, 5.0], 2, &[1, 0], 2.0, "V=2");
}

#[test]
fn empty_batch_is_not_an_error() {
    for isa in Isa::supported() {
        let s = run::<f32>(&[], 7, &[], 1.0, isa).unwrap();
        assert!(s.entropy.is_empty() && s.grad_norm.is_empty());
    }
}

#[test]
fn strided_rows_read_only_their_columns() {
    let (cols, stride) = (50, 64);
    let mut rng = Rng(11);
    // Padding columns hold NaN: reading them would fail the call.
    let data: Vec<f32> =
        (0..3 * stride).map(|i| if i % stride < cols { rng.normal() as f32 } else { f32::NAN }).collect();
    let ids = [0, 49, 20];
    let view = Logits::new(&data[..2 * stride + cols], 3, cols, stride).unwrap();
    let s = token_stats(view, &ids, Some(&[2.0, 0.5, 0.0]), StatsOptions::default()).unwrap();
    for (r, &y) in ids.iter().enumerate() {
        let row: Vec<f64> = data[r * stride..r * stride + cols].iter().map(|&v| f64::from(v)).collect();
        let want = reference(&row, y as usize, 1.0);
        assert_close((s.entropy[r], s.logprob[r], s.collision[r], s.grad_norm[r]), &want, "strided");
    }
    let head = s.head_grad_norm.unwrap();
    assert_eq!(head, vec![s.grad_norm[0] * 2.0, s.grad_norm[1] * 0.5, 0.0]);
}

fn error_of(row: &[f32], cols: usize, ids: &[i64], tau: f64) -> Error {
    let mut errors = Isa::supported().into_iter().map(|isa| run(row, cols, ids, tau, isa).unwrap_err());
    let first = errors.next().unwrap();
    for e in errors {
        assert_eq!(e.to_string(), first.to_string(), "instruction sets disagree on the error");
    }
    first
}

#[test]
fn non_finite_logits_name_row_and_column() {
    for (bad, col) in [(f32::NAN, 37), (f32::INFINITY, 3), (f32::NAN, 99)] {
        let mut data = vec![0.5f32; 200];
        data[100 + col] = bad;
        match error_of(&data, 100, &[0, 1], 1.0) {
            Error::Logits { at, fault: LogitsFault::NonFinite { col: c, value } } => {
                assert_eq!((at.row, c), (1, col));
                assert!(value.is_nan() == bad.is_nan());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A NaN target is a logits problem too.
    let err = error_of(&[1.0, f32::NAN, 2.0], 3, &[1], 1.0);
    assert!(matches!(err, Error::Logits { fault: LogitsFault::NonFinite { col: 1, .. }, .. }));
}

#[test]
fn all_neg_inf_row_and_impossible_token() {
    let err = error_of(&[0.0, 1.0, f32::NEG_INFINITY, f32::NEG_INFINITY], 2, &[1, 0], 1.0);
    assert!(matches!(err, Error::Logits { at, fault: LogitsFault::AllNegInf } if at.row == 1), "{err:?}");
    let err = error_of(&[0.0, f32::NEG_INFINITY, 2.0], 3, &[1], 1.0);
    assert!(matches!(err, Error::Token { fault: TokenFault::ImpossibleToken { token: 1 }, .. }), "{err:?}");
    assert!(err.to_string().contains("shifted by one"), "{err}");
}

#[test]
fn tokens_out_of_range() {
    for token in [-1i64, 4, i64::MAX] {
        let err = error_of(&[0.0; 8], 4, &[0, token], 1.0);
        match err {
            Error::Token { at, fault: TokenFault::OutOfRange { token: t, vocab: 4 } } => {
                assert_eq!((at.row, t), (1, token))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn bad_temperatures() {
    for tau in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300] {
        let err = error_of(&[0.0; 4], 4, &[0], tau);
        assert!(matches!(err, Error::Config(ref m) if m.contains("temperature")), "{tau}: {err:?}");
    }
}

#[test]
fn errors_locate_rollout_and_token() {
    let mut data = vec![0.0f32; 6 * 4];
    data[4 * 4 + 2] = f32::NAN;
    let err = run(&data, 4, &[0; 6], 1.0, Isa::detect()).unwrap_err().locate(&[3, 2, 1]);
    assert!(err.to_string().starts_with("logits at rollout 1, token 1 (row 4): vocabulary index 2 is NaN"), "{err}");
}

#[test]
fn errors_of_a_slice_name_the_batch_row() {
    // Rows 3..5 of a batch with rollouts [3, 2, 1]: the slice's row 1 is batch row 4.
    let mut data = vec![0.0f32; 3 * 4];
    data[4 + 2] = f32::NAN;
    let err = run(&data, 4, &[0; 3], 1.0, Isa::detect()).unwrap_err().offset(3).locate(&[3, 2, 1]);
    assert!(err.to_string().starts_with("logits at rollout 1, token 1 (row 4): vocabulary index 2 is NaN"), "{err}");
    let err = run(&data[..4], 4, &[9], 1.0, Isa::detect()).unwrap_err().offset(5);
    assert_eq!(err.to_string(), "token id at row 5: 9 is outside the vocabulary [0, 4)");
}

#[test]
fn shape_errors() {
    let err = run(&[0.0f32; 8], 4, &[0], 1.0, Isa::detect()).unwrap_err();
    assert!(matches!(err, Error::Shape(ref m) if m.contains("1 token ids for 2 rows")), "{err:?}");
    assert!(Logits::contiguous(&[0.0f32; 7], 4).is_err());
    assert!(Logits::new(&[0.0f32; 7], 2, 4, 4).is_err());
    assert!(Logits::new(&[0.0f32; 16], 2, 4, 3).is_err());
}

#[test]
fn bit_identical_for_any_thread_count() {
    let cols = 3_001;
    let (data, ids) = random_rows(&mut Rng(5), 64, cols, 2.0, 0.05);
    let results: Vec<TokenStats> = [1, 2, 3, 8]
        .into_iter()
        .map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| run(&data, cols, &ids, 1.0, Isa::detect()).unwrap())
        })
        .collect();
    for r in &results[1..] {
        assert_eq!(r, &results[0]);
    }
}
