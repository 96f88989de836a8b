//! Backups as files, with no node running: verify one ([`verify`]),
//! restore one into a fresh data directory ([`restore_into`]), copy a
//! stopped node's store into one ([`offline_backup`]), and write one safely
//! ([`PartialFile`]: a temporary file renamed into place only when whole).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use openraft::LogId;
use serde::Serialize;

use super::format::{ClusterInfo, GroupSummary, Header, Reader, SectionMeta};
use super::stream::{GroupCapture, hex, summary, write_backup};
use super::{BackupError, META_GROUP, Result};
use crate::codec;
use crate::raft::{NodeId, NodeInfo};
use crate::store::{self, Through};

/// Read buffer for backup files.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// What a verified backup holds.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    /// Its header.
    pub header: Header,
    /// Its sections, in order.
    pub sections: Vec<VerifiedSection>,
    /// Its length in bytes.
    pub bytes: u64,
    /// Its SHA-256 (the trailer's), hex.
    pub sha256: String,
}

/// One verified section.
#[derive(Clone, Debug, Serialize)]
pub struct VerifiedSection {
    /// Its metadata.
    pub meta: SectionMeta,
    /// Bytes of state it carries.
    pub state_bytes: u64,
}

/// Reads a whole backup from `input` and checks every frame and checksum
/// (the state bytes are read and dropped, never held). Blocking.
pub fn verify(input: impl Read) -> Result<Verified> {
    let mut reader = Reader::open(input)?;
    let mut sections = Vec::new();
    while let Some((meta, mut body)) = reader.next_section()? {
        let state_bytes = std::io::copy(&mut body, &mut std::io::sink())
            .map_err(|e| BackupError::from_io(e, "reading the backup"))?;
        sections.push(VerifiedSection { meta, state_bytes });
    }
    let digest = reader
        .digest()
        .expect("invariant: the trailer verified once next_section returns None");
    Ok(Verified {
        header: reader.header().clone(),
        sections,
        bytes: reader.position(),
        sha256: hex(&digest),
    })
}

/// [`verify`] of the file at `path`.
pub fn verify_file(path: &Path) -> Result<Verified> {
    verify(open(path)?)
}

/// [`verify_file`], then a second pass that decodes every group's state as
/// a restore would and checks it against its section (applied log id,
/// summary, no trailing bytes): a file that passes restores. Holds one
/// group's state at a time. Blocking.
pub fn verify_file_deep(path: &Path) -> Result<Verified> {
    let verified = verify_file(path)?;
    let expected: Vec<SectionMeta> = verified.sections.iter().map(|s| s.meta.clone()).collect();
    each_group(path, &expected, |_, _| Ok(()))?;
    Ok(verified)
}

fn open(path: &Path) -> Result<BufReader<File>> {
    let file = File::open(path).map_err(BackupError::io(format!("open {}", path.display())))?;
    Ok(BufReader::with_capacity(READ_BUFFER_BYTES, file))
}

/// A restore: which file, into which data directory, as which node.
#[derive(Clone, Debug)]
pub struct Restore {
    /// The backup.
    pub file: PathBuf,
    /// The new node's data directory: missing or empty.
    pub data_dir: PathBuf,
    /// The new node's id.
    pub node: NodeId,
    /// Its addresses and region (the new membership's only member).
    pub info: NodeInfo,
    /// Its `cluster.shards`: the backup must hold exactly the groups such
    /// a node hosts (the meta group, and shards `1..=N` when N > 1).
    pub shards: u32,
}

/// What a restore made.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// The data directory it created.
    pub data_dir: PathBuf,
    /// The node it is for.
    pub node: NodeId,
    /// The meta group (the first restored).
    pub group: u32,
    /// The log id the meta group's snapshot is at (the backup's).
    pub applied: LogId<NodeId>,
    /// What the restored meta state holds.
    pub summary: GroupSummary,
    /// Every group restored, with the log id its snapshot is at and what
    /// it holds (the meta group first).
    pub groups: Vec<(u32, LogId<NodeId>, GroupSummary)>,
    /// The backup's header.
    pub header: Header,
}

