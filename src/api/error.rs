//! The API's one error type and the one `match` that maps every lower-layer
//! error to a status, a code and retryability (DESIGN "Interfaces").

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::fsm::Rejection;
use crate::node::NodeError;

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Whether repeating the same request may succeed.
    pub retryable: bool,
    /// A refusal the handler made (a tenant the credential may not name)
    /// that the guard must record in the audit log.
    pub(crate) audit_denial: bool,
    /// Seconds the client should wait before trying again (`Retry-After`;
    /// 503 and 429 answers say 1 unless the handler knows better).
    pub retry_after_s: Option<u64>,
}

/// Marks a response whose refusal the guard records as `denied:forbidden`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeniedInHandler;

/// Results of API handlers.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413 `payload_too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 401 `unauthenticated`: no usable credential (the response also
    /// carries `WWW-Authenticate: Bearer`).
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403 `forbidden`: the credential lacks a permission or the tenant.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 408 `request_timeout`: the client did not send its request in time.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    /// 429 `rate_limited`.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
    }

    /// 503 `service_unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    /// An error with the retryability its code usually has (DESIGN's table).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let retryable = matches!(
            code,
            "conflict"
                | "rate_limited"
                | "shed"
                | "internal_error"
                | "service_unavailable"
                | "gateway_timeout"
        );
        Self {
            status,
            code,
            message: message.into(),
            retryable,
            audit_denial: false,
            retry_after_s: None,
        }
    }

    /// The same error, telling the client to wait `secs` (at least 1)
    /// before trying again.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_s = Some(secs.max(1));
        self
    }

    /// The same error, to be recorded in the audit log as a denial.
    pub(crate) fn audited(mut self) -> Self {
        self.audit_denial = true;
        self
    }

    /// The same error, marked as one that repeating the request cannot fix.
    fn final_(mut self) -> Self {
        self.retryable = false;
        self
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        match e {
            NodeError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            ),
            NodeError::Overloaded(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            }
            NodeError::Invalid(_) => Self::new(StatusCode::BAD_REQUEST, "invalid_request", message),
            NodeError::Internal(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
            }
        }
    }
}

impl From<crate::backup::BackupError> for ApiError {
    fn from(e: crate::backup::BackupError) -> Self {
        let code = e.code();
        let mut err = Self::new(status_of(code), code, e.to_string());
        err.retryable = e.is_retryable();
        err
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        let message = r.to_string();
        let code = r.code();
        let err = Self::new(status_of(code), code, message);
        match r {
            // A stale token or a finished task stays that way: retrying cannot help.
            Rejection::StaleToken(_)
            | Rejection::IllegalTransition { .. }
            | Rejection::SessionTransition { .. }
            | Rejection::Conflict(_) => err.final_(),
            _ => err,
        }
    }
}

/// The HTTP status of an error code (DESIGN "Interfaces").
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "invalid_request" => StatusCode::BAD_REQUEST,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "conflict" => StatusCode::CONFLICT,
        "request_timeout" => StatusCode::REQUEST_TIMEOUT,
        "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "service_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "gateway_timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The body of every error answer: `{"error": {"code", "message", "retryable"}}`.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// What went wrong.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail<'a> {
    /// Stable machine-readable code.
    #[schema(value_type = String, example = "invalid_request", pattern = "^[a-z_]+$")]
    code: &'static str,
    /// Human-readable message (names the offending field when there is one).
    message: &'a str,
    /// Whether repeating the same request may succeed.
    retryable: bool,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                retryable: self.retryable,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.audit_denial {
            resp.extensions_mut().insert(DeniedInHandler);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"godel\""),
            );
        }
        let wait = self.retry_after_s.or(matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        )
        .then_some(1));
        if let Some(secs) = wait {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
