//! What [`Store::open`](super::Store::open) checks before the node may use
//! its storage: the layout version, every log entry's checksum, no hole, and
//! that neither the vote nor the log went back past the watermark (see the
//! module essay of `store`, "Lost writes").

use std::fs::File;
use std::io;
use std::path::Path;

use super::db::{Db, LAYOUT_VERSION};
use super::watermark::{self, Mark, Watermark};
use super::{Result, StoreError};

/// Opens the watermark, checks the store against it and, when the store is
/// sound, raises the watermark to what the store holds. Blocking.
pub(super) fn check(db: &Db, dir: &Path) -> Result<Watermark> {
    let new = db.is_new()?;
    let file = watermark::file_name(db.group_id());
    let had_watermark = Watermark::exists_named(dir, &file);
    match db.layout()? {
        Some(LAYOUT_VERSION) if had_watermark => {}
        Some(LAYOUT_VERSION) => {
            return Err(StoreError::LostWrites(format!(
                "the watermark file {} is missing",
                dir.join(&file).display()
            )));
        }
        Some(v) => {
            return Err(StoreError::Layout(format!(
                "layout version {v}; this build reads {LAYOUT_VERSION}"
            )));
        }
        None if new => {}
        None if had_watermark => {
            return Err(StoreError::LostWrites(
                "the store's layout record is missing but it holds data".into(),
            ));
        }
        None => return Err(StoreError::Layout(OLD_LAYOUT.into())),
    }
    let wm = Watermark::open_named(dir, &file)?;
    lost_writes(db, wm.get())?;
    if new {
        db.set_layout()?;
    }
    db.flush_blocking()?;
    sync_sled_file(dir)?;
    let last = db.last_log_id()?.or(db.last_purged()?);
    let vote = db.vote()?;
    wm.set(|_| Mark { vote, last })?;
    Ok(wm)
}

/// Why a store without a layout record that holds data is refused.
const OLD_LAYOUT: &str = "no layout version: written by a build before log checksums \
    (layout 1), and this build reads layout 2 only; layout 1 was never deployed, so there \
    is no migration: wipe this node's data directory and join it as a new member";

/// Whether the store lost or damaged anything the watermark says this node
/// acknowledged: an error naming what, or `Ok`.
fn lost_writes(db: &Db, acked: Mark) -> Result<()> {
    let span = db
        .verify_log()
        .map_err(|e| StoreError::LostWrites(e.to_string()))?;
    let vote = db.vote()?;
    if let Some(acked) = acked.vote
        && !vote.is_some_and(|v| v >= acked)
    {
        return Err(StoreError::LostWrites(format!(
            "the stored vote is {} but this node had saved vote {acked}",
            vote.map_or("none".to_owned(), |v| v.to_string())
        )));
    }
    let Some(acked) = acked.last else {
        return Ok(());
    };
    let purged = db.last_purged()?;
    if purged.is_some_and(|p| p.index >= acked.index) {
        // Covered by the snapshot, which `Store::open` checks covers the
        // purged prefix.
        return Ok(());
    }
    let found = db.log_id_at(acked.index)?;
    if found == Some(acked) {
        return Ok(());
    }
    let ends = match (span, purged) {
        (Some((_, last)), _) => format!("ends at index {last}"),
        (None, Some(p)) => format!("is empty after the purged {p}"),
        (None, None) => "is empty".to_owned(),
    };
    let at = match found {
        Some(other) => format!(", holding {other} at index {}", acked.index),
        None => String::new(),
    };
    Err(StoreError::LostWrites(format!(
        "the log {ends}{at} but this node had acknowledged entries up to {acked}"
    )))
}

/// Fsyncs sled's data file as the previous process left it: entries it had
/// written but not yet flushed when it died are about to be covered by the
/// watermark, so they must be on disk first. (`db` is sled 0.34's file.)
fn sync_sled_file(dir: &Path) -> Result<()> {
    let path = dir.join("db");
    match File::open(&path).and_then(|f| f.sync_all()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Io {
            what: format!("fsync {}", path.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}
