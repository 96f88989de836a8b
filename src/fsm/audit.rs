//! The audit log: a hash chain inside the replicated state.
//!
//! Every state-changing API call is proposed with an [`AuditMark`] in its
//! batch (see `Batch`): the state machine applies the command and, in the
//! same step, appends an [`AuditEntry`] saying who asked (`actor`), in which tenant, for what
//! (`action`, `target`) and how it ended (`outcome`: `ok`, or
//! `rejected:<code>`). A call refused before it reached a command (a
//! missing or bad credential, a missing permission) is recorded by
//! [`Command::Audit`] with outcome `denied:<code>`. Because entries are
//! written by `apply`, every replica holds the same chain, and an entry
//! exists exactly when the change it describes was committed.
//!
//! # The chain
//!
//! Entry `n` carries `prev_hash` (entry `n-1`'s hash; 32 zero bytes for the
//! first entry ever) and `hash = SHA-256(canonical(n))`, where
//! [`AuditEntry::canonical`] is a length-prefixed encoding of every field
//! but `hash`, `prev_hash` included. Changing any byte of a stored entry
//! changes its recomputed hash, so [`verify`] names the first entry whose
//! stored hash or link no longer matches. The encoding is ours, not
//! bincode's, so a verifier needs only the fields (the CLI verifies pages
//! fetched over the API the same way).
//!
//! # Retention and the anchor
//!
//! The state keeps the newest [`MAX_AUDIT_ENTRIES`] at most, in chunks of
//! [`AUDIT_CHUNK`]: when the log is full, its oldest chunk is dropped
//! whole (so between `MAX_AUDIT_ENTRIES - AUDIT_CHUNK + 1` and
//! `MAX_AUDIT_ENTRIES` are kept), and the hash of the last dropped entry
//! becomes the [`AuditAnchor`]. Chunks are shared, not copied, when the
//! state is copied for a snapshot (the copy is taken while applies wait),
//! so a full log costs that copy a hundred reference counts, not a hundred
//! thousand entries. Verification starts from the anchor, so the chain that
//! remains stays verifiable after retention, across snapshots (the log is
//! part of the snapshot) and after Raft log compaction.
//!
//! [`Command::Audit`]: super::Command::Audit

use std::borrow::Cow;
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::command::{Outcome, Reply};
use super::state::truncate;

/// Most entries kept in the state; older ones leave an anchor behind.
pub const MAX_AUDIT_ENTRIES: usize = 100 * AUDIT_CHUNK;
/// Entries per chunk of the kept log, the unit of retention.
pub const AUDIT_CHUNK: usize = 1000;
/// Longest actor, action, target or outcome kept, in bytes.
const MAX_FIELD_BYTES: usize = 256;
/// Most distinct actor, tenant, action and outcome texts shared between
/// entries (see [`AuditLog`]); past it, new texts are stored per entry.
const MAX_INTERNED: usize = 4096;

/// Who asked for what, as the API node stamps it: the caller and the
/// route's action. Shared texts (`Arc`, `Cow`), so stamping a request
/// allocates nothing on the API node; a batch carries each caller once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCaller {
    /// `key:<id>`, `jwt:<sub>`, `node:<id>` or `anonymous@<address>`.
    pub actor: Arc<str>,
    /// The caller's tenant.
    pub tenant: Arc<str>,
    /// What was asked (`tasks.submit`, `gateways.register`, ...).
    pub action: Cow<'static, str>,
}

/// What a batch says about one of its commands: asked for by
/// `callers[caller]`, confined to that caller's tenant when `scoped`
/// (developers and viewers), about `target` (when absent, the task a
/// submission created).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditMark {
    /// Index into the batch's callers.
    pub caller: u32,
    /// The command may only touch the caller's tenant's tasks, leases and
    /// sessions.
    pub scoped: bool,
    /// What it is about.
    pub target: Option<AuditTarget>,
}

/// A command's audit, before it is packed into a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audit {
    /// Who asked for what.
    pub caller: AuditCaller,
    /// Confined to the caller's tenant.
    pub scoped: bool,
    /// What it is about.
    pub target: Option<AuditTarget>,
}

