//! `corrpo._native`: a thin PyO3 layer over corrpo-core. Arrays arrive as NumPy views
//! (no copies of logits), native work runs with the GIL released, and core errors become
//! the exception classes of `corrpo.errors`. The Python package validates and converts
//! user input (torch tensors, ml_dtypes.bfloat16, lists) before calling in here.

mod errors;

use corrpo_core::rewards::{Advantage, Gate, RegularizeConfig};
use corrpo_core::{Element, Error, Isa, Logits, Method, StatsOptions, bf16, f16};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

type Array<'py, T> = Bound<'py, PyArray1<T>>;
/// entropy, logprob, collision, grad_norm, head_grad_norm
type StatsArrays<'py> = (Array<'py, f32>, Array<'py, f32>, Array<'py, f32>, Array<'py, f32>, Option<Array<'py, f32>>);
/// rewards, advantages, applied, rho_undefined
type RewardArrays<'py> = (Array<'py, f64>, Array<'py, f64>, Array<'py, bool>, Array<'py, bool>);

fn parse<T: std::str::FromStr<Err = String>>(py: Python<'_>, value: &str) -> PyResult<T> {
    value.parse().map_err(|msg| errors::to_py(py, Error::Config(msg)))
}

fn lengths_of(py: Python<'_>, field: &str, values: &PyReadonlyArray1<'_, i64>) -> PyResult<Vec<usize>> {
    values
        .as_array()
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            usize::try_from(n).map_err(|_| errors::to_py(py, Error::Shape(format!("{field}[{i}] is negative: {n}"))))
        })
        .collect()
}

/// A zero-copy [rows, cols] view of a 2-D array whose rows are unit-stride.
fn logits_view<'a, T: numpy::Element, E: Element>(
    py: Python<'_>,
    array: &'a PyReadonlyArray2<'_, T>,
    cast: fn(&'a [T]) -> &'a [E],
) -> PyResult<Logits<'a, E>> {
    let view = array.as_array();
    let (rows, cols) = view.dim();
    let strides = view.strides();
    // Strides of an empty or single-row array carry no information (NumPy may report 0).
    let row_stride = if rows > 1 && cols > 0 { strides[0] } else { cols as isize };
    if rows > 0 && ((cols > 1 && strides[1] != 1) || row_stride < 0) {
        return Err(errors::to_py(
            py,
            Error::Shape(format!(
                "logits rows must be unit-stride with a non-negative row stride, got strides {strides:?}"
            )),
        ));
    }
    let row_stride = row_stride as usize;
    let len = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * row_stride + cols };
    // SAFETY: numpy guarantees `len` elements from the first one under these strides, and
    // the readonly borrow keeps them alive and unaliased by writers for 'a.
    let data = unsafe { std::slice::from_raw_parts(view.as_ptr(), len) };
    Logits::new(cast(data), rows, cols, row_stride).map_err(|e| errors::to_py(py, e))
}

