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
//! flush costs what changed, not the conversation's history. Otherwise it parses the whole
//! file. Invariant: both ways give byte-for-byte the same file (a property test below holds
//! them to it).

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

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
        entries.add(page_id, raw.get(), None);
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
    polled_shape: bool,
}

impl Entry<'_> {
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
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let facts = EventFacts::of(page_id, &value);
        let entry = Entry {
            identity: facts.identity,
            timestamp_ms: facts.timestamp_ms,
            text,
            polled_shape: is_polled_shape(&value),
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
                if from_webhook && self.list[at].polled_shape && !entry.polled_shape {
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

/// The seed's reconstruction of a polled message: sender, recipient, timestamp and a message
/// with mid and text, maybe `is_echo`, and maybe the Graph API's attachment objects (which,
/// unlike a webhook's, have no `payload`).
fn is_polled_shape(event: &Value) -> bool {
    let Some(object) = event.as_object() else {
        return false;
    };
    let top_ok = object
        .keys()
        .all(|k| matches!(k.as_str(), "sender" | "recipient" | "timestamp" | "message"));
    let Some(message) = event.get("message").and_then(Value::as_object) else {
        return false;
    };
    let message_ok = message
        .keys()
        .all(|k| matches!(k.as_str(), "mid" | "text" | "is_echo" | "attachments"));
    let attachments_ok = message
        .get("attachments")
        .and_then(Value::as_array)
        .is_none_or(|list| list.iter().all(|a| a.get("payload").is_none()));
    top_ok && message_ok && attachments_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "p1";

    fn message(mid: &str, ts: i64, text: &str) -> String {
        format!(
            r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"message":{{"mid":"{mid}","text":"{text}"}}}}"#
        )
    }

    fn webhook(body: &str) -> IncomingEvent<'_> {
        IncomingEvent {
            body,
            source: EventSource::Webhook,
        }
    }

    fn ids(merged: &Merged) -> Vec<String> {
        let events: Vec<Value> = serde_json::from_slice(&merged.body).expect("array");
        events
            .iter()
            .map(|e| EventFacts::of(PAGE, e).identity)
            .collect()
    }

    #[test]
    fn duplicates_vanish_and_order_is_by_timestamp() {
        let (a, b, c) = (
            message("m_a", 30, "a"),
            message("m_b", 10, "b"),
            message("m_c", 20, "c"),
        );
        let merged = merge_events(
            PAGE,
            None,
            None,
            &[
                webhook(&a),
                webhook(&b),
                webhook(&a),
                webhook(&c),
                webhook(&b),
            ],
        )
        .expect("merges");
        assert_eq!(ids(&merged), ["mid:m_b", "mid:m_c", "mid:m_a"]);
        assert!(merged.changed);
    }

    #[test]
    fn out_of_order_arrival_across_flushes_gives_the_same_file() {
        let (a, b) = (message("m_a", 1, "a"), message("m_b", 2, "b"));
        let first = merge_events(PAGE, None, None, &[webhook(&b)]).expect("merges");
        let second = merge_events(PAGE, Some(&first.body), None, &[webhook(&a)]).expect("merges");
        let at_once = merge_events(PAGE, None, None, &[webhook(&a), webhook(&b)]).expect("merges");
        assert_eq!(second.body, at_once.body);
    }

    #[test]
    fn replaying_what_is_stored_changes_nothing() {
        let a = message("m_a", 1, "a");
        let stored = merge_events(PAGE, None, None, &[webhook(&a)]).expect("merges");
        let again = merge_events(PAGE, Some(&stored.body), None, &[webhook(&a)]).expect("merges");
        assert!(!again.changed);
        assert_eq!(again.body, stored.body);
    }

    #[test]
    fn echoes_deliveries_and_reads_share_the_user_file() {
        let echo = r#"{"sender":{"id":"p1"},"recipient":{"id":"u1"},"timestamp":5,"message":{"mid":"m_e","is_echo":true,"text":"hi"}}"#;
        let delivery = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":0,"delivery":{"mids":["m_e"],"watermark":5}}"#;
        let read = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":7,"read":{"watermark":5}}"#;
        let merged = merge_events(
            PAGE,
            None,
            None,
            &[
                webhook(read),
                webhook(echo),
                webhook(delivery),
                webhook(read),
            ],
        )
        .expect("merges");
        assert_eq!(ids(&merged), ["delivery:5", "mid:m_e", "read:5"]);
    }

    #[test]
    fn a_webhook_copy_replaces_a_polled_one_but_not_the_reverse() {
        let polled = message("m_x", 100, "hello");
        let webhook_copy = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":100,"message":{"mid":"m_x","text":"hello","seq":3}}"#;
        let stored = merge_events(
            PAGE,
            None,
            None,
            &[IncomingEvent {
                body: &polled,
                source: EventSource::Poll,
            }],
        )
        .expect("merges");
        let upgraded =
            merge_events(PAGE, Some(&stored.body), None, &[webhook(webhook_copy)]).expect("merges");
        assert_eq!(upgraded.index.events, 1);
        assert!(String::from_utf8_lossy(&upgraded.body).contains("\"seq\":3"));
        let kept = merge_events(
            PAGE,
            Some(&upgraded.body),
            None,
            &[IncomingEvent {
                body: &polled,
                source: EventSource::Poll,
            }],
        )
        .expect("merges");
        assert!(!kept.changed);
    }

    #[test]
    fn a_polled_echo_with_attachments_gives_way_to_the_webhook_echo() {
        let polled = r#"{"sender":{"id":"p1"},"recipient":{"id":"u1"},"timestamp":9,"message":{"mid":"m_i","text":"","is_echo":true,"attachments":[{"id":"a1","mime_type":"image/jpeg"}]}}"#;
        let webhook_echo = r#"{"sender":{"id":"p1"},"recipient":{"id":"u1"},"timestamp":9,"message":{"mid":"m_i","is_echo":true,"app_id":7,"attachments":[{"type":"image","payload":{"url":"https://x"}}]}}"#;
        let stored = merge_events(
            PAGE,
            None,
            None,
            &[IncomingEvent {
                body: polled,
                source: EventSource::Poll,
            }],
        )
        .expect("merges");
        let upgraded =
            merge_events(PAGE, Some(&stored.body), None, &[webhook(webhook_echo)]).expect("merges");
        assert_eq!(upgraded.index.events, 1);
        assert_eq!(upgraded.body, format!("[{webhook_echo}]").into_bytes());
    }

    #[test]
    fn raw_text_is_kept_and_legacy_duplicates_are_healed() {
        let escaped = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":1,"message":{"mid":"m_u","text":"abecad\u0142o"}}"#;
        let legacy = format!("[{escaped},{escaped}]");
        let merged = merge_events(PAGE, Some(legacy.as_bytes()), None, &[]).expect("merges");
        assert_eq!(merged.index.events, 1);
        assert!(merged.changed);
        assert!(String::from_utf8_lossy(&merged.body).contains(r"abecad\u0142o"));
    }

    #[test]
    fn a_corrupt_object_is_refused_not_overwritten() {
        let a = message("m_a", 1, "a");
        assert!(matches!(
            merge_events(PAGE, Some(b"{oops"), None, &[webhook(&a)]),
            Err(MergeError::CorruptObject(_))
        ));
    }

    #[test]
    fn an_event_after_the_last_is_appended_without_parsing_the_stored_file() {
        let (a, b, c) = (
            message("m_a", 1, "a"),
            message("m_b", 2, "b"),
            message("m_c", 3, "c"),
        );
        let stored = merge_events(PAGE, None, None, &[webhook(&a), webhook(&b)]).expect("merges");
        let appended = merge_events(
            PAGE,
            Some(&stored.body),
            Some(stored.index.clone()),
            &[webhook(&c)],
        )
        .expect("merges");
        assert!(appended.appended && appended.changed);
        let full = merge_events(PAGE, Some(&stored.body), None, &[webhook(&c)]).expect("merges");
        assert_eq!((&appended.body, &appended.index), (&full.body, &full.index));
        // The stored events are not parsed: bytes a full merge would refuse are copied as
        // they are (an index is only ever used with the very bytes it describes).
        let unreadable = String::from_utf8(stored.body.clone())
            .expect("utf-8")
            .replacen("\"text\":\"a\"", "\"text\":a", 1);
        let copied = merge_events(
            PAGE,
            Some(unreadable.as_bytes()),
            Some(stored.index),
            &[webhook(&c)],
        )
        .expect("appends");
        assert!(
            copied
                .body
                .starts_with(&unreadable.as_bytes()[..unreadable.len() - 1])
        );
    }

    #[test]
    fn a_copy_of_a_stored_event_or_an_older_event_takes_the_full_merge() {
        let (a, b) = (message("m_a", 1, "a"), message("m_b", 5, "b"));
        let stored = merge_events(PAGE, None, None, &[webhook(&b)]).expect("merges");
        let older = merge_events(
            PAGE,
            Some(&stored.body),
            Some(stored.index.clone()),
            &[webhook(&a)],
        )
        .expect("merges");
        assert!(!older.appended);
        assert_eq!(ids(&older), ["mid:m_a", "mid:m_b"]);
        // A read with the same watermark, later: same identity, so it is not a new event.
        let read = |ts: i64| {
            format!(
                r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"read":{{"watermark":5}}}}"#
            )
        };
        let (first_read, later_read) = (read(6), read(9));
        let with_read = merge_events(
            PAGE,
            Some(&stored.body),
            Some(stored.index),
            &[webhook(&first_read)],
        )
        .expect("merges");
        assert!(with_read.appended);
        let again = merge_events(
            PAGE,
            Some(&with_read.body),
            Some(with_read.index),
            &[webhook(&later_read)],
        )
        .expect("merges");
        assert!(!again.appended && !again.changed);
    }

    /// Flushes of random batches (out of order, duplicated, polled and webhook copies of the
    /// same message with different timestamps, reads sharing a watermark), each merged twice:
    /// with the index of the previous file (appending when it can) and without (the full
    /// merge). The files must be byte-for-byte the same after every flush.
    #[test]
    fn appending_writes_byte_for_byte_what_the_full_merge_writes() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        let mut appends = 0;
        let mut flushes = 0;
        for seed in 0..300_u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut clock = 1_000_i64;
            let mut full: Option<Vec<u8>> = None;
            let mut carried: Option<(Vec<u8>, FileIndex)> = None;
            for _ in 0..rng.random_range(1..12) {
                let mut batch = Vec::new();
                for _ in 0..rng.random_range(0..6) {
                    // Mostly forward in time, sometimes back (late or re-delivered events).
                    clock += rng.random_range(0..5);
                    let ts = if rng.random_bool(0.2) {
                        clock - rng.random_range(0..40)
                    } else {
                        clock
                    };
                    let mid = rng.random_range(0..25);
                    let body = match rng.random_range(0..5) {
                        0 => format!(
                            r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"read":{{"watermark":{}}}}}"#,
                            ts / 10
                        ),
                        // A polled reconstruction: the timestamp in whole seconds.
                        1 => message(&format!("m_{mid}"), ts - ts % 1000, "x"),
                        2 => format!(
                            r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"message":{{"mid":"m_{mid}","text":"x","seq":1}}}}"#
                        ),
                        _ => message(&format!("m_{mid}_{ts}"), ts, "y"),
                    };
                    let source = if rng.random_bool(0.3) {
                        EventSource::Poll
                    } else {
                        EventSource::Webhook
                    };
                    batch.push((body, source));
                }
                let incoming: Vec<IncomingEvent<'_>> = batch
                    .iter()
                    .map(|(body, source)| IncomingEvent {
                        body,
                        source: *source,
                    })
                    .collect();
                let expected =
                    merge_events(PAGE, full.as_deref(), None, &incoming).expect("full merge");
                let (stored, index) = carried.take().unzip();
                let got = merge_events(PAGE, stored.as_deref(), index, &incoming).expect("merges");
                assert_eq!(
                    String::from_utf8_lossy(&got.body),
                    String::from_utf8_lossy(&expected.body),
                    "seed {seed}"
                );
                assert_eq!(got.changed, expected.changed, "seed {seed}");
                assert_eq!(got.index, expected.index, "seed {seed}");
                appends += usize::from(got.appended);
                flushes += 1;
                full = Some(expected.body);
                carried = Some((got.body, got.index));
            }
        }
        // Both ways were exercised.
        assert!(
            appends > flushes / 10,
            "{appends} appends in {flushes} flushes"
        );
        assert!(
            appends < flushes * 9 / 10,
            "{appends} appends in {flushes} flushes"
        );
    }
}
