//! The backup file format (see the module essay of `backup`): a [`Writer`]
//! that frames and checksums as it writes, and a [`Reader`] that checks
//! every frame and checksum as it reads. Both stream: neither holds more
//! than one chunk.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use openraft::{LogId, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{BackupError, Result};
use crate::raft::{NodeId, NodeInfo};

/// The first bytes of every backup.
pub(super) const MAGIC: [u8; 8] = *b"GODELBAK";
/// The format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Opens a section.
const SECTION_TAG: [u8; 4] = *b"SECT";
/// Opens the trailer.
const TRAILER_TAG: [u8; 4] = *b"DONE";
/// Bytes of a SHA-256.
const HASH_LEN: usize = 32;

/// Largest header or section metadata (JSON), in bytes.
pub const MAX_META_BYTES: usize = 1024 * 1024;
/// Largest chunk of state bytes a reader accepts.
pub const MAX_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Most sections (groups) in one backup.
pub const MAX_GROUPS: usize = 1024;
/// The chunk size the writer cuts state bytes into.
pub(super) const CHUNK_BYTES: usize = 256 * 1024;

/// The header: what the backup is and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`FORMAT`].
    pub format: u32,
    /// When it was made, ms since the epoch (the making node's clock).
    pub created_at_ms: u64,
    /// The same, RFC 3339.
    pub created_at: String,
    /// The Godel version that made it.
    pub godel_version: String,
    /// The version of the state bytes' encoding (`crate::codec::VERSION`).
    pub codec_version: u8,
    /// The cluster it was taken from.
    pub cluster: ClusterInfo,
    /// The groups, in the order of their sections.
    pub groups: Vec<GroupRef>,
}

/// The cluster a backup was taken from, as the node that made it saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// `api` (a running cluster) or `offline` (a stopped node's store).
    pub source: String,
    /// The node that made it, when known.
    pub node: Option<NodeId>,
    /// The leader it knew.
    pub leader: Option<NodeId>,
    /// The term it knew.
    pub term: Option<u64>,
    /// The Raft members it knew, with their addresses.
    pub members: BTreeMap<NodeId, NodeInfo>,
}

/// A group as the header lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRef {
    /// Its id (0: the meta group).
    pub id: u32,
    /// Its name.
    pub name: String,
}

/// A section's metadata: which group, at which point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionMeta {
    /// The group's id.
    pub group: u32,
    /// The group's name.
    pub name: String,
    /// The last log id applied to the state the section holds.
    pub applied: LogId<NodeId>,
    /// The group's Raft membership as of that log id.
    pub membership: StoredMembership<NodeId, NodeInfo>,
    /// What the state holds, for people and for checks after a restore.
    pub summary: GroupSummary,
}

/// A summary of a group's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// Tasks (every status).
    pub tasks: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Registered gateways.
    pub gateways: u64,
    /// Registered agents.
    pub agents: u64,
    /// The last event seq handed out.
    pub last_event_seq: u64,
    /// The audit chain's newest seq (0: none).
    pub audit_last_seq: u64,
    /// The audit chain's head hash, hex.
    pub audit_head: String,
}