/// What an audit entry is about; written `task/7`, `lease/12`, ... The
/// common ones are numbers, so recording them allocates nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditTarget {
    /// Nothing in particular (written as the empty string).
    #[default]
    None,
    /// `task/<id>`.
    Task(u64),
    /// `lease/<fencing token>`.
    Lease(u64),
    /// `session/<id>`.
    Session(u64),
    /// `node/<id>`.
    Node(u64),
    /// Anything else, as written (`gateway/gw-1`, `api_key/k_1`).
    Text(Arc<str>),
}

impl fmt::Display for AuditTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditTarget::None => Ok(()),
            AuditTarget::Task(n) => write!(f, "task/{n}"),
            AuditTarget::Lease(n) => write!(f, "lease/{n}"),
            AuditTarget::Session(n) => write!(f, "session/{n}"),
            AuditTarget::Node(n) => write!(f, "node/{n}"),
            AuditTarget::Text(t) => f.write_str(t),
        }
    }
}

impl AuditTarget {
    /// A target written out (`gateway/gw-1`).
    pub fn text(t: impl Into<Arc<str>>) -> Self {
        AuditTarget::Text(t.into())
    }
}

/// A call refused before it became a command (or a change that is not a
/// state-machine command, such as a membership change), recorded as is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Who asked for what.
    pub caller: AuditCaller,
    /// What it was about.
    pub target: Option<AuditTarget>,
    /// How it ended (`denied:unauthenticated`, `denied:forbidden`, `ok`).
    pub outcome: String,
}

/// One link of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When it was applied (the leader's clock), ms since the epoch.
    pub time_ms: u64,
    /// Who asked.
    pub actor: Arc<str>,
    /// In which tenant.
    pub tenant: Arc<str>,
    /// What was asked.
    pub action: Arc<str>,
    /// What it was about.
    pub target: AuditTarget,
    /// How it ended.
    pub outcome: Arc<str>,
    /// The previous entry's hash.
    pub prev_hash: [u8; 32],
    /// SHA-256 of [`AuditEntry::canonical`].
    pub hash: [u8; 32],
}

/// Where the canonical bytes go: a buffer, or straight into the hash.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl AuditEntry {
    /// The bytes the hash covers: a domain tag, `seq` and `time_ms` as
    /// big-endian u64, each text field (the target as written) as a
    /// big-endian u32 length and its bytes, then `prev_hash`.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        self.write_canonical(&mut out);
        out
    }

    fn write_canonical(&self, out: &mut impl Sink) {
        out.put(b"godel-audit-v1\0");
        out.put(&self.seq.to_be_bytes());
        out.put(&self.time_ms.to_be_bytes());
        let mut buf = [0u8; 32];
        let target: &[u8] = match &self.target {
            AuditTarget::None => b"",
            AuditTarget::Text(t) => t.as_bytes(),
            AuditTarget::Task(n) => numbered(&mut buf, b"task/", *n),
            AuditTarget::Lease(n) => numbered(&mut buf, b"lease/", *n),
            AuditTarget::Session(n) => numbered(&mut buf, b"session/", *n),
            AuditTarget::Node(n) => numbered(&mut buf, b"node/", *n),
        };
        for field in [
            self.actor.as_bytes(),
            self.tenant.as_bytes(),
            self.action.as_bytes(),
            target,
            self.outcome.as_bytes(),
        ] {
            out.put(&(field.len() as u32).to_be_bytes());
            out.put(field);
        }
        out.put(&self.prev_hash);
    }

    /// The hash this entry should carry.
    pub fn compute_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        self.write_canonical(&mut h);
        h.finalize().into()
    }
}

/// `prefix` then `n` in decimal, in `buf` (the hash path formats targets
/// without the formatting machinery).
fn numbered<'a>(buf: &'a mut [u8; 32], prefix: &[u8], n: u64) -> &'a [u8] {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = prefix.len() + digits.len() - at;
    buf[..prefix.len()].copy_from_slice(prefix);
    buf[prefix.len()..len].copy_from_slice(&digits[at..]);
    &buf[..len]
}

/// Texts shared between entries: the same few actors, tenants, actions and
/// outcomes recur in almost every entry. Not part of the state's value (it
/// compares equal to any other and is not serialized); it only saves
/// memory and allocations.
#[derive(Clone, Debug, Default)]
struct Interner {
    all: BTreeSet<Arc<str>>,
    /// The texts used last, checked first: an entry's four texts are
    /// usually those of the entry before it.
    recent: VecDeque<Arc<str>>,
}

