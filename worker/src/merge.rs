//! The conversation merge: the stored file plus staged events, as a union by event identity,
//! sorted by timestamp.
//!
//! Events keep the JSON text they arrived with. When the same identity is both stored and
//! staged, the stored copy stays, except that a webhook copy replaces a polled reconstruction
//! (the webhook copy has everything Facebook sent). Legacy files that hold an event twice are
//! healed on their next write.

use std::collections::HashMap;

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

/// The merged conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The new object body: a JSON array, one event per identity, sorted by timestamp.
    pub body: Vec<u8>,
    /// False when `body` is byte-for-byte the stored object (no write needed).
    pub changed: bool,
    /// Events in the merged file.
    pub events: usize,
}

struct Entry {
    identity: String,
    timestamp_ms: i64,
    text: String,
    polled_shape: bool,
}

/// Merges `incoming` into the `stored` object of a conversation of `page_id`.
pub fn merge_events(
    page_id: &str,
    stored: Option<&[u8]>,
    incoming: &[IncomingEvent<'_>],
) -> Result<Merged, MergeError> {
    let existing: Vec<Box<RawValue>> = match stored {
        Some(bytes) => {
            serde_json::from_slice(bytes).map_err(|e| MergeError::CorruptObject(e.to_string()))?
        }
        None => Vec::new(),
    };
    let mut entries: Vec<Entry> = Vec::with_capacity(existing.len() + incoming.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    let candidates = existing.iter().map(|raw| (raw.get(), None)).chain(
        incoming
            .iter()
            .map(|event| (event.body, Some(event.source))),
    );
    for (text, source) in candidates {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            // A staged body that is not JSON cannot happen (it was parsed at ingest); skip it
            // rather than corrupt the file.
            continue;
        };
        let facts = EventFacts::of(page_id, &value);
        let entry = Entry {
            identity: facts.identity,
            timestamp_ms: facts.timestamp_ms,
            text: text.to_string(),
            polled_shape: is_polled_shape(&value),
        };
        match index.get(&entry.identity) {
            None => {
                index.insert(entry.identity.clone(), entries.len());
                entries.push(entry);
            }
            Some(&at) => {
                let webhook_over_polled = source == Some(EventSource::Webhook)
                    && entries[at].polled_shape
                    && !entry.polled_shape;
                if webhook_over_polled {
                    entries[at] = entry;
                }
            }
        }
    }
    entries.sort_by(|a, b| {
        a.timestamp_ms
            .cmp(&b.timestamp_ms)
            .then_with(|| a.identity.cmp(&b.identity))
    });
    let mut body = Vec::with_capacity(entries.iter().map(|e| e.text.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(entry.text.as_bytes());
    }
    body.push(b']');
    let changed = stored != Some(body.as_slice());
    Ok(Merged {
        body,
        changed,
        events: entries.len(),
    })
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
        let first = merge_events(PAGE, None, &[webhook(&b)]).expect("merges");
        let second = merge_events(PAGE, Some(&first.body), &[webhook(&a)]).expect("merges");
        let at_once = merge_events(PAGE, None, &[webhook(&a), webhook(&b)]).expect("merges");
        assert_eq!(second.body, at_once.body);
    }

    #[test]
    fn replaying_what_is_stored_changes_nothing() {
        let a = message("m_a", 1, "a");
        let stored = merge_events(PAGE, None, &[webhook(&a)]).expect("merges");
        let again = merge_events(PAGE, Some(&stored.body), &[webhook(&a)]).expect("merges");
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
            &[IncomingEvent {
                body: &polled,
                source: EventSource::Poll,
            }],
        )
        .expect("merges");
        let upgraded =
            merge_events(PAGE, Some(&stored.body), &[webhook(webhook_copy)]).expect("merges");
        assert_eq!(upgraded.events, 1);
        assert!(String::from_utf8_lossy(&upgraded.body).contains("\"seq\":3"));
        let kept = merge_events(
            PAGE,
            Some(&upgraded.body),
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
            &[IncomingEvent {
                body: polled,
                source: EventSource::Poll,
            }],
        )
        .expect("merges");
        let upgraded =
            merge_events(PAGE, Some(&stored.body), &[webhook(webhook_echo)]).expect("merges");
        assert_eq!(upgraded.events, 1);
        assert_eq!(upgraded.body, format!("[{webhook_echo}]").into_bytes());
    }

    #[test]
    fn raw_text_is_kept_and_legacy_duplicates_are_healed() {
        let escaped = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":1,"message":{"mid":"m_u","text":"abecad\u0142o"}}"#;
        let legacy = format!("[{escaped},{escaped}]");
        let merged = merge_events(PAGE, Some(legacy.as_bytes()), &[]).expect("merges");
        assert_eq!(merged.events, 1);
        assert!(merged.changed);
        assert!(String::from_utf8_lossy(&merged.body).contains(r"abecad\u0142o"));
    }

    #[test]
    fn a_corrupt_object_is_refused_not_overwritten() {
        let a = message("m_a", 1, "a");
        assert!(matches!(
            merge_events(PAGE, Some(b"{oops"), &[webhook(&a)]),
            Err(MergeError::CorruptObject(_))
        ));
    }
}
