//! Errors of the actor layer.

use std::time::Duration;

/// What can go wrong when driving a supervision tree.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sibling with that name already exists (running or awaiting restart).
    #[error("child `{0}` already exists")]
    DuplicateChild(String),
    /// The child's factory or `pre_start` failed.
    #[error("child `{child}` failed to start: {reason}")]
    Spawn {
        /// The child's name.
        child: String,
        /// Why it failed.
        reason: String,
    },
    /// The supervisor is not running (stopped, or failed and escalated).
    #[error("supervisor `{0}` is not running")]
    Unavailable(String),
    /// The supervisor did not answer in time.
    #[error("supervisor `{0}` did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The tree did not stop within the deadline and was killed.
    #[error("actor tree did not stop within {0:?}; killed")]
    StopTimeout(Duration),
    /// The restart policy is invalid (every problem listed).
    #[error("invalid restart policy: {}", .0.join("; "))]
    InvalidPolicy(Vec<String>),
}

impl Error {
    /// The error's stable code for the API and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::DuplicateChild(_) => "conflict",
            Self::InvalidPolicy(_) => "invalid_request",
            Self::Unavailable(_) | Self::Timeout(..) => "service_unavailable",
            Self::Spawn { .. } | Self::StopTimeout(_) => "internal_error",
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Timeout(..) | Self::Spawn { .. }
        )
    }
}

/// Result alias of the actor layer.
pub type Result<T> = std::result::Result<T, Error>;
