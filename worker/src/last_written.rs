//! What this worker wrote last to each conversation object, so the next flush of it merges into
//! that instead of reading it again: a flush then costs one request (the PUT) instead of two,
//! which is what lets the flusher use the bucket's write rate rather than half its operation
//! rate.
//!
//! Invariants: an entry is used only by the claim right after the one that wrote it (its lease
//! generation plus one), because any claim in between, by any worker, may have written the
//! object; it is used once (taken), and remembered again only after the next write; it is not
//! used after [`MAX_AGE`] (a data deletion removes objects outside any claim); and the PUT still
//! names the version written (`If-Match`), so a store that honours conditional writes refuses a
//! stale one. Memory is bounded by [`MAX_BYTES`]: the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fbsync_shared::storage::object_store::StoredObject;

/// The most bytes of object bodies kept.
pub const MAX_BYTES: usize = 32 * 1024 * 1024;

/// A body larger than this is not kept: it would push out many smaller ones.
pub const MAX_OBJECT_BYTES: usize = 4 * 1024 * 1024;

/// An entry older than this is not used.
pub const MAX_AGE: Duration = Duration::from_secs(120);

/// The objects this worker wrote last, by key.
#[derive(Default)]
pub struct LastWritten {
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// By object key.
    by_key: HashMap<String, Entry>,
    /// Keys in the order they were remembered, with the stamp they were remembered under (a
    /// key remembered again is found here twice; only the newest stamp counts).
    order: VecDeque<(String, u64)>,
    /// Bytes of the bodies kept.
    bytes: usize,
    /// Numbers each remembering.
    next_stamp: u64,
}

struct Entry {
    /// The lease generation of the claim that wrote (or read) it.
    generation: i64,
    object: StoredObject,
    /// When it was remembered.
    at: Instant,
    stamp: u64,
}

impl LastWritten {
    /// The object as this worker left it, when the claim of `generation` comes right after
    /// the one that left it, and it is recent; taken out either way.
    pub fn take(&self, key: &str, generation: i64) -> Option<StoredObject> {
        let mut entries = self.lock();
        let entry = entries.by_key.remove(key)?;
        entries.bytes -= entry.object.body.len();
        (entry.generation + 1 == generation && entry.at.elapsed() < MAX_AGE).then_some(entry.object)
    }

    /// Remembers the object as the claim of `generation` left it.
    pub fn remember(&self, key: &str, generation: i64, object: StoredObject) {
        if object.body.len() > MAX_OBJECT_BYTES {
            return;
        }
        let mut entries = self.lock();
        let stamp = entries.next_stamp;
        entries.next_stamp += 1;
        entries.bytes += object.body.len();
        let entry = Entry {
            generation,
            object,
            at: Instant::now(),
            stamp,
        };
        if let Some(old) = entries.by_key.insert(key.to_string(), entry) {
            entries.bytes -= old.object.body.len();
        }
        entries.order.push_back((key.to_string(), stamp));
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
                entries.bytes -= gone.object.body.len();
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

    fn object(body: &str, version: &str) -> StoredObject {
        StoredObject {
            body: Bytes::from(body.to_string()),
            version: version.into(),
        }
    }

    #[test]
    fn an_entry_serves_only_the_next_claim_and_only_once() {
        let written = LastWritten::default();
        written.remember("a", 7, object("[1]", "v1"));
        assert_eq!(written.take("a", 9), None, "a claim came in between");
        written.remember("a", 7, object("[1]", "v1"));
        let taken = written.take("a", 8).expect("the next claim");
        assert_eq!(
            (taken.body.as_ref(), taken.version.as_str()),
            (b"[1]".as_ref(), "v1")
        );
        assert_eq!(written.take("a", 8), None, "used once");
        assert_eq!(written.take("b", 1), None);
    }

    #[test]
    fn memory_stays_bounded_and_the_oldest_go_first() {
        let written = LastWritten::default();
        let body = "x".repeat(MAX_OBJECT_BYTES);
        for i in 0..(MAX_BYTES / MAX_OBJECT_BYTES + 3) {
            written.remember(&format!("k{i}"), 1, object(&body, "v"));
        }
        assert!(written.lock().bytes <= MAX_BYTES);
        assert_eq!(written.take("k0", 2), None, "the oldest went first");
        assert!(
            written
                .take(&format!("k{}", MAX_BYTES / MAX_OBJECT_BYTES + 2), 2)
                .is_some()
        );
        written.remember("big", 1, object(&"y".repeat(MAX_OBJECT_BYTES + 1), "v"));
        assert_eq!(written.take("big", 2), None, "too big to keep");
        for _ in 0..1_000 {
            written.remember("same", 1, object("[]", "v"));
        }
        assert!(
            written.lock().order.len() < 200,
            "re-remembering does not grow the order"
        );
    }
}
