//! The format against damage: every byte flipped and every truncation of
//! a small backup is refused (never accepted, never a panic); bounds are
//! checked before anything is allocated for them.

use std::io::{Read, Write};

use openraft::{CommittedLeaderId, LogId, StoredMembership};

use super::*;
use crate::backup::{BackupError, verify};

fn header(groups: &[u32]) -> Header {
    Header {
        format: FORMAT,
        created_at_ms: 1,
        created_at: "1970-01-01T00:00:00.001Z".into(),
        godel_version: "test".into(),
        codec_version: 2,
        cluster: ClusterInfo::default(),
        groups: groups
            .iter()
            .map(|&id| GroupRef {
                id,
                name: format!("g{id}"),
            })
            .collect(),
    }
}

fn meta(group: u32) -> SectionMeta {
    SectionMeta {
        group,
        name: format!("g{group}"),
        applied: LogId::new(CommittedLeaderId::new(2, 1), 10 + u64::from(group)),
        membership: StoredMembership::default(),
        summary: GroupSummary::default(),
    }
}

/// Deterministic bytes.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A backup of one section per `(group, state)`.
fn backup(sections: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let ids: Vec<u32> = sections.iter().map(|(g, _)| *g).collect();
    let mut w = Writer::start(Vec::new(), &header(&ids)).unwrap();
    for (g, state) in sections {
        w.section(&meta(*g), |body| {
            // In uneven pieces, as an encoder writes.
            for piece in state.chunks(7_001) {
                body.write_all(piece).unwrap();
            }
            Ok(())
        })
        .unwrap();
    }
    let (out, _, len) = w.finish().unwrap();
    assert_eq!(len, out.len() as u64);
    out
}

#[test]
fn a_backup_reads_back_as_written() {
    let big = bytes(3 * CHUNK_BYTES + 123, 1);
    let file = backup(&[(0, big.clone()), (7, Vec::new()), (9, bytes(10, 2))]);
    let mut r = Reader::open(&file[..]).unwrap();
    assert_eq!(r.header(), &header(&[0, 7, 9]));
    let mut got = Vec::new();
    while let Some((m, mut body)) = r.next_section().unwrap() {
        let mut state = Vec::new();
        body.read_to_end(&mut state).unwrap();
        got.push((m, state));
    }
    assert_eq!(r.position(), file.len() as u64);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], (meta(0), big));
    assert_eq!(got[1], (meta(7), Vec::new()));
    assert_eq!(got[2], (meta(9), bytes(10, 2)));
    let v = verify(&file[..]).unwrap();
    assert_eq!(v.bytes, file.len() as u64);
    let sizes: Vec<u64> = v.sections.iter().map(|s| s.state_bytes).collect();
    assert_eq!(sizes, [3 * CHUNK_BYTES as u64 + 123, 0, 10]);
}

#[test]
fn a_section_left_unread_is_still_checked() {
    let mut file = backup(&[(0, bytes(5_000, 3)), (1, bytes(5, 4))]);
    let mut r = Reader::open(&file[..]).unwrap();
    let (_, mut body) = r.next_section().unwrap().unwrap();
    let mut some = [0u8; 10];
    body.read_exact(&mut some).unwrap();
    let (m, _) = r.next_section().unwrap().unwrap();
    assert_eq!(m.group, 1);
    assert!(r.next_section().unwrap().is_none());
    // A flip in the part never read is found all the same.
    let at = file.len() / 3;
    file[at] ^= 1;
    let mut r = Reader::open(&file[..]).unwrap();
    r.next_section().unwrap().unwrap();
    let err = r.next_section().unwrap_err();
    assert!(matches!(err, BackupError::Checksum { .. }), "{err}");
}