/// Writes a backup to `W`: the header at [`Writer::start`], a section per
/// [`Writer::section`], the trailer at [`Writer::finish`].
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    /// Every byte written so far.
    file: Sha256,
    written: u64,
    sections: u32,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    pub fn start(out: W, header: &Header) -> Result<Self> {
        let json = meta_json(header, "the header")?;
        let mut w = Writer {
            out,
            file: Sha256::new(),
            written: 0,
            sections: 0,
        };
        w.put(&MAGIC)?;
        w.put(&FORMAT.to_le_bytes())?;
        w.put(&len32(&json).to_le_bytes())?;
        w.put(&json)?;
        let hash: [u8; HASH_LEN] = w.file.clone().finalize().into();
        w.put(&hash)?;
        Ok(w)
    }

    /// Writes one section: `meta`, then the state bytes `body` writes, cut
    /// into chunks as they come.
    pub fn section(
        &mut self,
        meta: &SectionMeta,
        body: impl FnOnce(&mut SectionWriter<'_, W>) -> Result<()>,
    ) -> Result<()> {
        if self.sections as usize >= MAX_GROUPS {
            return Err(BackupError::Malformed(format!(
                "more than {MAX_GROUPS} sections"
            )));
        }
        let json = meta_json(meta, "a section's metadata")?;
        let mut s = SectionWriter {
            w: self,
            hash: Sha256::new(),
            buf: Vec::with_capacity(CHUNK_BYTES),
            failed: None,
        };
        s.put(&SECTION_TAG)?;
        s.put(&len32(&json).to_le_bytes())?;
        s.put(&json)?;
        let written = body(&mut s);
        // The output's own error (a closed stream, a full disk) rather than
        // the encoder's report of it.
        if let Some(e) = s.failed.take() {
            return Err(e);
        }
        written?;
        s.emit_chunk()?;
        s.put(&0u32.to_le_bytes())?;
        let hash: [u8; HASH_LEN] = s.hash.finalize().into();
        self.put(&hash)?;
        self.sections += 1;
        Ok(())
    }

    /// Writes the trailer and flushes; returns the output, the file's
    /// SHA-256 and its length.
    pub fn finish(mut self) -> Result<(W, [u8; HASH_LEN], u64)> {
        self.put(&TRAILER_TAG)?;
        self.put(&self.sections.to_le_bytes())?;
        let hash: [u8; HASH_LEN] = self.file.clone().finalize().into();
        self.put(&hash)?;
        self.out
            .flush()
            .map_err(|e| BackupError::from_io(e, "writing the backup"))?;
        Ok((self.out, hash, self.written))
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| BackupError::from_io(e, "writing the backup"))?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// The state bytes of one section, as `std::io::Write`: buffered into
/// chunks of `CHUNK_BYTES` (256 KiB).
#[derive(Debug)]
pub struct SectionWriter<'a, W: Write> {
    w: &'a mut Writer<W>,
    /// The section's bytes so far.
    hash: Sha256,
    buf: Vec<u8>,
    /// The first error writing a chunk out.
    failed: Option<BackupError>,
}

impl<W: Write> SectionWriter<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.hash.update(bytes);
        self.w.put(bytes)
    }

    fn emit_chunk(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.put(&len32(&chunk).to_le_bytes())?;
        self.put(&chunk)
    }
}

impl<W: Write> Write for SectionWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES
            && let Err(e) = self.emit_chunk()
        {
            let io = std::io::Error::other(e.to_string());
            self.failed = Some(e);
            return Err(io);
        }
        Ok(n)
    }

    /// Chunks are cut by size only; the section's end writes the rest.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn meta_json<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(value)
        .map_err(|e| BackupError::Malformed(format!("{what} does not serialize: {e}")))?;
    if json.len() > MAX_META_BYTES {
        return Err(BackupError::Malformed(format!(
            "{what} is {} bytes, over {MAX_META_BYTES}",
            json.len()
        )));
    }
    Ok(json)
}

/// A length that fits a frame's `u32` (every frame is bounded far below).
fn len32(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).expect("invariant: frames are bounded far below 4 GiB")
}

/// Reads a backup from `R`, checking each frame and checksum as it goes:
/// [`Reader::open`] reads the header, [`Reader::next_section`] each
/// section, and, after the last, the trailer (`None` means the whole file
/// verified and nothing follows it).
#[derive(Debug)]
pub struct Reader<R: Read> {
    inner: R,
    /// Every byte read so far.
    file: Sha256,
    /// The current section's bytes so far, while in one.
    section: Option<Sha256>,
    at: u64,
    header: Header,
    sections: u32,
    /// What is being read, for errors.
    part: String,
    body: Option<BodyState>,
    /// The file's SHA-256, once the trailer verified.
    digest: Option<[u8; HASH_LEN]>,
    ended: bool,
}

