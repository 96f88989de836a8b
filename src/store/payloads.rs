//! Task payloads out of memory (see [`fsm::Payload`]): the state machine
//! hands each new task's payload to the group's `payloads` tree as the
//! entry applies, and the task keeps only [`fsm::Payload::Stored`].
//!
//! # In a snapshot
//!
//! A snapshot's file is the encoded state, then its stored payloads:
//!
//! | bytes | what |
//! | --- | --- |
//! | 1 | `1`: a payload follows; `0`: the end |
//! | 8 | the task id, little-endian |
//! | 4 | the payload's length in bytes, little-endian (at most `Limits::MAX_PAYLOAD_BYTES`) |
//! | n | the payload, UTF-8 JSON text |
//!
//! repeated, in task id order, once for every task of the state whose
//! payload is stored. A node restoring its own snapshot reads only the
//! state: its tree already holds those payloads. A node installing one
//! from its leader, and a backup read back, read them too.
//!
//! A build stores its snapshot as soon as the state is written (a restart
//! can use it from then on), marked unsent, then appends the payloads
//! ([`append_section`]) and clears the mark; meanwhile the last whole
//! snapshot is the one sent to followers (`Db::open_sendable_snapshot`).
//! The payloads the last build on this node wrote are copied from its
//! file (a [`Section`]: read in order, beside the state's tasks in order),
//! and only those of tasks submitted since are read from the tree: a
//! payload never changes once its task is submitted. After a restart or
//! an install, or when a build could not delete its garbage, the next
//! build reads them all from the tree.
//!
//! # Why the tree always has what a snapshot needs
//!
//! - A payload is written as its task's entry applies, before the state
//!   that names it can be read, and a snapshot's file is stored only after
//!   a flush that makes every payload its state names durable.
//! - Task ids are never reused, and a task forgotten at or before a state
//!   never comes back after it. So a stored payload is garbage when its
//!   id is at most that state's last task id and it names no task there;
//!   only then is it deleted: after a snapshot of that state is stored
//!   (a restart never goes back to an older one), by the one snapshot
//!   build running, and not while a copy of an older state is being
//!   written out ([`Db::pin_payloads`]).
//! - An installed snapshot's payloads are added, never cleared: a build
//!   of an older state may still be reading its own, and what the new
//!   state no longer names is garbage by the rule above.

use std::io::{Read, Write};

use super::db::Db;
use super::state_machine::Applied;
use super::{Result, StoreError};
use crate::fsm::{self, Limits, TaskId};

/// Payloads written to the tree per sled batch when installing.
const INSTALL_BATCH: usize = 4096;

/// Has the state machine's state hand its payloads to `db` from now on,
/// and stores those it holds now (see [`fsm::State::keep_payloads_out`]).
/// Not durable until the next flush. Blocking.
pub(super) fn keep_out(db: &Db, applied: &mut Applied) -> Result<()> {
    applied.state.keep_payloads_out();
    store_taken(db, &mut applied.state)
}

/// Stores the payloads the state handed over since the last call.
pub(super) fn store_taken(db: &Db, state: &mut fsm::State) -> Result<()> {
    let taken = take(state);
    if taken.is_empty() {
        return Ok(());
    }
    db.put_payloads(&taken, None)
}

/// The payloads the state handed over since the last call, by task id.
pub(super) fn take(state: &mut fsm::State) -> Vec<(u64, Box<str>)> {
    state
        .take_stored_payloads()
        .into_iter()
        .map(|(id, t)| (id.0, t))
        .collect()
}

/// Gives every task whose payload `db` stores its payload back to hold:
/// a state that no longer depends on the tree. `O(payloads)` memory.
pub(super) fn hold_all(db: &Db, state: &mut fsm::State) -> Result<()> {
    let stored: Vec<TaskId> = state.stored_payloads().collect();
    for id in stored {
        let text = db.payload(id.0)?.ok_or_else(|| missing(id))?;
        state.hold_payload(id, text);
    }
    Ok(())
}