#[test]
fn every_flipped_byte_is_refused() {
    let file = backup(&[(0, bytes(300, 5)), (1, bytes(40, 6))]);
    for at in 0..file.len() {
        for bit in [0x01, 0x80] {
            let mut bad = file.clone();
            bad[at] ^= bit;
            match verify(&bad[..]) {
                Ok(_) => panic!("a flip of byte {at} (bit {bit:#x}) was accepted"),
                Err(
                    BackupError::Checksum { .. }
                    | BackupError::Malformed(_)
                    | BackupError::NotABackup
                    | BackupError::Format(_)
                    | BackupError::Truncated { .. },
                ) => {}
                Err(other) => panic!("byte {at}: unexpected error {other}"),
            }
        }
    }
}

#[test]
fn every_truncation_is_refused_and_trailing_bytes_too() {
    let file = backup(&[(0, bytes(300, 7))]);
    for len in 0..file.len() {
        match verify(&file[..len]) {
            Err(BackupError::Truncated { at, .. }) => assert!(at <= len as u64),
            Err(BackupError::NotABackup) => assert!(len < 8, "{len}"),
            other => panic!("{len} of {} bytes: {other:?}", file.len()),
        }
    }
    let mut long = file.clone();
    long.push(0);
    let err = verify(&long[..]).unwrap_err();
    assert!(err.to_string().contains("follow the trailer"), "{err}");
}

#[test]
fn bounds_are_checked_before_allocating() {
    // A header that claims 4 GiB of metadata.
    let mut file = MAGIC.to_vec();
    file.extend_from_slice(&FORMAT.to_le_bytes());
    file.extend_from_slice(&u32::MAX.to_le_bytes());
    let err = verify(&file[..]).unwrap_err();
    assert!(err.to_string().contains("over"), "{err}");
    // Another format, and not a backup at all.
    let mut other = MAGIC.to_vec();
    other.extend_from_slice(&2u32.to_le_bytes());
    assert!(matches!(verify(&other[..]), Err(BackupError::Format(2))));
    assert!(matches!(
        verify(&b"PK\x03\x04 a zip file"[..]),
        Err(BackupError::NotABackup)
    ));
    // A chunk that claims more than the limit.
    let good = backup(&[(0, bytes(20, 8))]);
    let meta_len = serde_json::to_vec(&meta(0)).unwrap().len();
    let header_end = good.len() - (4 + 4 + meta_len + 4 + 20 + 4 + 32) - (4 + 4 + 32);
    let chunk_len_at = header_end + 4 + 4 + meta_len;
    let mut bad = good.clone();
    bad[chunk_len_at..chunk_len_at + 4]
        .copy_from_slice(&(MAX_CHUNK_BYTES as u32 + 1).to_le_bytes());
    let err = verify(&bad[..]).unwrap_err();
    assert!(err.to_string().contains("chunk 0 claims"), "{err}");
}

#[test]
fn a_failing_output_reports_its_own_error() {
    /// Takes `left` bytes, then fails as a closed stream would.
    struct Closing {
        left: usize,
    }
    impl Write for Closing {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(BackupError::Interrupted("the client went away".into()).into_io());
            }
            let n = data.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = Writer::start(Closing { left: 2_000 }, &header(&[0])).unwrap();
    let err = w
        .section(&meta(0), |body| {
            body.write_all(&bytes(2 * CHUNK_BYTES, 9))
                .map_err(|e| BackupError::Malformed(format!("the encoder's view: {e}")))
        })
        .unwrap_err();
    assert!(
        matches!(&err, BackupError::Interrupted(why) if why.contains("went away")),
        "{err}"
    );
}

#[test]
fn deep_verify_refuses_a_well_framed_file_whose_state_does_not_decode() {
    // Every frame and checksum is right, so the frame check passes; the
    // state is not a state, which only decoding finds.
    let file = backup(&[(0, bytes(100, 1))]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("framed.backup");
    std::fs::write(&path, &file).unwrap();
    crate::backup::verify_file(&path).unwrap();
    let err = crate::backup::verify_file_deep(&path).unwrap_err();
    assert!(!err.to_string().is_empty());
}