/// Where a section's state bytes are being read.
#[derive(Debug)]
struct BodyState {
    left_in_chunk: usize,
    chunks: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn open(inner: R) -> Result<Self> {
        let mut r = Reader {
            inner,
            file: Sha256::new(),
            section: None,
            at: 0,
            header: Header {
                format: FORMAT,
                created_at_ms: 0,
                created_at: String::new(),
                godel_version: String::new(),
                codec_version: 0,
                cluster: ClusterInfo::default(),
                groups: Vec::new(),
            },
            sections: 0,
            part: "the header".into(),
            body: None,
            digest: None,
            ended: false,
        };
        let mut magic = [0u8; 8];
        r.fill(&mut magic).map_err(|e| match e {
            BackupError::Truncated { .. } => BackupError::NotABackup,
            other => other,
        })?;
        if magic != MAGIC {
            return Err(BackupError::NotABackup);
        }
        let format = r.read_u32()?;
        if format != FORMAT {
            return Err(BackupError::Format(format));
        }
        let json = r.read_meta()?;
        r.check_hash("the header")?;
        r.header = serde_json::from_slice(&json)
            .map_err(|e| BackupError::Malformed(format!("the header: {e}")))?;
        if r.header.format != FORMAT {
            return Err(BackupError::Format(r.header.format));
        }
        if r.header.groups.is_empty() || r.header.groups.len() > MAX_GROUPS {
            return Err(BackupError::Malformed(format!(
                "the header lists {} groups (1 to {MAX_GROUPS})",
                r.header.groups.len()
            )));
        }
        Ok(r)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.at
    }

    /// The whole file's SHA-256 (the trailer's), once it verified.
    pub fn digest(&self) -> Option<[u8; HASH_LEN]> {
        self.digest
    }

    /// The next section's metadata and a reader of its state bytes; or,
    /// after the last one, `None` once the trailer verified and nothing
    /// follows it. A section whose bytes were not read to the end is read
    /// (and checked) to its end first.
    pub fn next_section(&mut self) -> Result<Option<(SectionMeta, SectionBody<'_, R>)>> {
        if self.ended {
            return Ok(None);
        }
        let mut scratch = [0u8; 8192];
        while self.body.as_ref().is_some_and(|b| !b.done) {
            self.read_body(&mut scratch)?;
        }
        self.body = None;
        let i = self.sections as usize;
        self.part = format!("what follows section {i}");
        let mut tag = [0u8; 4];
        self.fill(&mut tag)?;
        match tag {
            SECTION_TAG => self.open_section(i).map(Some),
            TRAILER_TAG => self.close().map(|()| None),
            other => Err(BackupError::Malformed(format!(
                "expected a section or the trailer at byte {}, found {other:02x?}",
                self.at - 4
            ))),
        }
    }

    fn open_section(&mut self, i: usize) -> Result<(SectionMeta, SectionBody<'_, R>)> {
        let Some(group) = self.header.groups.get(i).cloned() else {
            return Err(BackupError::Malformed(format!(
                "section {i} is past the {} groups the header lists",
                self.header.groups.len()
            )));
        };
        self.part = format!("section {i} (group {})", group.id);
        self.section = Some(Sha256::new_with_prefix(SECTION_TAG));
        let json = self.read_meta()?;
        let meta: SectionMeta = serde_json::from_slice(&json)
            .map_err(|e| BackupError::Malformed(format!("{}: {e}", self.part)))?;
        if meta.group != group.id {
            return Err(BackupError::Malformed(format!(
                "{} names group {}, the header's group {i} is {}",
                self.part, meta.group, group.id
            )));
        }
        self.body = Some(BodyState {
            left_in_chunk: 0,
            chunks: 0,
            done: false,
        });
        Ok((meta, SectionBody { reader: self }))
    }