fn missing(id: TaskId) -> StoreError {
    StoreError::Inconsistent(format!(
        "task {id}'s payload is stored but not in the store"
    ))
}

/// Writes the payloads of `state`'s tasks whose payload is stored, from
/// `db`, as a snapshot carries them (the module doc); returns the ids of
/// the stored payloads that name no task of `state` (garbage once a
/// snapshot of `state` is stored). Without a store, `state` must hold
/// every payload. Blocking, `O(payloads)`.
pub(super) fn write_section(
    db: Option<&Db>,
    state: &fsm::State,
    out: &mut impl Write,
) -> Result<Vec<u64>> {
    let io = |source| StoreError::Io {
        what: "write task payloads".into(),
        source,
    };
    let Some(db) = db else {
        if let Some(id) = state.stored_payloads().next() {
            return Err(missing(id));
        }
        out.write_all(&[0]).map_err(io)?;
        return Ok(Vec::new());
    };
    let (mut written, mut garbage) = (0u64, Vec::new());
    db.each_payload(0..=state.last_task_id(), |id, bytes| {
        match state.task(TaskId(id)) {
            Some(t) if t.payload == fsm::Payload::Stored => {
                write_record(out, id, bytes)?;
                written += 1;
            }
            // Held in the state: its copy is the state's.
            Some(_) => {}
            None => garbage.push(id),
        }
        Ok(())
    })?;
    out.write_all(&[0]).map_err(io)?;
    let expected = state.stored_payloads().count() as u64;
    if written != expected {
        let first = state
            .stored_payloads()
            .find(|id| matches!(db.payload(id.0), Ok(None)));
        return Err(StoreError::Inconsistent(format!(
            "{expected} tasks' payloads are stored, the store has {written} of them{}",
            first.map_or(String::new(), |id| format!(" (not task {id}'s)"))
        )));
    }
    Ok(garbage)
}

fn too_long(id: u64, len: usize) -> StoreError {
    StoreError::Inconsistent(format!(
        "task {id}'s payload is {len} bytes, over {}",
        Limits::MAX_PAYLOAD_BYTES
    ))
}

/// Writes task `id`'s payload record (the module doc's table).
fn write_record(out: &mut impl Write, id: u64, bytes: &[u8]) -> Result<()> {
    let io = |source| StoreError::Io {
        what: "write task payloads".into(),
        source,
    };
    let len = u32::try_from(bytes.len()).map_err(|_| too_long(id, bytes.len()))?;
    out.write_all(&[1]).map_err(io)?;
    out.write_all(&id.to_le_bytes()).map_err(io)?;
    out.write_all(&len.to_le_bytes()).map_err(io)?;
    out.write_all(bytes).map_err(io)
}

/// Reads the next record's tag and head: its task id and payload length
/// (the payload follows), or None at the end marker.
fn read_head(input: &mut impl Read) -> Result<Option<(u64, usize)>> {
    let io = |source| StoreError::Io {
        what: "read task payloads".into(),
        source,
    };
    let mut tag = [0u8; 1];
    input.read_exact(&mut tag).map_err(io)?;
    match tag[0] {
        0 => return Ok(None),
        1 => {}
        other => {
            return Err(StoreError::Inconsistent(format!(
                "task payloads: a record tagged {other}"
            )));
        }
    }
    let mut head = [0u8; 12];
    input.read_exact(&mut head).map_err(io)?;
    let id = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
    Ok(Some((id, len)))
}

