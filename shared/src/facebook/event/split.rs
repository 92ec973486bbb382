//! Splitting a webhook delivery into one [`EventMessage`] per event: messaging, standby and
//! Page changes. The envelope borrows from the body; each event stays the text Facebook sent.
//!
//! Invariant: a delivery is split whole or refused whole. It is refused when it nests deeper
//! than [`MAX_JSON_DEPTH`], carries more than [`MAX_EVENTS_PER_DELIVERY`] events, or names a
//! Page or a person by something that is not an id ([`PageId::parse`], [`Psid::parse`]): no
//! event goes on a queue that the worker would have to drop.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::facts::whole_number;
use super::{
    DeliveryError, EventFacts, EventKind, EventMessage, EventSource, Identity,
    MAX_EVENTS_PER_DELIVERY, MAX_JSON_DEPTH, canonical_hash,
};
use crate::ids::{PageId, Psid};

/// A delivery's envelope, borrowed from the body.
#[derive(Deserialize)]
struct Delivery<'a> {
    /// Must be the string `"page"`; its text is enough to tell in the usual case.
    #[serde(borrow)]
    object: &'a RawValue,
    #[serde(default, borrow)]
    entry: Vec<Entry<'a>>,
}

/// One Page's part of a delivery; the events stay text until they are described.
#[derive(Deserialize)]
struct Entry<'a> {
    /// The Page id, a string (or a number) as sent.
    #[serde(borrow)]
    id: &'a RawValue,
    /// When the entry was sent, in seconds: an integer as Facebook writes it, or a number with a
    /// fraction (accepted too); anything else is no time.
    #[serde(default, borrow)]
    time: Option<&'a RawValue>,
    #[serde(default, borrow)]
    messaging: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    standby: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    changes: Vec<&'a RawValue>,
}

/// Splits a delivery into its events: messaging, standby and page changes.
pub fn split_delivery(
    body: &[u8],
    received_at_ms: i64,
) -> Result<Vec<EventMessage>, DeliveryError> {
    if nesting_depth(body) > MAX_JSON_DEPTH {
        return Err(DeliveryError::TooDeep);
    }
    let delivery: Delivery =
        serde_json::from_slice(body).map_err(|e| DeliveryError::NotJson(e.to_string()))?;
    if delivery.object.get() != r#""page""# {
        // Not the plain text `"page"`: decide on the value (an escaped "page" is one too).
        match serde_json::from_str::<Value>(delivery.object.get()) {
            Ok(Value::String(object)) if object == "page" => {}
            Ok(other) => return Err(DeliveryError::NotPage(other.to_string())),
            Err(e) => return Err(DeliveryError::NotJson(e.to_string())),
        }
    }
    let events = delivery
        .entry
        .iter()
        .map(|entry| entry.messaging.len() + entry.standby.len() + entry.changes.len())
        .sum();
    if events > MAX_EVENTS_PER_DELIVERY {
        return Err(DeliveryError::TooManyEvents(events));
    }
    let mut events = Vec::with_capacity(events);
    for entry in delivery.entry {
        let page_id = page_id_text(entry.id);
        PageId::parse(&page_id)?;
        let streams = [(entry.messaging, false), (entry.standby, true)];
        for (raw_events, standby) in streams {
            for raw in raw_events {
                let mut message =
                    describe_messaging_event(&page_id, raw.to_owned(), received_at_ms);
                if let Some(user_psid) = &message.user_psid {
                    Psid::parse(user_psid)?;
                }
                message.standby = standby;
                events.push(message);
            }
        }
        let time: Option<Value> = entry
            .time
            .and_then(|raw| serde_json::from_str(raw.get()).ok());
        let time_ms = time
            .as_ref()
            .and_then(whole_number)
            .unwrap_or(0)
            .saturating_mul(1000);
        for raw in entry.changes {
            let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            let identity = Identity::Change(canonical_hash(
                &serde_json::json!({ "time": time, "change": value }),
            ));
            events.push(EventMessage {
                page_id: page_id.clone(),
                kind: EventKind::PageChange,
                event_id: identity.to_string(),
                user_psid: None,
                timestamp_ms: time_ms,
                standby: false,
                source: EventSource::Webhook,
                received_at_ms,
                event: raw.to_owned(),
            });
        }
    }
    Ok(events)
}

/// How deeply the arrays and objects of a JSON text nest (brackets inside strings do not
/// count). One pass over the bytes, before anything is parsed.
fn nesting_depth(body: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// An entry's Page id as text: a string as it reads, a number in its JSON form, anything else
/// empty.
fn page_id_text(id: &RawValue) -> String {
    if let Ok(plain) = serde_json::from_str::<&str>(id.get()) {
        return plain.to_string();
    }
    // Escaped, a number, or not an id at all.
    match serde_json::from_str::<Value>(id.get()) {
        Ok(Value::String(id)) => id,
        Ok(Value::Number(id)) => id.to_string(),
        _ => String::new(),
    }
}

/// Identity, kind, conversation partner and time of one messaging event.
pub fn describe_messaging_event(
    page_id: &str,
    raw: Box<RawValue>,
    received_at_ms: i64,
) -> EventMessage {
    let facts = EventFacts::of_raw(page_id, &raw);
    EventMessage {
        page_id: page_id.to_string(),
        kind: facts.kind,
        event_id: facts.identity,
        user_psid: facts.user_psid,
        timestamp_ms: facts.timestamp_ms,
        standby: false,
        source: EventSource::Webhook,
        received_at_ms,
        event: raw,
    }
}