    /// Reads the trailer; checks the count, the file's hash and that
    /// nothing follows.
    fn close(&mut self) -> Result<()> {
        self.part = "the trailer".into();
        let count = self.read_u32()?;
        let listed = self.header.groups.len();
        if count != self.sections || self.sections as usize != listed {
            return Err(BackupError::Malformed(format!(
                "the trailer counts {count} sections; the file has {} and the header lists {listed}",
                self.sections
            )));
        }
        let digest = self.file.clone().finalize().into();
        self.check_hash("the whole file")?;
        self.digest = Some(digest);
        let mut more = [0u8; 1];
        let extra = self
            .inner
            .read(&mut more)
            .map_err(|e| BackupError::from_io(e, "reading the backup"))?;
        if extra > 0 {
            return Err(BackupError::Malformed(format!(
                "bytes follow the trailer (at byte {})",
                self.at
            )));
        }
        self.ended = true;
        Ok(())
    }

    /// Reads state bytes of the current section into `out`: 0 at its end,
    /// once its checksum verified.
    fn read_body(&mut self, out: &mut [u8]) -> Result<usize> {
        let Some(body) = self.body.as_mut() else {
            return Ok(0);
        };
        if body.done || out.is_empty() {
            return Ok(0);
        }
        if body.left_in_chunk == 0 {
            let chunk = body.chunks;
            let n = self.read_u32()? as usize;
            if n == 0 {
                let what = self.part.clone();
                // The section's hash covers the end marker, not itself.
                let expected: [u8; HASH_LEN] = self
                    .section
                    .take()
                    .expect("invariant: a section hash while in a body")
                    .finalize()
                    .into();
                let mut found = [0u8; HASH_LEN];
                self.fill(&mut found)?;
                if found != expected {
                    return Err(BackupError::Checksum { what, at: self.at });
                }
                let body = self.body.as_mut().expect("invariant: checked above");
                body.done = true;
                self.sections += 1;
                return Ok(0);
            }
            if n > MAX_CHUNK_BYTES {
                return Err(BackupError::Malformed(format!(
                    "{} chunk {chunk} claims {n} bytes, over {MAX_CHUNK_BYTES}",
                    self.part
                )));
            }
            let body = self.body.as_mut().expect("invariant: checked above");
            body.left_in_chunk = n;
            body.chunks += 1;
        }
        let left = self.body.as_ref().map_or(0, |b| b.left_in_chunk);
        let n = left.min(out.len());
        self.fill(&mut out[..n])?;
        if let Some(b) = self.body.as_mut() {
            b.left_in_chunk -= n;
        }
        Ok(n)
    }

    /// Reads `buf.len()` bytes into the hashes.
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.inner.read_exact(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(BackupError::Truncated {
                    at: self.at,
                    within: self.part.clone(),
                });
            }
            Err(e) => return Err(BackupError::from_io(e, "reading the backup")),
        }
        self.file.update(&*buf);
        if let Some(s) = self.section.as_mut() {
            s.update(&*buf);
        }
        self.at += buf.len() as u64;
        Ok(())
    }

    fn read_u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A length-prefixed metadata frame, bounded by [`MAX_META_BYTES`].
    fn read_meta(&mut self) -> Result<Vec<u8>> {
        let n = self.read_u32()? as usize;
        if n > MAX_META_BYTES {
            return Err(BackupError::Malformed(format!(
                "{} claims {n} bytes of metadata, over {MAX_META_BYTES}",
                self.part
            )));
        }
        let mut json = vec![0u8; n];
        self.fill(&mut json)?;
        Ok(json)
    }

    /// Reads a stored SHA-256 and compares it with the file's bytes so far.
    fn check_hash(&mut self, what: &str) -> Result<()> {
        let expected: [u8; HASH_LEN] = self.file.clone().finalize().into();
        let mut found = [0u8; HASH_LEN];
        self.fill(&mut found)?;
        if found == expected {
            Ok(())
        } else {
            Err(BackupError::Checksum {
                what: what.to_owned(),
                at: self.at,
            })
        }
    }
}

/// A section's state bytes, as `std::io::Read`; its end (`Ok(0)`) comes
/// only after the section's checksum verified. Errors carry a
/// [`BackupError`] (take it out with `BackupError::from_io`).
#[derive(Debug)]
pub struct SectionBody<'a, R: Read> {
    reader: &'a mut Reader<R>,
}

impl<R: Read> Read for SectionBody<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read_body(out).map_err(BackupError::into_io)
    }
}

#[cfg(test)]
mod tests;
