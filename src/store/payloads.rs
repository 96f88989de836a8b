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
    db.each_payload(state.last_task_id(), |id, bytes| {
        match state.task(TaskId(id)) {
            Some(t) if t.payload == fsm::Payload::Stored => {
                let len = u32::try_from(bytes.len()).map_err(|_| too_long(id, bytes.len()))?;
                out.write_all(&[1]).map_err(io)?;
                out.write_all(&id.to_le_bytes()).map_err(io)?;
                out.write_all(&len.to_le_bytes()).map_err(io)?;
                out.write_all(bytes).map_err(io)?;
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
    loop {
        let mut tag = [0u8; 1];
        input.read_exact(&mut tag).map_err(io)?;
        match tag[0] {
            0 => break,
            1 => {}
            other => return Err(corrupt(format!("a record tagged {other}"))),
        }
        let mut head = [0u8; 12];
        input.read_exact(&mut head).map_err(io)?;
        let id = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
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

/// Appends the payloads of `state`'s tasks to snapshot file `file`, which
/// holds its encoded state (`state_len` bytes), and fsyncs it; returns the
/// garbage [`write_section`] found. Blocking, `O(payloads)`.
pub(super) fn append_section(
    db: &Db,
    file: &std::fs::File,
    state_len: u64,
    state: &fsm::State,
) -> Result<Vec<u64>> {
    use std::io::Seek;
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| StoreError::Io { what, source }
    };
    let mut handle = file;
    handle
        .seek(std::io::SeekFrom::Start(state_len))
        .map_err(io("seek in a snapshot file"))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, handle);
    let garbage = write_section(Some(db), state, &mut out)?;
    out.flush().map_err(io("write a snapshot file"))?;
    file.sync_all().map_err(io("fsync a snapshot file"))?;
    Ok(garbage)
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