/// Entropy, logprob, collision, grad_norm and (with hidden norms) head_grad_norm per row.
/// `dtype` says how to read `logits`: float32 as is, float16 and bfloat16 as their uint16
/// bits. `first_row` is the batch row of `logits[0]` when they are a slice of a batch:
/// errors then name the batch row (and, with `lengths`, the batch's rollout).
#[pyfunction]
#[pyo3(signature = (logits, dtype, token_ids, temperature, hidden_norms=None, lengths=None, isa=None, first_row=0))]
#[allow(clippy::too_many_arguments)]
fn token_stats<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    dtype: &str,
    token_ids: PyReadonlyArray1<'py, i64>,
    temperature: f64,
    hidden_norms: Option<PyReadonlyArray1<'py, f32>>,
    lengths: Option<PyReadonlyArray1<'py, i64>>,
    isa: Option<&str>,
    first_row: usize,
) -> PyResult<StatsArrays<'py>> {
    let options = StatsOptions { temperature, isa: isa.map(|name| parse::<Isa>(py, name)).transpose()? };
    let lengths = lengths.as_ref().map(|l| lengths_of(py, "lengths", l)).transpose()?;
    let ids = token_ids.as_slice()?;
    let norms = hidden_norms.as_ref().map(|h| h.as_slice()).transpose()?;

    let result = match dtype {
        "float32" => {
            let array = logits.extract::<PyReadonlyArray2<f32>>()?;
            let view = logits_view(py, &array, |d| d)?;
            py.detach(|| corrpo_core::token_stats(view, ids, norms, options))
        }
        "float16" | "bfloat16" => {
            let array = logits.extract::<PyReadonlyArray2<u16>>()?;
            if dtype == "float16" {
                let view = logits_view(py, &array, bytemuck::cast_slice::<u16, f16>)?;
                py.detach(|| corrpo_core::token_stats(view, ids, norms, options))
            } else {
                let view = logits_view(py, &array, bytemuck::cast_slice::<u16, bf16>)?;
                py.detach(|| corrpo_core::token_stats(view, ids, norms, options))
            }
        }
        other => {
            return Err(errors::to_py(py, Error::Config(format!("unsupported logits dtype {other:?}"))));
        }
    };
    let stats = result.map_err(|e| {
        let e = e.offset(first_row);
        let located = match lengths.as_deref() {
            Some(l) => e.locate(l),
            None => e,
        };
        errors::to_py(py, located)
    })?;
    Ok((
        stats.entropy.into_pyarray(py),
        stats.logprob.into_pyarray(py),
        stats.collision.into_pyarray(py),
        stats.grad_norm.into_pyarray(py),
        stats.head_grad_norm.map(|h| h.into_pyarray(py)),
    ))
}

/// Correlation of two samples: (value, reason) with value NaN and a reason code when it is
/// undefined.
#[pyfunction]
#[pyo3(signature = (x, y, method, min_len=2))]
fn correlation(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f64>,
    y: PyReadonlyArray1<'_, f64>,
    method: &str,
    min_len: usize,
) -> PyResult<(f64, Option<&'static str>)> {
    let method = parse::<Method>(py, method)?;
    let (x, y) = (x.as_slice()?, y.as_slice()?);
    if x.len() != y.len() {
        return Err(errors::to_py(py, Error::Shape(format!("x has {} values but y has {}", x.len(), y.len()))));
    }
    corrpo_core::check_finite("x", x)
        .and_then(|_| corrpo_core::check_finite("y", y))
        .map_err(|e| errors::to_py(py, e))?;
    Ok(match py.detach(|| corrpo_core::correlation(x, y, method, min_len)) {
        Ok(rho) => (rho, None),
        Err(why) => (f64::NAN, Some(why.code())),
    })
}

/// Per-rollout rho: (rho, n_tokens, reasons) with NaN rho and a reason code where undefined.
#[pyfunction]
fn rollout_correlations<'py>(
    py: Python<'py>,
    entropy: PyReadonlyArray1<'py, f64>,
    grad_norm: PyReadonlyArray1<'py, f64>,
    lengths: PyReadonlyArray1<'py, i64>,
    method: &str,
    min_tokens: usize,
) -> PyResult<(Array<'py, f64>, Array<'py, i64>, Bound<'py, PyList>)> {
    let method = parse::<Method>(py, method)?;
    let lengths = lengths_of(py, "lengths", &lengths)?;
    let (h, g) = (entropy.as_slice()?, grad_norm.as_slice()?);
    let rows = py
        .detach(|| corrpo_core::rollout_correlations(h, g, &lengths, method, min_tokens))
        .map_err(|e| errors::to_py(py, e))?;
    let reasons = PyList::new(py, rows.iter().map(|r| r.rho.err().map(|why| why.code())))?;
    Ok((
        rows.iter().map(|r| r.value()).collect::<Vec<_>>().into_pyarray(py),
        rows.iter().map(|r| r.n_tokens as i64).collect::<Vec<_>>().into_pyarray(py),
        reasons,
    ))
}

