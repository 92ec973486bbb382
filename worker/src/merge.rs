//! The conversation merge: the stored file plus staged events, as a union by event identity,
//! sorted by timestamp.
//!
//! Events keep the JSON text they arrived with. When the same identity is both stored and
//! staged, the stored copy stays, except that a webhook copy replaces a polled reconstruction
//! (the webhook copy has everything Facebook sent). Legacy files that hold an event twice are
//! healed on their next write.
//!
//! Cost: a merge that knows the stored file's [`FileIndex`] (what the merge that wrote it
//! learnt) appends when every new event sorts after the file's last one and none may already be
//! in it, the usual case: it copies the stored bytes and parses only the new events, so a
//! flush costs what changed, not the conversation's history. Otherwise it reads every stored
//! event's deciding keys (its identity and time, without a tree of the whole event): a scan of
//! the file, the cost of the first flush of a long conversation after a restart. Invariant: both ways give byte-for-byte the same file (a property test below holds
//! them to it).

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use fbsync_shared::facebook::conversations::is_polled_shape;
use fbsync_shared::facebook::event::{EventFacts, EventSource};
use serde_json::Value;
use serde_json::value::RawValue;

/// Why a merge could not be done. The staged events stay staged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("the stored conversation is not a JSON array of events: {0}")]
    CorruptObject(String),
}

/// One event to merge in.
#[derive(Debug, Clone)]
pub struct IncomingEvent<'a> {
    /// The event JSON as received.
    pub body: &'a str,
    /// Webhook copies win over polled ones.
    pub source: EventSource,
}

/// What a merge knows about the file it produced, so the next merge into exactly that file
/// can append without reading it again. Valid only with those bytes: the flusher keeps it with
/// the version (ETag) it wrote and uses it only when the object is still at that version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileIndex {
    /// Events in the file.
    pub events: usize,
    /// The sort key of the file's last event: new events that all sort after it go at the end.
    last: Option<SortKey>,
    /// A hash of each event identity in the file: a new event whose hash is here may be a
    /// copy of a stored one (or a hash collision), so it takes the full merge.
    identities: HashSet<u64>,
}

impl FileIndex {
    /// Bytes of memory the index holds (for the cache's bound).
    pub fn memory_bytes(&self) -> usize {
        // A hash set slot is the 8-byte hash plus a control byte, at a load of up to 7/8.
        self.identities.capacity() * 10 + self.last.as_ref().map_or(0, |k| k.1.len()) + 64
    }
}

/// Events sort by timestamp, then identity.
type SortKey = (i64, String);

/// The merged conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The new object body: a JSON array, one event per identity, sorted by timestamp.
    pub body: Vec<u8>,
    /// False when `body` is byte-for-byte the stored object (no write needed).
    pub changed: bool,
    /// What the next merge into `body` needs to append to it.
    pub index: FileIndex,
    /// True when the new events were appended to the stored bytes (no stored event parsed).
    pub appended: bool,
}

