//! Framing: a `u32` big-endian payload length, then the payload.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes reserved up front for a frame's payload; a longer payload grows its
/// buffer as its bytes arrive, so a claimed length is never allocated blind.
const INITIAL_READ_CAPACITY_BYTES: usize = 64 * 1024;
/// Payloads up to this many bytes are copied behind their header and sent in
/// one write (one segment with `TCP_NODELAY`); longer ones take two writes.
const COALESCE_MAX_BYTES: usize = 16 * 1024;
/// Size of the length prefix, in bytes.
const HEADER_BYTES: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug)]
pub(super) enum FrameError {
    /// The peer closed the connection (between or within frames).
    Eof,
    /// The frame's length is over the limit; nothing was allocated for it.
    TooLarge {
        /// Claimed or actual length, in bytes.
        len: u64,
        /// The limit, in bytes.
        max: u32,
    },
    /// Any other I/O error.
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Eof,
            _ => Self::Io(error),
        }
    }
}

/// Reads one frame of at most `max` payload bytes.
pub(super) async fn read_frame<R>(reader: &mut R, max: u32) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_BYTES];
    reader.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header);
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    let expected = u64::from(len);
    let mut payload = Vec::with_capacity(INITIAL_READ_CAPACITY_BYTES.min(len as usize));
    let read = (&mut *reader)
        .take(expected)
        .read_to_end(&mut payload)
        .await?;
    if read as u64 != expected {
        return Err(FrameError::Eof);
    }
    Ok(payload)
}

/// Writes `payload` as one frame, refusing it if it is longer than `max`.
pub(super) async fn write_frame<W>(
    writer: &mut W,
    payload: &[u8],
    max: u32,
) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
{
    let too_large = || FrameError::TooLarge {
        len: payload.len() as u64,
        max,
    };
    let len = u32::try_from(payload.len()).map_err(|_| too_large())?;
    if len > max {
        return Err(too_large());
    }
    let header = len.to_be_bytes();
    if payload.len() <= COALESCE_MAX_BYTES {
        let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(payload);
        writer.write_all(&frame).await?;
    } else {
        writer.write_all(&header).await?;
        writer.write_all(payload).await?;
    }
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_small_and_large() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let large = vec![7u8; COALESCE_MAX_BYTES * 3 + 1];
        let sent = large.clone();
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"hi", 1 << 20).await.unwrap();
            write_frame(&mut a, &[], 1 << 20).await.unwrap();
            write_frame(&mut a, &sent, 1 << 20).await.unwrap();
        });
        assert_eq!(read_frame(&mut b, 1 << 20).await.unwrap(), b"hi");
        assert!(read_frame(&mut b, 1 << 20).await.unwrap().is_empty());
        assert_eq!(read_frame(&mut b, 1 << 20).await.unwrap(), large);
        writer.await.unwrap();
        assert!(matches!(read_frame(&mut b, 10).await, Err(FrameError::Eof)));
    }

    #[tokio::test]
    async fn oversize_is_rejected_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // claims 4 GiB - 1 and sends nothing more
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame(&mut b, 1024).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max: 1024 } if len == u64::from(u32::MAX))
        );
        let err = write_frame(&mut a, &[0u8; 11], 10).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 11, max: 10 }));
    }

    #[tokio::test]
    async fn truncated_payload_is_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b, 1024).await,
            Err(FrameError::Eof)
        ));
    }
}