/// Restores the backup `r.file` into `r.data_dir` (missing or empty),
/// for node `r.node`. The whole file is verified first; the store is
/// built in a staging directory beside `r.data_dir` and renamed into place
/// when complete, so a failure leaves no data directory (and a refused
/// file creates nothing). Blocking.
pub fn restore_into(r: &Restore) -> Result<RestoreReport> {
    refuse_unless_empty(&r.data_dir)?;
    let verified = verify_file(&r.file)?;
    check_restorable(&verified, r.shards)?;
    let staging = Staging::create(&r.data_dir)?;
    let expected: Vec<SectionMeta> = verified.sections.iter().map(|s| s.meta.clone()).collect();
    let sections = read_groups(&r.file, &expected)?;
    let summaries: Vec<GroupSummary> = sections.iter().map(|(m, _)| m.summary.clone()).collect();
    let mut groups: Vec<(u32, store::Restored)> = sections
        .into_iter()
        .map(|(meta, restored)| (meta.group, restored))
        .collect();
    // The groups were copied one after another: the meta group's record of
    // the weights and kill switches wins over the shards' copies.
    if let [(_, meta), shards @ ..] = groups.as_mut_slice()
        && !shards.is_empty()
    {
        let copies: Vec<_> = shards.iter().map(|(_, r)| r.state().synced()).collect();
        meta.state_mut().restamp_after_restore(&copies);
    }
    let seeded = store::seed_groups(&staging.path.join("raft"), groups, r.node, r.info.clone())?;
    staging.commit(&r.data_dir)?;
    let groups: Vec<(u32, LogId<NodeId>, GroupSummary)> = seeded
        .into_iter()
        .zip(summaries)
        .map(|((group, seeded), summary)| (group, seeded.snapshot, summary))
        .collect();
    let (group, applied, summary) = groups[0].clone();
    Ok(RestoreReport {
        data_dir: r.data_dir.clone(),
        node: r.node,
        group,
        applied,
        summary,
        groups,
        header: verified.header,
    })
}

/// Whether this build can restore what `v` holds for a node with `shards`
/// queue shards: the meta group first, then shards `1..=N` when N > 1, in
/// this build's state encoding.
fn check_restorable(v: &Verified, shards: u32) -> Result<()> {
    let groups: Vec<u32> = v.header.groups.iter().map(|g| g.id).collect();
    let want: Vec<u32> = if shards > 1 {
        (0..=shards).collect()
    } else {
        vec![META_GROUP.0]
    };
    if groups != want {
        let theirs = if groups.len() > 1 {
            groups.len() - 1
        } else {
            1
        };
        return Err(BackupError::Refused(format!(
            "the backup holds groups {groups:?} (a cluster of {theirs} queue shards); a node with \
             cluster.shards = {shards} restores groups {want:?}: restore with cluster.shards = {theirs}"
        )));
    }
    if v.header.codec_version != codec::VERSION {
        return Err(BackupError::Refused(format!(
            "the backup's state is in encoding version {}; this build reads version {}",
            v.header.codec_version,
            codec::VERSION
        )));
    }
    Ok(())
}

/// Reads every section's state back (a second pass over the file, which
/// must still be what [`verify`] saw), all at once.
fn read_groups(
    file: &Path,
    expected: &[SectionMeta],
) -> Result<Vec<(SectionMeta, store::Restored)>> {
    let mut out = Vec::with_capacity(expected.len());
    each_group(file, expected, |meta, restored| {
        out.push((meta, restored));
        Ok(())
    })?;
    Ok(out)
}

/// Decodes each section's state in turn and hands it to `f`, after
/// checking it against its section: the same metadata as `expected`, no
/// bytes after the state, the applied log id and the summary it names.
fn each_group(
    file: &Path,
    expected: &[SectionMeta],
    mut f: impl FnMut(SectionMeta, store::Restored) -> Result<()>,
) -> Result<()> {
    let mut reader = Reader::open(open(file)?)?;
    for want in expected {
        let (meta, body) = reader
            .next_section()?
            .ok_or_else(|| BackupError::Malformed("a section is missing".into()))?;
        if meta != *want {
            return Err(BackupError::Refused(format!(
                "{} changed while it was being read",
                file.display()
            )));
        }
        let mut body = BufReader::with_capacity(READ_BUFFER_BYTES, body);
        let restored = store::Restored::read_payload(&mut body)?;
        let extra = std::io::copy(&mut body, &mut std::io::sink())
            .map_err(|e| BackupError::from_io(e, "reading the backup"))?;
        if extra > 0 {
            return Err(BackupError::Malformed(format!(
                "{extra} bytes follow the state in group {}'s section",
                meta.group
            )));
        }
        drop(body);
        if restored.last_applied() != Some(meta.applied) {
            return Err(BackupError::Malformed(format!(
                "group {}'s state is at {:?}, its section says {}",
                meta.group,
                restored.last_applied(),
                meta.applied
            )));
        }
        let found = summary(restored.state());
        if found != meta.summary {
            return Err(BackupError::Malformed(format!(
                "group {}'s state does not match its section's summary: {found:?} vs {:?}",
                meta.group, meta.summary
            )));
        }
        f(meta, restored)?;
    }
    if reader.next_section()?.is_some() {
        return Err(BackupError::Malformed(
            "more sections than the header names".into(),
        ));
    }
    Ok(())
}

/// Refuses a directory that holds anything.
fn refuse_unless_empty(dir: &Path) -> Result<()> {
    let first = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(BackupError::io(format!("read {}", dir.display()))(e)),
    };
    match first {
        None => Ok(()),
        Some(entry) => {
            let name = entry
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_default();
            Err(BackupError::Refused(format!(
                "{} is not empty (it holds `{name}`): a restore creates a fresh data \
                 directory; give a new or empty one",
                dir.display()
            )))
        }
    }
}

