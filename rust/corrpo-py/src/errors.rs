//! corrpo-core errors as the exception classes of `corrpo.errors`, with their context as
//! attributes (row, rollout, token index, field...) so callers need not parse messages.

use corrpo_core::{Error, Location, LogitsFault, TokenFault};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub fn to_py(py: Python<'_>, err: Error) -> PyErr {
    // If corrpo.errors itself cannot be imported, that failure is the error to raise.
    build(py, &err).unwrap_or_else(|import_failure| import_failure)
}

fn build(py: Python<'_>, err: &Error) -> PyResult<PyErr> {
    let context = PyDict::new(py);
    let class = match err {
        Error::Shape(_) => "ShapeError",
        Error::Config(_) => "ConfigError",
        Error::Logits { at, fault } => {
            locate(&context, at)?;
            if let LogitsFault::NonFinite { col, .. } = fault {
                context.set_item("vocab_index", col)?;
            }
            "InvalidLogitsError"
        }
        Error::Token { at, fault } => {
            locate(&context, at)?;
            let token = match fault {
                TokenFault::OutOfRange { token, .. } | TokenFault::ImpossibleToken { token } => token,
            };
            context.set_item("token_id", token)?;
            "InvalidTokenError"
        }
        Error::Value { field, index, .. } => {
            context.set_item("field", field)?;
            context.set_item("index", index)?;
            "InvalidValueError"
        }
    };
    let class = py.import("corrpo.errors")?.getattr(class)?;
    Ok(PyErr::from_value(class.call((err.to_string(),), Some(&context))?))
}

fn locate(context: &Bound<'_, PyDict>, at: &Location) -> PyResult<()> {
    context.set_item("row", at.row)?;
    if let Some((rollout, token)) = at.rollout {
        context.set_item("rollout", rollout)?;
        context.set_item("token_index", token)?;
    }
    Ok(())
}
