//! The gateway's frames, parsed leniently: unknown fields, frame types,
//! event names and streams are accepted and ignored (the gateway sends
//! fields its published schema does not list, PROTOCOL.md 5.5).

use serde_json::{Map, Value};

/// One frame from the gateway.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A response to one of our requests (the `agent` method sends two).
    Res(Res),
    /// An event.
    Event(Event),
    /// Valid JSON of a kind we do not use (`req` from the server, new types).
    Other,
}

/// A `res` frame.
#[derive(Clone, Debug)]
pub(crate) struct Res {
    pub id: String,
    /// The payload of an `ok` response (`Null` when absent).
    pub payload: Value,
    /// The error of a failed response.
    pub error: Option<GwError>,
}

/// An `event` frame.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub event: String,
    pub payload: Value,
}

/// The gateway's error object: `{code, message, details{code}, retryable, retryAfterMs}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GwError {
    pub code: String,
    pub message: String,
    /// `details.code`, which is more specific (`AUTH_TOKEN_MISMATCH`).
    pub detail: Option<String>,
    pub retryable: bool,
    pub retry_after_ms: Option<u64>,
}

impl std::fmt::Display for GwError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "/{d}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl GwError {
    /// The gateway cannot take this now but will (`UNAVAILABLE`, or any
    /// error it marks retryable): try again after `retry_after_ms`.
    pub(crate) fn is_not_ready(&self) -> bool {
        self.retryable || self.code == "UNAVAILABLE"
    }

    fn from_value(v: &Value) -> GwError {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        GwError {
            code: s("code").unwrap_or_else(|| "UNKNOWN".into()),
            message: s("message").unwrap_or_default(),
            detail: v
                .get("details")
                .and_then(|d| d.get("code"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            retryable: v.get("retryable").and_then(Value::as_bool) == Some(true),
            retry_after_ms: v.get("retryAfterMs").and_then(Value::as_u64),
        }
    }
}

/// Parses one text frame; `None` when it is not a JSON object with a
/// `type` (the caller logs and skips it).
pub(crate) fn parse(text: &str) -> Option<Frame> {
    let v: Map<String, Value> = serde_json::from_str(text).ok()?;
    let str_of = |k: &str| v.get(k).and_then(Value::as_str);
    match str_of("type")? {
        "res" => {
            let id = str_of("id")?.to_owned();
            let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
            let error = (!ok).then(|| {
                v.get("error")
                    .map(GwError::from_value)
                    .unwrap_or_else(|| GwError {
                        code: "UNKNOWN".into(),
                        message: "response not ok, without an error".into(),
                        detail: None,
                        retryable: false,
                        retry_after_ms: None,
                    })
            });
            Some(Frame::Res(Res {
                id,
                payload: v.get("payload").cloned().unwrap_or(Value::Null),
                error,
            }))
        }
        "event" => Some(Frame::Event(Event {
            event: str_of("event")?.to_owned(),
            payload: v.get("payload").cloned().unwrap_or(Value::Null),
        })),
        _ => Some(Frame::Other),
    }
}

/// A string field of a JSON object.
pub(crate) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_types_and_garbage_are_tolerated() {
        let f =
            parse(r#"{"type":"res","id":"7","ok":true,"payload":{"runId":"r","x":[1]},"extra":1}"#);
        assert!(matches!(f, Some(Frame::Res(Res { ref id, error: None, .. })) if id == "7"));
        let f = parse(
            r#"{"type":"event","event":"brand.new","payload":{"a":1},"seq":3,"stateVersion":{}}"#,
        );
        assert!(matches!(f, Some(Frame::Event(Event { ref event, .. })) if event == "brand.new"));
        assert!(matches!(parse(r#"{"type":"hello"}"#), Some(Frame::Other)));
        assert!(parse("not json").is_none());
        assert!(parse("[1,2]").is_none());
        assert!(parse(r#"{"type":"res"}"#).is_none(), "a res without id");
    }

    #[test]
    fn errors_keep_code_detail_and_retry_hint() {
        let f = parse(
            r#"{"type":"res","id":"1","ok":false,"error":{"code":"UNAVAILABLE","message":"gateway starting; retry shortly","retryable":true,"retryAfterMs":500,"details":{"reason":"startup-sidecars"}}}"#,
        );
        let Some(Frame::Res(r)) = f else { panic!() };
        let e = r.error.unwrap();
        assert!(e.is_not_ready());
        assert_eq!(e.retry_after_ms, Some(500));
        let f = parse(
            r#"{"type":"res","id":"1","ok":false,"error":{"code":"INVALID_REQUEST","message":"unauthorized: gateway token mismatch","details":{"code":"AUTH_TOKEN_MISMATCH"}}}"#,
        );
        let Some(Frame::Res(r)) = f else { panic!() };
        let e = r.error.unwrap();
        assert!(!e.is_not_ready());
        assert_eq!(
            e.to_string(),
            "INVALID_REQUEST/AUTH_TOKEN_MISMATCH: unauthorized: gateway token mismatch"
        );
    }
}