/// How many recently used texts are checked before the set.
const RECENT_TEXTS: usize = 8;

impl PartialEq for Interner {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Interner {}

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.recent.iter().find(|a| ***a == *s) {
            return Arc::clone(a);
        }
        let s = if s.len() > MAX_FIELD_BYTES {
            Cow::Owned(truncate(s, MAX_FIELD_BYTES))
        } else {
            Cow::Borrowed(s)
        };
        let a = match self.all.get(s.as_ref()) {
            Some(a) => Arc::clone(a),
            None => {
                let a: Arc<str> = Arc::from(s.as_ref());
                if self.all.len() < MAX_INTERNED {
                    self.all.insert(Arc::clone(&a));
                }
                a
            }
        };
        if s.len() == a.len() {
            if self.recent.len() == RECENT_TEXTS {
                self.recent.pop_back();
            }
            self.recent.push_front(Arc::clone(&a));
        }
        a
    }
}

/// Where the kept chain starts: the last dropped entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    /// The last dropped entry's seq.
    pub seq: u64,
    /// Its hash: the first kept entry's `prev_hash`.
    pub hash: [u8; 32],
}

/// An entry as the state keeps it: its seq and its link to the previous
/// entry follow from its position in the log (see [`AuditLog::entries`]),
/// so they are not stored twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    time_ms: u64,
    actor: Arc<str>,
    tenant: Arc<str>,
    action: Arc<str>,
    target: AuditTarget,
    outcome: Arc<str>,
    hash: [u8; 32],
}

impl Stored {
    fn entry(&self, seq: u64, prev_hash: [u8; 32]) -> AuditEntry {
        AuditEntry {
            seq,
            time_ms: self.time_ms,
            actor: Arc::clone(&self.actor),
            tenant: Arc::clone(&self.tenant),
            action: Arc::clone(&self.action),
            target: self.target.clone(),
            outcome: Arc::clone(&self.outcome),
            prev_hash,
            hash: self.hash,
        }
    }
}

/// The chain, part of [`super::State`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    /// The kept entries, oldest first, in chunks: every chunk but the last
    /// holds [`AUDIT_CHUNK`]; the last entry's seq is `last_seq`.
    chunks: VecDeque<Arc<Vec<Stored>>>,
    last_seq: u64,
    head: [u8; 32],
    anchor: Option<AuditAnchor>,
    #[serde(skip)]
    texts: Interner,
}

/// Filters for reading the log; `None` matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only actions starting with this (`tasks.` or `tasks.submit`).
    pub action: Option<String>,
    /// Only outcomes starting with this (`ok`, `rejected`, `denied`).
    pub outcome: Option<String>,
}

impl AuditFilter {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.actor.as_deref().is_none_or(|a| a == &*e.actor)
            && self.tenant.as_deref().is_none_or(|t| t == &*e.tenant)
            && self
                .action
                .as_ref()
                .is_none_or(|a| e.action.starts_with(a.as_str()))
            && self
                .outcome
                .as_ref()
                .is_none_or(|o| e.outcome.starts_with(o.as_str()))
    }
}

impl AuditLog {
    /// Appends an entry at `time_ms`; drops the oldest past the limit.
    pub(crate) fn append(
        &mut self,
        time_ms: u64,
        stamp: &AuditCaller,
        target: AuditTarget,
        outcome: &str,
    ) {
        let target = match target {
            AuditTarget::Text(t) if t.len() > MAX_FIELD_BYTES => {
                AuditTarget::Text(truncate(&t, MAX_FIELD_BYTES).into())
            }
            other => other,
        };
        let mut e = AuditEntry {
            seq: self.last_seq + 1,
            time_ms,
            actor: self.texts.get(&stamp.actor),
            tenant: self.texts.get(&stamp.tenant),
            action: self.texts.get(&stamp.action),
            target,
            outcome: self.texts.get(outcome),
            prev_hash: self.head,
            hash: [0; 32],
        };
        e.hash = e.compute_hash();
        if self.len() == MAX_AUDIT_ENTRIES {
            let first = self.first_seq();
            let dropped = self
                .chunks
                .pop_front()
                .expect("invariant: the log is at its limit, so not empty");
            let last = dropped
                .last()
                .expect("invariant: only the last chunk may be short");
            self.anchor = Some(AuditAnchor {
                seq: first + dropped.len() as u64 - 1,
                hash: last.hash,
            });
        }
        if self.chunks.back().is_none_or(|c| c.len() == AUDIT_CHUNK) {
            self.chunks
                .push_back(Arc::new(Vec::with_capacity(AUDIT_CHUNK)));
        }
        let chunk = self.chunks.back_mut().expect("a chunk was just ensured");
        // Copies the chunk only when a snapshot still shares it.
        Arc::make_mut(chunk).push(Stored {
            time_ms: e.time_ms,
            actor: e.actor,
            tenant: e.tenant,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
            hash: e.hash,
        });
        self.last_seq = e.seq;
        self.head = e.hash;
    }

