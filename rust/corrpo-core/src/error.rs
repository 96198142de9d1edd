//! Errors. Every one names what was wrong and where, so a user can find the offending
//! rollout and token in a batch of thousands.

use std::fmt;

/// Where a token sits: its row in the concatenated batch and, when rollout lengths are
/// known, its rollout and position inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub row: usize,
    pub rollout: Option<(usize, usize)>,
}

impl Location {
    pub fn row(row: usize) -> Self {
        Location { row, rollout: None }
    }

    /// Resolves the rollout from ragged lengths; leaves it unknown when `row` is past them.
    pub fn within(row: usize, lengths: &[usize]) -> Self {
        let mut start = 0;
        for (i, &n) in lengths.iter().enumerate() {
            if row < start + n {
                return Location { row, rollout: Some((i, row - start)) };
            }
            start += n;
        }
        Location::row(row)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rollout {
            Some((rollout, token)) => {
                write!(f, "rollout {rollout}, token {token} (row {})", self.row)
            }
            None => write!(f, "row {}", self.row),
        }
    }
}

/// What is wrong with a row of logits.
#[derive(Clone, Debug, PartialEq)]
pub enum LogitsFault {
    /// A NaN or +inf entry; `col` is the first one.
    NonFinite { col: usize, value: f32 },
    /// Every entry is -inf: the row is no distribution.
    AllNegInf,
}

/// What is wrong with the emitted token of a row.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenFault {
    OutOfRange {
        token: i64,
        vocab: usize,
    },
    /// The token's logit is -inf, so it could not have been sampled; usually the logits and
    /// tokens are shifted by one against each other.
    ImpossibleToken {
        token: i64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// Array lengths or shapes that do not fit together.
    Shape(String),
    /// A configuration value out of its domain.
    Config(String),
    Logits {
        at: Location,
        fault: LogitsFault,
    },
    Token {
        at: Location,
        fault: TokenFault,
    },
    /// A non-finite or out-of-domain value in a per-token or per-rollout input array.
    Value {
        field: &'static str,
        index: usize,
        reason: String,
    },
}

impl Error {
    /// Moves a row-level error by `rows`: for a slice of a batch that starts at that row.
    pub fn offset(self, rows: usize) -> Error {
        match self {
            Error::Logits { at, fault } => Error::Logits { at: Location::row(at.row + rows), fault },
            Error::Token { at, fault } => Error::Token { at: Location::row(at.row + rows), fault },
            other => other,
        }
    }

    /// Adds the rollout and in-rollout token index to a row-level error.
    pub fn locate(self, lengths: &[usize]) -> Error {
        match self {
            Error::Logits { at, fault } => Error::Logits { at: Location::within(at.row, lengths), fault },
            Error::Token { at, fault } => Error::Token { at: Location::within(at.row, lengths), fault },
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(msg) | Error::Config(msg) => f.write_str(msg),
            Error::Logits { at, fault } => match fault {
                LogitsFault::NonFinite { col, value } => {
                    write!(f, "logits at {at}: vocabulary index {col} is {value} (logits must be finite or -inf)")
                }
                LogitsFault::AllNegInf => {
                    write!(f, "logits at {at}: every entry is -inf, so the row is no distribution")
                }
            },
            Error::Token { at, fault } => match fault {
                TokenFault::OutOfRange { token, vocab } => {
                    write!(f, "token id at {at}: {token} is outside the vocabulary [0, {vocab})")
                }
                TokenFault::ImpossibleToken { token } => write!(
                    f,
                    "token id at {at}: the logit of token {token} is -inf, so it cannot have been sampled \
                     (are logits and token ids shifted by one?)"
                ),
            },
            Error::Value { field, index, reason } => write!(f, "{field}[{index}]: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Fails on the first non-finite value of `values`, naming `field` and its index.
pub fn check_finite(field: &'static str, values: &[f64]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::Value { field, index, reason: format!("{} is not finite", values[index]) }),
        None => Ok(()),
    }
}