/// Reads the payloads [`write_section`] wrote after `state`, checking each
/// names a task of `state` whose payload is stored and that every such
/// task has one, and hands each to `each`. Reads no further than the end
/// marker. Blocking.
pub(super) fn read_section(
    input: &mut impl Read,
    state: &fsm::State,
    mut each: impl FnMut(TaskId, Box<str>) -> Result<()>,
) -> Result<()> {
    let corrupt = |problem: String| StoreError::Inconsistent(format!("task payloads: {problem}"));
    let io = |source| StoreError::Io {
        what: "read task payloads".into(),
        source,
    };
    let (mut read, mut last) = (0u64, None);
    while let Some((id, len)) = read_head(input)? {
        if last.is_some_and(|l| l >= id) {
            return Err(corrupt(format!("task {id} out of order")));
        }
        last = Some(id);
        if len > Limits::MAX_PAYLOAD_BYTES {
            return Err(too_long(id, len));
        }
        if !state
            .task(TaskId(id))
            .is_some_and(|t| t.payload == fsm::Payload::Stored)
        {
            return Err(corrupt(format!(
                "task {id} has no stored payload in the state"
            )));
        }
        let mut bytes = vec![0u8; len];
        input.read_exact(&mut bytes).map_err(io)?;
        let text =
            String::from_utf8(bytes).map_err(|e| corrupt(format!("task {id}'s payload: {e}")))?;
        each(TaskId(id), text.into_boxed_str())?;
        read += 1;
    }
    let expected = state.stored_payloads().count() as u64;
    if read != expected {
        return Err(corrupt(format!(
            "{read} payloads for {expected} tasks whose payload is stored"
        )));
    }
    Ok(())
}

/// The payload section of the last snapshot this node built, and what it
/// covers: the next build copies from it what its own state still names
/// (a sequential file read) and reads from the tree only the payloads of
/// tasks submitted since (see [`append_section`]).
#[derive(Clone, Debug)]
pub(super) struct Section {
    /// The snapshot's file, open: it stays readable once retired.
    pub(super) file: std::sync::Arc<std::fs::File>,
    /// Where its payload records start (the length of its state).
    pub(super) start: u64,
    /// Its state's last task id: the section holds the stored payload of
    /// every task of that state, and no task at or below it is new since.
    pub(super) last_task_id: u64,
}

/// Appends the payloads of `state`'s tasks to snapshot file `file`, which
/// holds its encoded state (`state_len` bytes), and fsyncs it; returns the
/// garbage found: stored payloads, at or below `state`'s last task id,
/// that name no task of `state` (see the module doc). With `previous`,
/// the payloads it covers are copied from it and only newer ones read
/// from the tree, and the garbage found is what it held or the tree holds
/// after it that `state` no longer names; should it lack a payload the
/// state names, everything is read from the tree instead. Blocking,
/// `O(payloads)`.
pub(super) fn append_section(
    db: &Db,
    file: &std::fs::File,
    state_len: u64,
    state: &fsm::State,
    previous: Option<&Section>,
) -> Result<Vec<u64>> {
    use std::io::Seek;
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| StoreError::Io { what, source }
    };
    let writer = || -> Result<std::io::BufWriter<&std::fs::File>> {
        let mut handle = file;
        handle
            .seek(std::io::SeekFrom::Start(state_len))
            .map_err(io("seek in a snapshot file"))?;
        Ok(std::io::BufWriter::with_capacity(1 << 20, handle))
    };
    let finish = |mut out: std::io::BufWriter<&std::fs::File>| {
        out.flush().map_err(io("write a snapshot file"))
    };
    let mut copied = None;
    if let Some(previous) = previous {
        let mut out = writer()?;
        let result = copy_section(previous, db, state, &mut out);
        if let Ok(Some(garbage)) = result {
            finish(out)?;
            copied = Some(garbage);
        } else {
            // What is still buffered is dropped, not written: the section
            // is written again from the start.
            drop(out.into_parts());
            // The last file is a shortcut: whatever is wrong with it, the
            // tree has every payload.
            match result {
                Err(e) => tracing::warn!(
                    error = %e,
                    "the last snapshot's payloads could not be copied: reading them all from the store"
                ),
                _ => tracing::warn!(
                    "the last snapshot's payloads lack one this state names: reading them all from the store"
                ),
            }
        }
        if copied.is_none() {
            file.set_len(state_len)
                .map_err(io("truncate a snapshot file"))?;
        }
    }
    let garbage = match copied {
        Some(garbage) => garbage,
        None => {
            let mut out = writer()?;
            let garbage = write_section(Some(db), state, &mut out)?;
            finish(out)?;
            garbage
        }
    };
    file.sync_all().map_err(io("fsync a snapshot file"))?;
    Ok(garbage)
}