    /// How many entries are kept.
    pub fn len(&self) -> usize {
        match self.chunks.back() {
            None => 0,
            Some(last) => (self.chunks.len() - 1) * AUDIT_CHUNK + last.len(),
        }
    }

    /// Whether no entry is kept.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The seq of the oldest kept entry (with none kept, the next one's).
    fn first_seq(&self) -> u64 {
        self.last_seq + 1 - self.len() as u64
    }

    /// Entries after seq `after` that match `filter`, at most `limit`, and
    /// the seq to pass as `after` for the next page (`None` at the end).
    pub fn page(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: usize,
    ) -> (Vec<AuditEntry>, Option<u64>) {
        let skip = after.saturating_add(1).saturating_sub(self.first_seq()) as usize;
        let mut items = Vec::new();
        for e in self.entries_from(skip) {
            if items.len() == limit {
                return (items, Some(e.seq - 1));
            }
            if filter.matches(&e) {
                items.push(e);
            }
        }
        (items, None)
    }

    /// The kept entries, oldest first, with their seqs and links.
    pub fn entries(&self) -> impl Iterator<Item = AuditEntry> + '_ {
        self.entries_from(0)
    }

    /// The newest entry, if any is kept.
    pub fn last(&self) -> Option<AuditEntry> {
        let prev = match self.len() {
            0 => return None,
            1 => self.anchor.map_or([0; 32], |a| a.hash),
            n => self.stored(n - 2).hash,
        };
        Some(self.stored(self.len() - 1).entry(self.last_seq, prev))
    }

    /// The kept entries from the `skip`-th on (0: the oldest kept).
    fn entries_from(&self, skip: usize) -> impl Iterator<Item = AuditEntry> + '_ {
        let skip = skip.min(self.len());
        let mut prev = match skip {
            0 => self.anchor.map_or([0; 32], |a| a.hash),
            _ => self.stored(skip - 1).hash,
        };
        let first = self.first_seq() + skip as u64;
        let (chunk, at) = (skip / AUDIT_CHUNK, skip % AUDIT_CHUNK);
        let mut stored = self.chunks.iter().skip(chunk).flat_map(|c| c.iter());
        if at > 0 {
            stored.nth(at - 1);
        }
        stored.enumerate().map(move |(i, s)| {
            let e = s.entry(first + i as u64, prev);
            prev = s.hash;
            e
        })
    }

    /// The `i`-th kept entry (0: the oldest); `i` must be below `len`.
    fn stored(&self, i: usize) -> &Stored {
        &self.chunks[i / AUDIT_CHUNK][i % AUDIT_CHUNK]
    }

    /// Where the kept chain starts, once entries have been dropped.
    pub fn anchor(&self) -> Option<AuditAnchor> {
        self.anchor
    }

    /// The newest entry's seq (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The newest entry's hash.
    pub fn head(&self) -> [u8; 32] {
        self.head
    }

    /// Test support: changes the stored entry `seq` as `f` changes it (its
    /// seq and link are not stored and stay), to prove [`verify`] finds
    /// what was changed. False if there is no such entry.
    #[doc(hidden)]
    pub fn tamper(&mut self, seq: u64, f: impl FnOnce(&mut AuditEntry)) -> bool {
        let Some(i) = seq.checked_sub(self.first_seq()).map(|i| i as usize) else {
            return false;
        };
        let Some(s) = self
            .chunks
            .get_mut(i / AUDIT_CHUNK)
            .and_then(|c| Arc::make_mut(c).get_mut(i % AUDIT_CHUNK))
        else {
            return false;
        };
        let mut e = s.entry(seq, [0; 32]);
        f(&mut e);
        *s = Stored {
            time_ms: e.time_ms,
            actor: e.actor,
            tenant: e.tenant,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
            hash: e.hash,
        };
        true
    }
}

