//! The harness's error type.

use std::fmt;

/// Why a lane operation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneError {
    /// No lane can run real guests on this machine. Tests print
    /// `SKIPPED: <reason>` and return; they must never pass silently.
    Skip(String),
    /// Something went wrong. The message carries whatever context helps:
    /// console tails of the L2 guest and of the L1 host where they exist.
    Failed(String),
}

impl LaneError {
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        LaneError::Failed(message.into())
    }

    /// True for [`LaneError::Skip`].
    pub fn is_skip(&self) -> bool {
        matches!(self, LaneError::Skip(_))
    }
}

impl fmt::Display for LaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaneError::Skip(reason) => write!(f, "SKIPPED: {reason}"),
            LaneError::Failed(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for LaneError {}

pub type Result<T> = std::result::Result<T, LaneError>;