/// A directory built beside its destination and renamed onto it when
/// complete; removed if dropped before.
struct Staging {
    path: PathBuf,
    done: bool,
}

impl Staging {
    fn create(dest: &Path) -> Result<Staging> {
        let (parent, name) = split(dest)?;
        std::fs::create_dir_all(&parent)
            .map_err(BackupError::io(format!("create {}", parent.display())))?;
        let path = parent.join(format!(".{name}.restoring-{}", std::process::id()));
        // Owner only: the store holds every credential's hash.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&path)
            .map_err(BackupError::io(format!("create {}", path.display())))?;
        Ok(Staging { path, done: false })
    }

    /// Renames it onto `dest` (missing, or an empty directory) durably.
    fn commit(mut self, dest: &Path) -> Result<()> {
        refuse_unless_empty(dest)?;
        sync_dir(&self.path)?;
        std::fs::rename(&self.path, dest).map_err(BackupError::io(format!(
            "rename {} to {}",
            self.path.display(),
            dest.display()
        )))?;
        self.done = true;
        sync_dir(&split(dest)?.0)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A path's parent directory (`.` for a bare name) and file name.
fn split(path: &Path) -> Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .ok_or_else(|| BackupError::Refused(format!("{} names no file", path.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BackupError::io(format!("fsync {}", dir.display())))
}

/// The backup of a stopped node's data directory `data_dir` (its `raft`
/// store): each group's snapshot, then its log applied up to `through`. The store
/// is left as it is: a copy of it is read, made in a temporary directory
/// under `scratch` and removed after. Blocking; fails while a node runs on
/// it.
pub fn offline_backup(
    data_dir: &Path,
    through: Through,
    scratch: &Path,
) -> Result<(Header, Vec<GroupCapture>)> {
    let dir = data_dir.join("raft");
    if !dir.is_dir() {
        return Err(BackupError::Refused(format!(
            "{} is not a Godel data directory (no raft/)",
            data_dir.display()
        )));
    }
    let captures = store::offline_captures(&dir, through, scratch)?;
    let meta = &captures[0].1;
    let members = meta
        .membership()
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    let cluster = ClusterInfo {
        source: "offline".into(),
        node: None,
        leader: None,
        term: meta.last_applied().map(|l| l.leader_id.term),
        members,
    };
    let groups: Vec<GroupCapture> = captures
        .into_iter()
        .map(|(id, capture)| GroupCapture {
            id,
            name: if id == META_GROUP.0 {
                META_GROUP.1.into()
            } else {
                format!("shard-{id}")
            },
            capture,
        })
        .collect();
    Ok((Header::new(cluster, &groups), groups))
}

/// Writes a backup of `groups` to a new file `path` (see [`PartialFile`]);
/// returns its SHA-256 and length. Blocking.
pub fn write_file(
    path: &Path,
    header: &Header,
    groups: &[GroupCapture],
) -> Result<([u8; 32], u64)> {
    let mut partial = PartialFile::create(path)?;
    let out = BufWriter::with_capacity(READ_BUFFER_BYTES, partial.file());
    let (_, hash, len) = write_backup(out, header, groups)?;
    partial.commit()?;
    Ok((hash, len))
}

/// A new file written under a temporary name in its directory
/// (`.<name>.partial-<pid>`, mode 0600: a backup holds every credential's
/// hash) and renamed to its name by [`PartialFile::commit`] after an
/// fsync; removed if dropped before. Never replaces an existing file
/// (checked when created and again before the rename).
#[derive(Debug)]
pub struct PartialFile {
    temp: PathBuf,
    target: PathBuf,
    file: File,
    done: bool,
}

impl PartialFile {
    /// Creates the temporary file; refuses if `target` exists.
    pub fn create(target: &Path) -> Result<PartialFile> {
        refuse_existing(target)?;
        let (parent, name) = split(target)?;
        let temp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(BackupError::io(format!("create {}", temp.display())))?;
        Ok(PartialFile {
            temp,
            target: target.to_path_buf(),
            file,
            done: false,
        })
    }

    /// The file to write to.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Fsyncs the file, links it under its name (which fails if a file
    /// appeared there meanwhile: never replaced), removes the temporary
    /// name and fsyncs the directory.
    pub fn commit(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(BackupError::io(format!("fsync {}", self.temp.display())))?;
        std::fs::hard_link(&self.temp, &self.target).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                BackupError::Refused(format!(
                    "{} exists: a backup never replaces a file; pick another name",
                    self.target.display()
                ))
            } else {
                BackupError::io(format!(
                    "link {} to {}",
                    self.temp.display(),
                    self.target.display()
                ))(e)
            }
        })?;
        self.done = true;
        std::fs::remove_file(&self.temp)
            .map_err(BackupError::io(format!("remove {}", self.temp.display())))?;
        sync_dir(&split(&self.target)?.0)
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn refuse_existing(target: &Path) -> Result<()> {
    if target.exists() {
        return Err(BackupError::Refused(format!(
            "{} exists: a backup never replaces a file; pick another name",
            target.display()
        )));
    }
    Ok(())
}