/// Where and why a chain stops verifying.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {why}")]
pub struct ChainBroken {
    /// The first entry that does not verify.
    pub seq: u64,
    /// What is wrong with it.
    pub why: String,
}

/// Walks a chain from `anchor` (or from the genesis, when none): each
/// entry's seq follows the previous one, its `prev_hash` is the previous
/// hash, and its stored hash is its recomputed hash. Returns how many
/// entries verified, or the first that did not.
pub fn verify<E: std::borrow::Borrow<AuditEntry>>(
    anchor: Option<AuditAnchor>,
    entries: impl IntoIterator<Item = E>,
) -> Result<u64, ChainBroken> {
    let (mut seq, mut prev) = anchor.map_or((0, [0; 32]), |a| (a.seq, a.hash));
    let mut n = 0;
    for e in entries {
        let e = e.borrow();
        let broken = |why: String| ChainBroken { seq: e.seq, why };
        if e.seq != seq + 1 {
            return Err(broken(format!("expected seq {}", seq + 1)));
        }
        if e.hash != e.compute_hash() {
            return Err(broken("stored hash does not match the entry".into()));
        }
        if e.prev_hash != prev {
            return Err(broken("prev_hash does not match the previous entry".into()));
        }
        seq = e.seq;
        prev = e.hash;
        n += 1;
    }
    Ok(n)
}

/// What an outcome looks like in the log: `ok` or `rejected:<code>`.
pub(crate) fn outcome_text(outcome: &Outcome) -> &'static str {
    match outcome {
        Ok(_) => "ok",
        Err(r) => match r.code() {
            "not_found" => "rejected:not_found",
            "conflict" => "rejected:conflict",
            "invalid_request" => "rejected:invalid_request",
            "payload_too_large" => "rejected:payload_too_large",
            "rate_limited" => "rejected:rate_limited",
            "forbidden" => "rejected:forbidden",
            _ => "rejected:other",
        },
    }
}