/// [`write_section`], copying the payloads `previous` covers from its file
/// and reading only newer ones from `db`; the garbage found, or None if
/// `previous` lacks a payload `state` names (what was written is then
/// not a whole section).
fn copy_section(
    previous: &Section,
    db: &Db,
    state: &fsm::State,
    out: &mut impl Write,
) -> Result<Option<Vec<u64>>> {
    let io = |source| StoreError::Io {
        what: "copy task payloads".into(),
        source,
    };
    let mut input = std::io::BufReader::with_capacity(
        1 << 20,
        ReadAt {
            file: &previous.file,
            at: previous.start,
        },
    );
    let mut record = |bytes: &mut Vec<u8>| -> Result<Option<u64>> {
        let Some((id, len)) = read_head(&mut input)? else {
            return Ok(None);
        };
        if len > Limits::MAX_PAYLOAD_BYTES {
            return Err(too_long(id, len));
        }
        bytes.resize(len, 0);
        input.read_exact(bytes).map_err(io)?;
        Ok(Some(id))
    };
    // Garbage unless a task of the state holds its payload itself.
    let gone = |id: u64| state.task(TaskId(id)).is_none();
    let mut wanted = state.stored_payloads().map(|id| id.0).peekable();
    let mut garbage = Vec::new();
    let mut bytes = Vec::new();
    // The tasks the previous section covers, merged with its records (both
    // in id order).
    let mut next = record(&mut bytes)?;
    while let Some(&want) = wanted.peek() {
        if want > previous.last_task_id {
            break;
        }
        while let Some(id) = next.filter(|&id| id < want) {
            if gone(id) {
                garbage.push(id);
            }
            next = record(&mut bytes)?;
        }
        if next != Some(want) {
            return Ok(None);
        }
        write_record(out, want, &bytes)?;
        wanted.next();
        next = record(&mut bytes)?;
    }
    while let Some(id) = next {
        if gone(id) {
            garbage.push(id);
        }
        next = record(&mut bytes)?;
    }
    // The tasks submitted since, from the tree.
    let mut missing = false;
    let after = previous.last_task_id.saturating_add(1);
    db.each_payload(after..=state.last_task_id(), |id, bytes| {
        while wanted.next_if(|&want| want < id).is_some() {
            missing = true;
        }
        if wanted.next_if_eq(&id).is_some() {
            write_record(out, id, bytes)?;
        } else if gone(id) {
            garbage.push(id);
        }
        Ok(())
    })?;
    if missing || wanted.next().is_some() {
        return Ok(None);
    }
    out.write_all(&[0]).map_err(io)?;
    Ok(Some(garbage))
}

/// Reads a file from an offset on, through positioned reads: the file's
/// own offset, which its clones share, is left alone.
struct ReadAt<'a> {
    file: &'a std::fs::File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// [`read_section`] into `db`'s tree (an installed snapshot). Not durable
/// until the next flush. Blocking.
pub(super) fn install_section(input: &mut impl Read, state: &fsm::State, db: &Db) -> Result<()> {
    let mut batch = Vec::with_capacity(INSTALL_BATCH);
    read_section(input, state, |id, text| {
        batch.push((id.0, text));
        if batch.len() == INSTALL_BATCH {
            db.put_payloads(&batch, None)?;
            batch.clear();
        }
        Ok(())
    })?;
    db.put_payloads(&batch, None)
}

/// [`read_section`] into the state itself: each task holds its payload.
pub(super) fn hold_section(input: &mut impl Read, state: &mut fsm::State) -> Result<()> {
    let mut payloads = Vec::new();
    read_section(input, state, |id, text| {
        payloads.push((id, text));
        Ok(())
    })?;
    for (id, text) in payloads {
        state.hold_payload(id, text);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
