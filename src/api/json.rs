//! Extractors whose errors follow the API's error shape. A JSON body: 413
//! over the body limit, 400 naming the offending field for unknown fields,
//! bad enum values and wrong types. Query-string parameters: 400 naming the
//! offending parameter.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body of type `T`.
pub struct Body<T>(pub T);

/// The deepest nesting a JSON body may have, as the server puts it in each
/// request (`api.max_json_depth`); [`DEFAULT_MAX_DEPTH`] without it.
#[derive(Clone, Copy, Debug)]
pub struct MaxJsonDepth(pub usize);

/// The nesting limit when the server set none.
pub const DEFAULT_MAX_DEPTH: usize = 32;

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let depth = req
            .extensions()
            .get::<MaxJsonDepth>()
            .map_or(DEFAULT_MAX_DEPTH, |d| d.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!("request body is over the limit: {e}"))
            } else if timed_out(&e) {
                ApiError::request_timeout("the request body was not received in time")
            } else {
                ApiError::invalid(format!("cannot read request body: {e}"))
            }
        })?;
        check_depth(&bytes, depth)?;
        check_object(&bytes)?;
        parse(&bytes).map(Body)
    }
}

/// Whether reading the body failed on the server's body deadline.
fn timed_out(e: &axum::extract::rejection::BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<super::serve::BodyTimedOut>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Refuses a body that is not a JSON object (an empty one is `{}`): every
/// request body is an object, and serde would otherwise read an array as
/// a struct's fields in declaration order (`[null, 5]`).
pub fn check_object(bytes: &[u8]) -> Result<(), ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None | Some(b'{') => Ok(()),
        Some(_) => Err(ApiError::invalid(
            "invalid JSON body: expected a JSON object",
        )),
    }
}

/// Refuses JSON nested deeper than `max` arrays and objects, by a scan
/// that skips strings (cheaper than parsing, and with a clear message).
pub fn check_depth(bytes: &[u8], max: usize) -> Result<(), ApiError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ApiError::invalid(format!(
                        "invalid JSON body: nested deeper than {max} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Most integral floats (`93.0`) one body may have read as integers.
const MAX_INTEGRAL_FLOATS: usize = 64;

/// Parses JSON, naming the path of the first bad field in the error. A
/// number with a zero fraction (`93.0`) where an integer is expected is
/// that integer: JSON, and the JSON Schema the API document uses, do not
/// tell `93.0` from `93`, and clients that hold every number as a float
/// write it so.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    // The plain parse is the fast path; only a body it refuses is parsed
    // again with path tracking, for the error message.
    if let Ok(t) = serde_json::from_slice(bytes) {
        return Ok(t);
    }
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Err(path_error::<T>(bytes));
    };
    for _ in 0..MAX_INTEGRAL_FLOATS {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if !integral_float_at(&mut value, err.path()) {
            break;
        }
    }
    Err(path_error::<T>(bytes))
}

/// The error of parsing `bytes` as `T`, naming the offending field.
fn path_error<T: DeserializeOwned>(bytes: &[u8]) -> ApiError {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(_) => ApiError::invalid("invalid JSON body"),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                ApiError::invalid(format!("invalid JSON body: {inner}"))
            } else {
                ApiError::invalid(format!("invalid field `{path}`: {inner}"))
            }
        }
    }
}

/// If the value at `path` is a float with a zero fraction that fits an
/// integer, makes it that integer; whether it did.
fn integral_float_at(value: &mut serde_json::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let mut at = value;
    for seg in path.iter() {
        let next = match (seg, at) {
            (Segment::Seq { index }, serde_json::Value::Array(items)) => items.get_mut(*index),
            (Segment::Map { key }, serde_json::Value::Object(map)) => map.get_mut(key),
            _ => None,
        };
        let Some(next) = next else { return false };
        at = next;
    }
    let Some(f) = at.as_f64().filter(|f| at.is_f64() && f.fract() == 0.0) else {
        return false;
    };
    // `u64::MAX as f64` is 2^64, one past the largest u64: the bound is
    // strict, or 2^64 and above would saturate to u64::MAX.
    let int = if f >= 0.0 && f < u64::MAX as f64 {
        serde_json::Number::from(f as u64)
    } else if f < 0.0 && f >= i64::MIN as f64 {
        serde_json::Number::from(f as i64)
    } else {
        return false;
    };
    *at = serde_json::Value::Number(int);
    true
}

/// Query-string parameters of type `T`: axum's `Query`, with its rejection
/// (which names the parameter) in the API's error shape.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::try_from_uri(&parts.uri)
            .map(|Query(t)| Params(t))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ints {
        n: u32,
        list: Vec<u64>,
        raw: Option<serde_json::Value>,
    }

    #[test]
    fn integral_floats_are_integers_and_other_values_stay_as_sent() {
        let t: Ints = parse(br#"{"n": 93.0, "list": [1, 2.0, 3e2], "raw": {"x": 1.0}}"#).unwrap();
        assert_eq!((t.n, t.list), (93, vec![1, 2, 300]));
        assert_eq!(t.raw.unwrap().to_string(), r#"{"x":1.0}"#);
        let e = parse::<Ints>(br#"{"n": 93.5, "list": []}"#).unwrap_err();
        assert!(e.message.contains("invalid field `n`"), "{}", e.message);
        let e = parse::<Ints>(br#"{"n": 1, "list": [18446744073709551616]}"#).unwrap_err();
        assert!(
            e.message.contains("invalid field `list[0]`"),
            "{}",
            e.message
        );
        let e = parse::<Ints>(br#"{"n": -1.0, "list": []}"#).unwrap_err();
        assert!(e.message.contains("invalid field `n`"), "{}", e.message);
        let e = parse::<Ints>(br#"{"n": 1, "list": [], "extra": 1}"#).unwrap_err();
        assert!(e.message.contains("extra"), "{}", e.message);
    }

    #[test]
    fn only_objects_are_bodies() {
        assert!(check_object(b"").is_ok() && check_object(b" {}").is_ok());
        for bad in [&b"[null, 1]"[..], b"null", b"1", b"\"x\""] {
            let e = check_object(bad).unwrap_err();
            assert!(
                e.message.contains("expected a JSON object"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn depth_counts_structure_not_strings() {
        assert!(check_depth(br#"{"a":[{"b":1}]}"#, 3).is_ok());
        assert!(check_depth(br#"{"a":[{"b":1}]}"#, 2).is_err());
        assert!(check_depth(br#"{"a":"[[[[[[\"{{{{"}"#, 1).is_ok());
        let deep = "[".repeat(100) + &"]".repeat(100);
        let e = check_depth(deep.as_bytes(), 32).unwrap_err();
        assert!(e.message.contains("deeper than 32"), "{}", e.message);
    }
}