/// The target of an audited command: the mark's, or the task a submission
/// created (or found by its idempotency key).
pub(crate) fn target_of(target: &Option<AuditTarget>, outcome: &Outcome) -> AuditTarget {
    match (target, outcome) {
        (Some(t), _) => t.clone(),
        (None, Ok(Reply::Submitted { task, .. })) => AuditTarget::Task(task.id.0),
        (None, _) => AuditTarget::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(action: &'static str) -> AuditCaller {
        AuditCaller {
            actor: "key:k1".into(),
            tenant: "acme".into(),
            action: action.into(),
        }
    }

    fn log_of(n: u64) -> AuditLog {
        let mut log = AuditLog::default();
        for i in 0..n {
            log.append(1000 + i, &stamp("tasks.submit"), AuditTarget::Task(1), "ok");
        }
        log
    }

    #[test]
    fn a_chain_verifies_and_any_flipped_byte_names_its_entry() {
        let log = log_of(6);
        assert_eq!(verify(log.anchor(), log.entries()), Ok(6));
        for seq in 1..=6 {
            for field in 0..4 {
                let mut bad = log.clone();
                assert!(bad.tamper(seq, |e| match field {
                    0 => e.actor = "Key:k1".into(),
                    1 => e.outcome = "ok!".into(),
                    2 => e.time_ms ^= 1,
                    _ => e.hash[0] ^= 0x80,
                }));
                let err = verify(bad.anchor(), bad.entries()).unwrap_err();
                assert_eq!(err.seq, seq, "field {field}: {err}");
            }
            // A link changed where it is shown (a page of the API) is named too.
            let mut shown: Vec<AuditEntry> = log.entries().collect();
            shown[seq as usize - 1].prev_hash[7] ^= 1;
            assert_eq!(verify(log.anchor(), &shown).unwrap_err().seq, seq);
        }
    }

    #[test]
    fn retention_keeps_an_anchor_that_verifies_the_rest() {
        let mut log = log_of(3);
        let third = log.entries().nth(2).unwrap().hash;
        // Drop the first three by hand, as retention would.
        let dropped = log.chunks.pop_front().unwrap();
        assert_eq!(dropped.len(), 3);
        log.anchor = Some(AuditAnchor {
            seq: 3,
            hash: dropped[2].hash,
        });
        for i in 0..3 {
            log.append(2000 + i, &stamp("x"), AuditTarget::text("t"), "ok");
        }
        assert_eq!(log.anchor().unwrap().hash, third);
        assert_eq!(verify(log.anchor(), log.entries()), Ok(3));
        assert!(
            verify(None, log.entries()).is_err(),
            "no anchor: seq 4 cannot start a chain"
        );
    }

    #[test]
    fn pages_follow_the_cursor_and_filters() {
        let mut log = log_of(5);
        log.append(
            9,
            &stamp("gateways.register"),
            AuditTarget::text("gateway/g"),
            "rejected:invalid_request",
        );
        let all = AuditFilter::default();
        let (p1, next) = log.page(&all, 0, 4);
        assert_eq!(p1.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let (p2, next) = log.page(&all, next.unwrap(), 4);
        assert_eq!(p2.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(next, None);
        let f = AuditFilter {
            outcome: Some("rejected".into()),
            ..Default::default()
        };
        let (p, _) = log.page(&f, 0, 10);
        assert_eq!(p.iter().map(|e| e.seq).collect::<Vec<_>>(), [6]);
    }

    #[test]
    fn retention_at_the_real_limit_drops_whole_chunks_and_stays_verifiable() {
        let n = (MAX_AUDIT_ENTRIES + 2 * AUDIT_CHUNK + 5) as u64;
        let log = log_of(n);
        // Full at MAX; the next append dropped the oldest chunk, twice, and
        // five more went into a new chunk.
        assert_eq!(log.len(), MAX_AUDIT_ENTRIES - AUDIT_CHUNK + 5);
        assert_eq!(log.last_seq(), n);
        let anchor = log.anchor().expect("entries were dropped");
        assert_eq!(anchor.seq, 3 * AUDIT_CHUNK as u64);
        let first = log.entries().next().unwrap();
        assert_eq!(first.seq, anchor.seq + 1);
        assert_eq!(first.prev_hash, anchor.hash);
        assert_eq!(
            verify(log.anchor(), log.entries()),
            Ok(log.len() as u64),
            "the kept chain verifies from its anchor"
        );
        // A page starting inside a chunk links to the entry before it.
        let all = AuditFilter::default();
        let after = anchor.seq + AUDIT_CHUNK as u64 + 7;
        let (page, next) = log.page(&all, after, 3);
        assert_eq!(
            page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [after + 1, after + 2, after + 3]
        );
        assert_eq!(next, Some(after + 3));
        let before = log.entries().find(|e| e.seq == after).unwrap();
        assert_eq!(page[0].prev_hash, before.hash);
        // A cursor before the anchor starts at the oldest kept entry.
        let (page, _) = log.page(&all, 5, 1);
        assert_eq!(page[0].seq, anchor.seq + 1);
    }

    #[test]
    fn a_copy_shares_chunks_and_does_not_see_later_appends() {
        let mut log = log_of(2 * AUDIT_CHUNK as u64 + 1);
        let copy = log.clone();
        assert!(Arc::ptr_eq(&log.chunks[0], &copy.chunks[0]));
        log.append(1, &stamp("x"), AuditTarget::None, "ok");
        assert!(Arc::ptr_eq(&log.chunks[0], &copy.chunks[0]));
        assert_eq!(copy.len() + 1, log.len());
        assert_eq!(copy.entries().last().unwrap().seq, log.last_seq() - 1);
        assert!(log.tamper(1, |e| e.time_ms ^= 1));
        assert_eq!(verify(copy.anchor(), copy.entries()), Ok(copy.len() as u64));
        assert_eq!(verify(log.anchor(), log.entries()).unwrap_err().seq, 1);
    }
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[test]
    fn a_numeric_target_hashes_as_its_text() {
        let mut e = AuditEntry {
            seq: 1,
            time_ms: 2,
            actor: "a".into(),
            tenant: "t".into(),
            action: "tasks.cancel".into(),
            target: AuditTarget::Task(u64::MAX),
            outcome: "ok".into(),
            prev_hash: [7; 32],
            hash: [0; 32],
        };
        let numeric = e.compute_hash();
        e.target = AuditTarget::text(format!("task/{}", u64::MAX));
        assert_eq!(e.compute_hash(), numeric);
        assert_eq!(Sha256::digest(e.canonical()).as_slice(), numeric.as_slice());
    }
}
