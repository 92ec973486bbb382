//! What this worker wrote last to each conversation object, so the next flush of it neither
//! reads it again nor parses it: a flush then costs one request (the PUT) instead of two, which
//! is what lets the flusher use the bucket's write rate rather than half its operation rate, and
//! CPU for what changed rather than for the whole conversation.
//!
//! Two things are kept per object, with two rules:
//! - the body, used without reading the object only by the claim right after the one that wrote
//!   it (its lease generation plus one), because any claim in between, by any worker, may have
//!   written the object, and not after [`MAX_AGE`] (a data deletion removes objects outside any
//!   claim); the PUT still names the version written (`If-Match`), so a store that honours
//!   conditional writes refuses a stale one;
//! - the merge's [`FileIndex`] with the version it describes, used by any later flush whose read
//!   returns that same version (a version names one content).
//!
//! An entry is used once (taken), and remembered again only after the next write. Memory is
//! bounded by [`MAX_BYTES`]: the oldest entries go first; a body over [`MAX_OBJECT_BYTES`] is
//! not kept (its index is).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fbsync_shared::storage::object_store::{ObjectKey, StoredObject};

use crate::merge::FileIndex;

/// The most bytes of object bodies and indexes kept.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

/// A body larger than this is not kept (it would push out many smaller ones): the object is
/// read again, but its index still spares the parse.
pub const MAX_OBJECT_BYTES: usize = 4 * 1024 * 1024;

/// A body older than this is not used without reading the object again.
pub const MAX_AGE: Duration = Duration::from_secs(120);

/// The objects this worker wrote last, by key.
#[derive(Default)]
pub struct LastWritten {
    inner: Mutex<Entries>,
}

/// What [`LastWritten::take`] gives back.
#[derive(Debug)]
pub struct Remembered {
    /// The object as written, when the taking claim may use it without reading it again.
    pub object: Option<StoredObject>,
    /// The version the index describes.
    pub version: String,
    /// The merge's index of that version.
    pub index: FileIndex,
}

impl Remembered {
    /// The index, if `object` (as read) is the version it describes.
    pub fn index_of(self, object: Option<&StoredObject>) -> Option<FileIndex> {
        object
            .is_some_and(|object| object.version == self.version)
            .then_some(self.index)
    }
}

#[derive(Default)]
struct Entries {
    /// By object key.
    by_key: HashMap<ObjectKey, Entry>,
    /// Keys in the order they were remembered, with the stamp they were remembered under (a
    /// key remembered again is found here twice; only the newest stamp counts).
    order: VecDeque<(ObjectKey, u64)>,
    /// Bytes of the bodies and indexes kept.
    bytes: usize,
    /// Numbers each remembering.
    next_stamp: u64,
}

struct Entry {
    /// The lease generation of the claim that wrote (or read) it.
    generation: i64,
    /// The body is dropped when too big to keep; the version stays with the index.
    object: StoredObject,
    /// The merge's index of `object`'s version.
    index: FileIndex,
    /// When it was remembered.
    at: Instant,
    stamp: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.object.body.len() + self.index.memory_bytes()
    }
}

impl LastWritten {
    /// What this worker left in the object; its body only when the claim of `generation`
    /// comes right after the one that left it, and recently. Taken out either way.
    pub fn take(&self, key: &ObjectKey, generation: i64) -> Option<Remembered> {
        let mut entries = self.lock();
        let entry = entries.by_key.remove(key)?;
        entries.bytes -= entry.bytes();
        let current = entry.generation + 1 == generation
            && entry.at.elapsed() < MAX_AGE
            && !entry.object.body.is_empty();
        Some(Remembered {
            version: entry.object.version.clone(),
            object: current.then_some(entry.object),
            index: entry.index,
        })
    }

