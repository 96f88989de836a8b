//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>):
//! the trace a task belongs to, carried from the request that submitted it
//! through the Raft entry into the task record, and from there into every
//! attempt's gateway call (the `http` driver's `traceparent` header, the
//! OpenClaw request's) and the attempt's log lines.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A trace id and the span within it; `sampled` is the header's flag.
/// Kept as bytes (alignment 1, 26 bytes encoded) because it rides in every
/// task record and in the Raft entry of every traced submission.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    trace_id: [u8; 16],
    /// 8 bytes, never zero.
    span_id: [u8; 8],
    /// The `sampled` trace flag.
    sampled: bool,
}

impl TraceContext {
    /// Parses a `traceparent` header: `00-<32 hex>-<16 hex>-<2 hex>`, or a
    /// later version's first four fields (as the spec asks). `None` when it
    /// is malformed, version `ff`, or either id is all zeros; the caller
    /// then starts a new trace.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let extra = parts.next();
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2) || version == "ff" || (version == "00" && extra.is_some()) {
            return None;
        }
        if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0)
            .then(|| TraceContext::new(trace_id, span_id, flags & 1 == 1))
    }

    fn new(trace_id: u128, span_id: u64, sampled: bool) -> TraceContext {
        TraceContext {
            trace_id: trace_id.to_be_bytes(),
            span_id: span_id.to_be_bytes(),
            sampled,
        }
    }

    /// A new trace, sampled.
    pub fn random() -> TraceContext {
        TraceContext::new(rand::random::<u128>() | 1, rand::random::<u64>() | 1, true)
    }

    /// The trace of task `task_id` submitted at `created_ms` without one: a
    /// function of the two, so every node and every attempt derive the same
    /// trace, and a submission without a `traceparent` costs no bytes in
    /// the log or the state.
    pub fn derived(task_id: u64, created_ms: u64) -> TraceContext {
        let mix = |mut z: u64| {
            // splitmix64's finalizer.
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let hi = mix(task_id ^ 0x9e37_79b9_7f4a_7c15);
        let lo = mix(created_ms.rotate_left(17) ^ hi);
        let span = mix(hi ^ lo) | 1;
        TraceContext::new((u128::from(hi) << 64 | u128::from(lo)) | 1, span, true)
    }

    /// A new span in the same trace (one attempt, one gateway call).
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: (rand::random::<u64>() | 1).to_be_bytes(),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_hex(&self) -> String {
        String::from_utf8_lossy(&self.trace_hex_bytes()).into_owned()
    }

    /// The trace id as 32 lowercase hex digits, without allocating.
    pub fn trace_hex_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex_into(&self.trace_id, &mut out);
        out
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_hex(&self) -> String {
        format!("{:016x}", u64::from_be_bytes(self.span_id))
    }

    /// A context from its parts (ids as big-endian bytes).
    pub fn from_parts(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> TraceContext {
        TraceContext {
            trace_id,
            span_id,
            sampled,
        }
    }

    /// The trace id's bytes.
    pub fn trace_bytes(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The span id's bytes.
    pub fn span_bytes(&self) -> [u8; 8] {
        self.span_id
    }

    /// The `sampled` flag.
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    /// The trace id as hex for a log field, without allocating.
    pub fn trace_field(&self) -> impl fmt::Display + '_ {
        Hex(&self.trace_id)
    }

    /// The span id as hex for a log field, without allocating.
    pub fn span_field(&self) -> impl fmt::Display + '_ {
        Hex(&self.span_id)
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        self.to_string()
    }
}

/// Bytes as lowercase hex.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 32];
        let n = hex_into(self.0, &mut out);
        // ASCII hex digits: always UTF-8.
        f.write_str(std::str::from_utf8(&out[..n]).map_err(|_| fmt::Error)?)
    }
}

/// Writes `bytes` as lowercase hex into `out` (as many as fit); returns
/// the digits written.
fn hex_into(bytes: &[u8], out: &mut [u8]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = 0;
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
        n += 2;
    }
    n
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = if self.sampled { "01" } else { "00" };
        write!(
            f,
            "00-{}-{}-{flags}",
            Hex(&self.trace_id),
            Hex(&self.span_id)
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_round_trips() {
        let t = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(t.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_hex(), "00f067aa0ba902b7");
        assert!(t.sampled);
        assert_eq!(t.header(), EXAMPLE);
        let child = t.child();
        assert_eq!(child.trace_hex(), t.trace_hex());
        assert_ne!(child.span_hex(), t.span_hex());
    }

    #[test]
    fn a_derived_trace_is_a_valid_function_of_the_task() {
        let a = TraceContext::derived(7, 1_800_000_000_000);
        assert_eq!(a, TraceContext::derived(7, 1_800_000_000_000));
        assert_ne!(
            a.trace_hex(),
            TraceContext::derived(8, 1_800_000_000_000).trace_hex()
        );
        assert_ne!(
            a.trace_hex(),
            TraceContext::derived(7, 1_800_000_000_001).trace_hex()
        );
        assert_eq!(TraceContext::parse(&a.header()), Some(a));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A later version may add fields after the first four.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        let t = TraceContext::parse(later).unwrap();
        assert!(!t.sampled);
    }
}