/// The batch fingerprint as a dict of plain Python values.
#[pyfunction]
#[pyo3(signature = (entropy, grad_norm, token_ids, lengths, method, min_tokens))]
fn fingerprint<'py>(
    py: Python<'py>,
    entropy: PyReadonlyArray1<'py, f64>,
    grad_norm: PyReadonlyArray1<'py, f64>,
    token_ids: Option<PyReadonlyArray1<'py, i64>>,
    lengths: Option<PyReadonlyArray1<'py, i64>>,
    method: &str,
    min_tokens: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let method = parse::<Method>(py, method)?;
    let lengths = lengths.as_ref().map(|l| lengths_of(py, "lengths", l)).transpose()?;
    let ids = token_ids.as_ref().map(|t| t.as_slice()).transpose()?;
    let (h, g) = (entropy.as_slice()?, grad_norm.as_slice()?);
    let f = py
        .detach(|| corrpo_core::fingerprint(h, g, ids, lengths.as_deref(), method, min_tokens))
        .map_err(|e| errors::to_py(py, e))?;
    let out = PyDict::new(py);
    let split = |r: Result<f64, corrpo_core::Undefined>| match r {
        Ok(v) => (v, None),
        Err(why) => (f64::NAN, Some(why.code())),
    };
    let (pooled, pooled_reason) = split(f.pooled);
    out.set_item("method", f.method.name())?;
    out.set_item("n_tokens", f.n_tokens)?;
    out.set_item("rho_pooled", pooled)?;
    out.set_item("rho_pooled_reason", pooled_reason)?;
    out.set_item("n_unique_tokens", f.n_unique_tokens)?;
    let (unique, unique_reason) = f.unique.map_or((None, None), |u| {
        let (v, why) = split(u);
        (Some(v), why)
    });
    out.set_item("rho_unique", unique)?;
    out.set_item("rho_unique_reason", unique_reason)?;
    out.set_item("n_rollouts", f.n_rollouts)?;
    out.set_item("n_rollouts_defined", f.n_rollouts_defined)?;
    out.set_item("rho_rollout_mean", f.rollout_mean)?;
    out.set_item("entropy_mean", f.entropy_mean)?;
    out.set_item("grad_norm_mean", f.grad_norm_mean)?;
    Ok(out)
}

/// CorR-PO rewards: (rewards, advantages, applied, rho_undefined).
#[pyfunction]
#[pyo3(signature = (rewards, rho, group_sizes, coef, gate, threshold, advantage))]
#[allow(clippy::too_many_arguments)]
fn regularize<'py>(
    py: Python<'py>,
    rewards: Option<PyReadonlyArray1<'py, f64>>,
    rho: PyReadonlyArray1<'py, f64>,
    group_sizes: PyReadonlyArray1<'py, i64>,
    coef: f64,
    gate: &str,
    threshold: f64,
    advantage: &str,
) -> PyResult<RewardArrays<'py>> {
    let config = RegularizeConfig {
        coef,
        gate: parse::<Gate>(py, gate)?,
        threshold,
        advantage: parse::<Advantage>(py, advantage)?,
    };
    let groups = lengths_of(py, "group_sizes", &group_sizes)?;
    let r = rewards.as_ref().map(|r| r.as_slice()).transpose()?;
    let rho = rho.as_slice()?;
    let out = py.detach(|| corrpo_core::regularize(r, rho, &groups, config)).map_err(|e| errors::to_py(py, e))?;
    Ok((
        out.rewards.into_pyarray(py),
        out.advantages.into_pyarray(py),
        out.applied.into_pyarray(py),
        out.rho_undefined.into_pyarray(py),
    ))
}

/// The instruction set token_stats uses by default on this CPU.
#[pyfunction]
fn simd_isa() -> &'static str {
    Isa::detect().name()
}

/// Every instruction set this CPU supports.
#[pyfunction]
fn supported_isas() -> Vec<&'static str> {
    Isa::supported().into_iter().map(Isa::name).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(token_stats, m)?)?;
    m.add_function(wrap_pyfunction!(correlation, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_correlations, m)?)?;
    m.add_function(wrap_pyfunction!(fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(regularize, m)?)?;
    m.add_function(wrap_pyfunction!(simd_isa, m)?)?;
    m.add_function(wrap_pyfunction!(supported_isas, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