    /// Remembers the object as the claim of `generation` left it, with its merge index.
    pub fn remember(
        &self,
        key: &ObjectKey,
        generation: i64,
        mut object: StoredObject,
        index: FileIndex,
    ) {
        if object.body.len() > MAX_OBJECT_BYTES {
            object.body = bytes::Bytes::new();
        }
        let mut entries = self.lock();
        let stamp = entries.next_stamp;
        entries.next_stamp += 1;
        let entry = Entry {
            generation,
            object,
            index,
            at: Instant::now(),
            stamp,
        };
        if entry.index.memory_bytes() > MAX_OBJECT_BYTES {
            return;
        }
        entries.bytes += entry.bytes();
        if let Some(old) = entries.by_key.insert(key.clone(), entry) {
            entries.bytes -= old.bytes();
        }
        entries.order.push_back((key.clone(), stamp));
        while entries.bytes > MAX_BYTES || entries.order.len() > 4 * entries.by_key.len() + 64 {
            let Some((oldest, stamp)) = entries.order.pop_front() else {
                break;
            };
            if entries
                .by_key
                .get(&oldest)
                .is_some_and(|e| e.stamp == stamp)
                && let Some(gone) = entries.by_key.remove(&oldest)
            {
                entries.bytes -= gone.bytes();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key(text: &str) -> ObjectKey {
        ObjectKey::from_text(text)
    }

    fn object(body: &str, version: &str) -> StoredObject {
        StoredObject {
            body: Bytes::from(body.to_string()),
            version: version.into(),
        }
    }

    fn body_of(remembered: Option<Remembered>) -> Option<Bytes> {
        remembered.and_then(|r| r.object).map(|o| o.body)
    }

    #[test]
    fn a_body_serves_only_the_next_claim_and_only_once() {
        let written = LastWritten::default();
        written.remember(&key("a"), 7, object("[1]", "v1"), FileIndex::default());
        let later = written.take(&key("a"), 9).expect("the index is kept");
        assert!(later.object.is_none(), "a claim came in between");
        written.remember(&key("a"), 7, object("[1]", "v1"), FileIndex::default());
        let taken = written.take(&key("a"), 8).expect("the next claim");
        assert_eq!(taken.version, "v1");
        assert_eq!(body_of(Some(taken)).as_deref(), Some(b"[1]".as_ref()));
        assert!(written.take(&key("a"), 8).is_none(), "used once");
        assert!(written.take(&key("b"), 1).is_none());
    }

    #[test]
    fn the_index_serves_only_the_version_it_describes() {
        let written = LastWritten::default();
        written.remember(&key("a"), 7, object("[1]", "v1"), FileIndex::default());
        let remembered = written.take(&key("a"), 20).expect("kept");
        assert!(remembered.index_of(Some(&object("[1,2]", "v2"))).is_none());
        written.remember(&key("a"), 7, object("[1]", "v1"), FileIndex::default());
        let remembered = written.take(&key("a"), 20).expect("kept");
        assert!(remembered.index_of(Some(&object("[1]", "v1"))).is_some());
    }

    #[test]
    fn memory_stays_bounded_and_the_oldest_go_first() {
        let written = LastWritten::default();
        let body = "x".repeat(MAX_OBJECT_BYTES);
        let kept = MAX_BYTES / MAX_OBJECT_BYTES;
        for i in 0..(kept + 3) {
            written.remember(
                &key(&format!("k{i}")),
                1,
                object(&body, "v"),
                FileIndex::default(),
            );
        }
        assert!(written.lock().bytes <= MAX_BYTES);
        assert!(
            written.take(&key("k0"), 2).is_none(),
            "the oldest went first"
        );
        assert!(body_of(written.take(&key(&format!("k{}", kept + 2)), 2)).is_some());
        let big = "y".repeat(MAX_OBJECT_BYTES + 1);
        written.remember(&key("big"), 1, object(&big, "v"), FileIndex::default());
        let remembered = written.take(&key("big"), 2).expect("its index is kept");
        assert!(remembered.object.is_none(), "too big to keep the body");
        for _ in 0..1_000 {
            written.remember(&key("same"), 1, object("[]", "v"), FileIndex::default());
        }
        assert!(
            written.lock().order.len() < 200,
            "re-remembering does not grow the order"
        );
    }
}