/// Merges `incoming` into the `stored` object of a conversation of `page_id`. `index`, when
/// known, must be the index of exactly these `stored` bytes (it lets the merge append).
pub fn merge_events(
    page_id: &str,
    stored: Option<&[u8]>,
    index: Option<FileIndex>,
    incoming: &[IncomingEvent<'_>],
) -> Result<Merged, MergeError> {
    if let (Some(bytes), Some(index)) = (stored, index)
        && let Some(merged) = append(page_id, bytes, index, incoming)
    {
        return Ok(merged);
    }
    let existing: Vec<&RawValue> = match stored {
        Some(bytes) => {
            serde_json::from_slice(bytes).map_err(|e| MergeError::CorruptObject(e.to_string()))?
        }
        None => Vec::new(),
    };
    let mut entries = Entries::default();
    for raw in &existing {
        entries.add_raw(page_id, raw, None);
    }
    for event in incoming {
        entries.add(page_id, event.body, Some(event.source));
    }
    let sorted = entries.into_sorted();
    let mut body = Vec::with_capacity(sorted.iter().map(|e| e.text.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    write_joined(&mut body, &sorted);
    body.push(b']');
    let changed = stored != Some(body.as_slice());
    Ok(Merged {
        body,
        changed,
        index: FileIndex {
            events: sorted.len(),
            last: sorted.last().map(Entry::key),
            identities: sorted.iter().map(|e| identity_hash(&e.identity)).collect(),
        },
        appended: false,
    })
}

/// The stored bytes with the incoming events after them, when every one of those sorts after
/// the file's last event and none may be in the file already; `None` otherwise.
fn append(
    page_id: &str,
    stored: &[u8],
    mut index: FileIndex,
    incoming: &[IncomingEvent<'_>],
) -> Option<Merged> {
    let mut fresh = Entries::default();
    for event in incoming {
        fresh.add(page_id, event.body, Some(event.source));
    }
    let first = fresh.list.iter().min_by(|a, b| a.key_cmp(b))?;
    let after_last = index
        .last
        .as_ref()
        .is_none_or(|last| (first.timestamp_ms, &first.identity) > (last.0, &last.1));
    let all_new = fresh
        .list
        .iter()
        .all(|e| !index.identities.contains(&identity_hash(&e.identity)));
    let well_formed = stored.first() == Some(&b'[') && stored.last() == Some(&b']');
    if !(after_last && all_new && well_formed) {
        return None;
    }
    let sorted = fresh.into_sorted();
    let added: usize = sorted.iter().map(|e| e.text.len() + 1).sum();
    let mut body = Vec::with_capacity(stored.len() + added);
    body.extend_from_slice(&stored[..stored.len() - 1]);
    if index.events > 0 {
        body.push(b',');
    }
    write_joined(&mut body, &sorted);
    body.push(b']');
    index.events += sorted.len();
    index.last = sorted.last().map(Entry::key);
    index
        .identities
        .extend(sorted.iter().map(|e| identity_hash(&e.identity)));
    Some(Merged {
        body,
        changed: true,
        index,
        appended: true,
    })
}

/// Event texts, comma-separated.
fn write_joined(body: &mut Vec<u8>, entries: &[Entry<'_>]) {
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(entry.text.as_bytes());
    }
}

fn identity_hash(identity: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    identity.hash(&mut hasher);
    hasher.finish()
}

struct Entry<'a> {
    identity: String,
    timestamp_ms: i64,
    text: &'a str,
}

impl Entry<'_> {
    /// Whether the event is a polled reconstruction (parsed only when a copy of it meets
    /// another, which is rare: most events are read for their facts alone).
    fn polled_shape(&self) -> bool {
        serde_json::from_str::<Value>(self.text).is_ok_and(|value| is_polled_shape(&value))
    }

    fn key_cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.timestamp_ms, &self.identity).cmp(&(other.timestamp_ms, &other.identity))
    }

    fn key(&self) -> SortKey {
        (self.timestamp_ms, self.identity.clone())
    }
}

/// Events by identity, in the order first seen.
#[derive(Default)]
struct Entries<'a> {
    list: Vec<Entry<'a>>,
    by_identity: HashMap<String, usize>,
}

impl<'a> Entries<'a> {
    /// Adds an event: stored ones (`source` none) first, then incoming ones. A staged body that
    /// is not JSON cannot happen (it was parsed at ingest); it is skipped rather than corrupt
    /// the file.
    fn add(&mut self, page_id: &str, text: &'a str, source: Option<EventSource>) {
        if let Ok(raw) = serde_json::from_str::<&'a RawValue>(text) {
            self.add_raw(page_id, raw, source);
        }
    }

    /// Adds an event read as raw JSON: its facts come from the keys that decide them
    /// ([`EventFacts::of_raw`]), without a `Value` of the whole event, so a full merge of a
    /// long conversation costs a scan of its text, not a tree of every event.
    fn add_raw(&mut self, page_id: &str, raw: &'a RawValue, source: Option<EventSource>) {
        let facts = EventFacts::of_raw(page_id, raw);
        let entry = Entry {
            identity: facts.identity,
            timestamp_ms: facts.timestamp_ms,
            text: raw.get(),
        };
        self.add_entry(entry, source == Some(EventSource::Webhook));
    }

    /// The first copy of an identity stays, except that a webhook copy replaces a polled one.
    fn add_entry(&mut self, entry: Entry<'a>, from_webhook: bool) {
        match self.by_identity.get(&entry.identity) {
            None => {
                self.by_identity
                    .insert(entry.identity.clone(), self.list.len());
                self.list.push(entry);
            }
            Some(&at) => {
                if from_webhook && !entry.polled_shape() && self.list[at].polled_shape() {
                    self.list[at] = entry;
                }
            }
        }
    }

    fn into_sorted(self) -> Vec<Entry<'a>> {
        let mut list = self.list;
        list.sort_by(|a, b| a.key_cmp(b));
        list
    }
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
