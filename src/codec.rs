//! The one binary encoding for everything persisted or sent between nodes.
//!
//! bincode 2 (`standard()` config: little-endian varints) inside a one-byte
//! version envelope. bincode has no schema evolution, so any change to a
//! persisted or wire type that is not an appended enum variant must bump
//! [`VERSION`] and keep a decoder for the old one. Decoding always runs with an
//! allocation limit so a corrupt or hostile length prefix cannot exhaust
//! memory. Swapping the format (say, to postcard) touches this file only.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The envelope version written by this build.
///
/// 2: sessions belong to a tenant, and the state holds API keys, tenant
/// records and the audit chain.
/// 3: the state holds the queue shards' routing epochs and each session's
/// unfinished tasks (adding shards, `docs/shards.md`), with the shard
/// fields added since version 2 was set.
/// 4: tasks' dependencies, approvals and kill switches.
/// 5: a shard growth's recorded voters, and the revisions of the weights
/// and kill switches every queue shard keeps a copy of.
/// 6: the usage ledger and budget alerts, each task's usage, the gateway
/// a lease ran on, and tenant budgets.
/// 7: durable sessions (turns, tokens, checkpoints, pause and migration).
/// 8: when a gateway turned unhealthy.
/// 9: kill switches by gateway kind, model and share of tasks; a
/// gateway's model; feature flags; agents' own breaker and silence, and
/// the tools and prompt their role gives them; managed gateways' process.
/// 10: the index of finished tasks by when they finished, and the
/// command that purges them (retention).
/// 11: the idempotency index by hash (the colliding keys in full).
/// 12: the index of dead letters by when they were dead-lettered, and
/// the purge's bound for them.
/// 13: a task's rarely set fields and its attempts' outcome each in a box
/// of their own ([`crate::fsm::TaskExtras`], [`crate::fsm::TaskOutcome`]).
/// Godel has no release that wrote earlier data to keep: an older data
/// directory or backup is refused with [`CodecError::Version`] rather than
/// misread (start it afresh).
pub const VERSION: u8 = 14;

/// Largest value decoded, in bytes (bounds allocation on bad input).
/// bincode counts what a decode allocates, every integer at its size in
/// memory, over the whole value.
pub const MAX_DECODE_BYTES: usize = 512 * 1024 * 1024;

/// Largest state machine decoded ([`decode_state`]): a snapshot or a
/// backup holds the whole state, which grows with the queue past
/// [`MAX_DECODE_BYTES`] (at about a million tasks with small payloads).
/// It still bounds what a corrupt length may ask for.
pub const MAX_STATE_DECODE_BYTES: usize = 64 * 1024 * 1024 * 1024;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Empty input: no envelope.
    #[error("empty input")]
    Empty,
    /// Written by a build this one cannot read.
    #[error("unsupported encoding version {0} (this build reads {VERSION})")]
    Version(u8),
    /// The bytes are not a valid value.
    #[error("undecodable: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The value could not be encoded.
    #[error("unencodable: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// [`config`] with the state's bound: the same encoding.
fn state_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_STATE_DECODE_BYTES>()
}

/// Encodes `value` with the version envelope.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, config())?;
    Ok(out)
}

/// [`encode`], written to `out` as it is produced rather than collected:
/// the same bytes, for values too large to hold twice (backups stream a
/// whole state through it). `out` sees many small writes; buffer it.
pub fn encode_to_writer<T: Serialize + ?Sized>(
    value: &T,
    out: &mut impl std::io::Write,
) -> Result<(), CodecError> {
    out.write_all(&[VERSION])
        .map_err(|e| CodecError::Encode(bincode::error::EncodeError::Io { inner: e, index: 0 }))?;
    bincode::serde::encode_into_std_write(value, out, config())?;
    Ok(())
}

/// The bytes [`encode`] would produce for `value`, counted without keeping
/// them (0 for a value that cannot be encoded, which encoding it reports).
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match encode_to_writer(value, &mut count) {
        Ok(()) => count.0,
        Err(_) => 0,
    }
}

/// Decodes one value written by [`encode`] from `input`, reading no further
/// than its last byte (what follows is the caller's to check). `input` sees
/// many small reads; buffer it.
pub fn decode_from_reader<T: DeserializeOwned>(
    input: &mut impl std::io::Read,
) -> Result<T, CodecError> {
    read_with(input, config())
}

/// [`decode_from_reader`] for a whole state machine (a backup's copy),
/// bounded by [`MAX_STATE_DECODE_BYTES`].
pub fn decode_state_from_reader<T: DeserializeOwned>(
    input: &mut impl std::io::Read,
) -> Result<T, CodecError> {
    read_with(input, state_config())
}

fn read_with<T: DeserializeOwned>(
    input: &mut impl std::io::Read,
    config: impl bincode::config::Config,
) -> Result<T, CodecError> {
    let mut version = [0u8; 1];
    match input.read_exact(&mut version) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(CodecError::Empty),
        Err(e) => {
            return Err(CodecError::Decode(bincode::error::DecodeError::Io {
                inner: e,
                additional: 1,
            }));
        }
    }
    if version[0] != VERSION {
        return Err(CodecError::Version(version[0]));
    }
    Ok(bincode::serde::decode_from_std_read(input, config)?)
}

/// Decodes a value written by [`encode`]; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_with(bytes, config())
}

/// [`decode`] for a whole state machine (a snapshot), bounded by
/// [`MAX_STATE_DECODE_BYTES`].
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_with(bytes, state_config())
}

fn decode_with<T: DeserializeOwned>(
    bytes: &[u8],
    config: impl bincode::config::Config,
) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != VERSION {
        return Err(CodecError::Version(version));
    }
    let (value, read) = bincode::serde::decode_from_slice(body, config)?;
    if read != body.len() {
        return Err(CodecError::Decode(
            bincode::error::DecodeError::OtherString(format!(
                "{} trailing bytes",
                body.len() - read
            )),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state bigger than the general bound decodes as a state (a
    /// snapshot of a deep queue), and only as one.
    #[test]
    fn a_state_may_pass_the_general_bound() {
        let big = "x".repeat(MAX_DECODE_BYTES + 1024);
        let bytes = encode(&big).unwrap();
        assert!(matches!(
            decode::<String>(&bytes),
            Err(CodecError::Decode(
                bincode::error::DecodeError::LimitExceeded
            ))
        ));
        assert_eq!(decode_state::<String>(&bytes).unwrap().len(), big.len());
        let read: String = decode_state_from_reader(&mut &bytes[..]).unwrap();
        assert_eq!(read.len(), big.len());
    }

    #[test]
    fn round_trip_and_rejects_garbage() {
        let v = (42u64, String::from("x"), vec![1u8, 2, 3]);
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), v);
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<u64>(&[VERSION + 1, 1]),
            Err(CodecError::Version(v)) if v == VERSION + 1
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode::<(u64, String, Vec<u8>)>(&long).is_err());
        // the streaming pair writes and reads the same bytes
        let mut streamed = Vec::new();
        encode_to_writer(&v, &mut streamed).unwrap();
        assert_eq!(streamed, bytes);
        let mut long_reader = &long[..];
        let back: (u64, String, Vec<u8>) = decode_from_reader(&mut long_reader).unwrap();
        assert_eq!((back, long_reader), (v, &[0u8][..]));
        assert!(matches!(
            decode_from_reader::<u64>(&mut &[][..]),
            Err(CodecError::Empty)
        ));
        // a huge length prefix must fail, not allocate
        assert!(
            decode::<Vec<u8>>(&[
                VERSION, 0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F
            ])
            .is_err()
        );
    }
}
