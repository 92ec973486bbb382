//! The event model: a webhook delivery split into one [`EventMessage`] per event, each with a
//! stable identity so every later stage can de-duplicate.
//!
//! Events keep the exact JSON text Facebook sent ([`RawValue`]): the bucket stores them as they
//! came. Identity (the storage contract in docs/ARCHITECTURE.md): `message.mid` for messages and
//! echoes, `postback.mid`, `reaction.mid` + action + emoji + timestamp for reactions (each
//! reaction event is kept), `message_edit.mid` + `num_edit` for edits (each version kept), kind
//! + watermark for deliveries and reads, and a hash of the canonical JSON for anything else.
//!
//! Ingest splits every delivery, so the split reads only what it needs: the envelope borrows
//! from the body (`&RawValue` for `object`, `id` and each event) and a messaging event's facts
//! come from the few keys that decide them ([`EventFacts::of_raw`]), without building a
//! `serde_json::Value` of the event. Whatever that reading cannot be sure of (a key given twice,
//! an identity that falls back to the hash, an escaped Page id) goes through the `Value` path,
//! which stays the one definition: both give the same facts for every event.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// The queue a message goes to; one durable queue per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Messenger events that end up in a conversation file.
    Conversation,
    /// Page field changes: refresh `page_data.json`.
    PageChange,
    /// Graph API polls of a Page's metadata and conversations ([`PollRequest`]).
    Poll,
    /// The owners' jobs: onboard a Page connected through Facebook Login, delete a user's
    /// data (see `queue::owner_jobs`).
    Onboard,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [
        JobKind::Conversation,
        JobKind::PageChange,
        JobKind::Poll,
        JobKind::Onboard,
    ];

    /// The routing key and queue suffix of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Conversation => "conversation",
            JobKind::PageChange => "page_change",
            JobKind::Poll => "poll",
            JobKind::Onboard => "onboard",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// What an event is, as far as storage cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Message,
    Echo,
    Delivery,
    Read,
    Postback,
    Reaction,
    /// A new version of a message's text (`message_edit`, with `num_edit`).
    Edit,
    Referral,
    Optin,
    Handover,
    /// A messaging event of a kind this version does not name; stored all the same.
    Other,
    PageChange,
}

impl EventKind {
    /// Every kind, in declaration order (`kind as usize` indexes this).
    pub const ALL: [EventKind; 12] = [
        EventKind::Message,
        EventKind::Echo,
        EventKind::Delivery,
        EventKind::Read,
        EventKind::Postback,
        EventKind::Reaction,
        EventKind::Edit,
        EventKind::Referral,
        EventKind::Optin,
        EventKind::Handover,
        EventKind::Other,
        EventKind::PageChange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Echo => "echo",
            EventKind::Delivery => "delivery",
            EventKind::Read => "read",
            EventKind::Postback => "postback",
            EventKind::Reaction => "reaction",
            EventKind::Edit => "edit",
            EventKind::Referral => "referral",
            EventKind::Optin => "optin",
            EventKind::Handover => "handover",
            EventKind::Other => "other",
            EventKind::PageChange => "page_change",
        }
    }

    pub fn job_kind(self) -> JobKind {
        match self {
            EventKind::PageChange => JobKind::PageChange,
            _ => JobKind::Conversation,
        }
    }
}

/// Where an event came from; a webhook copy wins over a polled reconstruction of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    #[default]
    Webhook,
    Poll,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Webhook => "webhook",
            EventSource::Poll => "poll",
        }
    }
}

/// Staged rows hold the source as text.
impl TryFrom<String> for EventSource {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "webhook" => Ok(EventSource::Webhook),
            "poll" => Ok(EventSource::Poll),
            other => Err(format!("unknown event source {other:?}")),
        }
    }
}

/// One queue message: one event of one Page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventMessage {
    /// The Page the event belongs to (`entry[].id`).
    pub page_id: String,
    /// What the event is; decides the queue and the identity rule.
    pub kind: EventKind,
    /// Stable identity, equal for every copy of the same event.
    pub event_id: String,
    /// The person on the other side; names the conversation file. `None` when the event names
    /// nobody (such an event is malformed for a conversation).
    pub user_psid: Option<String>,
    /// Event time in milliseconds; the sort key of a conversation.
    pub timestamp_ms: i64,
    /// Delivered in the `standby` channel (another app had the thread).
    #[serde(default)]
    pub standby: bool,
    /// Webhook or poll.
    #[serde(default)]
    pub source: EventSource,
    /// When ingest accepted it, for the visibility-delay figures.
    pub received_at_ms: i64,
    /// The event exactly as Facebook sent it.
    pub event: Box<RawValue>,
}

/// A poll job (the body of a `poll` queue message): read one Page's metadata and conversations
/// from the Graph API and stage what is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollRequest {
    /// The Page to poll.
    pub page_id: String,
    /// Read the whole history, not only conversations updated since the last complete poll
    /// (a newly connected Page, `fbsync poll --backfill`).
    #[serde(default)]
    pub backfill: bool,
    /// Who asked (`scheduler`, `operator`, `onboarding`), for logs and dead letters.
    pub requested_by: String,
    /// When it was asked.
    pub requested_at_ms: i64,
}

/// Why a delivery body was refused (answered 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("object is {0:?}, not \"page\"")]
    NotPage(String),
}

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
    #[serde(default)]
    time: Option<i64>,
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
    let mut events = Vec::with_capacity(events);
    for entry in delivery.entry {
        let page_id = page_id_text(entry.id);
        let streams = [(entry.messaging, false), (entry.standby, true)];
        for (raw_events, standby) in streams {
            for raw in raw_events {
                let mut message =
                    describe_messaging_event(&page_id, raw.to_owned(), received_at_ms);
                message.standby = standby;
                events.push(message);
            }
        }
        for raw in entry.changes {
            let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            let time_ms = entry.time.unwrap_or(0).saturating_mul(1000);
            let identity =
                canonical_hash(&serde_json::json!({ "time": entry.time, "change": value }));
            events.push(EventMessage {
                page_id: page_id.clone(),
                kind: EventKind::PageChange,
                event_id: format!("change:{identity}"),
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

/// What the merge needs to know about a messaging event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFacts {
    pub kind: EventKind,
    pub identity: String,
    pub user_psid: Option<String>,
    pub timestamp_ms: i64,
}

impl EventFacts {
    /// Reads the facts of a messaging event (webhook or polled shape) of `page_id`.
    pub fn of(page_id: &str, event: &Value) -> Self {
        let str_at = |path: &[&str]| -> Option<String> {
            let mut node = event;
            for key in path {
                node = node.get(key)?;
            }
            scalar_text(node)
        };
        let sender = str_at(&["sender", "id"]);
        let recipient = str_at(&["recipient", "id"]);
        // The conversation is named after whoever is not the Page.
        let user_psid = match (sender, recipient) {
            (Some(s), _) if s != page_id => Some(s),
            (_, Some(r)) if r != page_id => Some(r),
            _ => None,
        };
        let timestamp_ms = event.get("timestamp").and_then(Value::as_i64).unwrap_or(0);
        let (kind, identity) = if let Some(message) = event.get("message") {
            let is_echo = message
                .get("is_echo")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let kind = if is_echo {
                EventKind::Echo
            } else {
                EventKind::Message
            };
            match str_at(&["message", "mid"]) {
                Some(mid) => (kind, format!("mid:{mid}")),
                None => (kind, format!("hash:{}", canonical_hash(event))),
            }
        } else if event.get("postback").is_some() {
            match str_at(&["postback", "mid"]) {
                Some(mid) => (EventKind::Postback, format!("postback:{mid}")),
                None => (
                    EventKind::Postback,
                    format!("hash:{}", canonical_hash(event)),
                ),
            }
        } else if event.get("reaction").is_some() {
            // Every reaction event is kept: react, unreact and react again are three events.
            // The timestamp tells them apart; a retried delivery carries the same one.
            match str_at(&["reaction", "mid"]) {
                Some(mid) => {
                    let action = str_at(&["reaction", "action"]).unwrap_or_default();
                    let emoji = str_at(&["reaction", "reaction"]).unwrap_or_default();
                    (
                        EventKind::Reaction,
                        format!("reaction:{mid}:{action}:{emoji}:{timestamp_ms}"),
                    )
                }
                None => (
                    EventKind::Reaction,
                    format!("hash:{}", canonical_hash(event)),
                ),
            }
        } else if event.get("message_edit").is_some() {
            // Each version of a message is kept once: the mid and the edit's number name it.
            match (
                str_at(&["message_edit", "mid"]),
                str_at(&["message_edit", "num_edit"]),
            ) {
                (Some(mid), Some(num_edit)) => (EventKind::Edit, format!("edit:{mid}:{num_edit}")),
                _ => (EventKind::Edit, format!("hash:{}", canonical_hash(event))),
            }
        } else if let Some(watermark) = event.get("delivery").and_then(|d| d.get("watermark")) {
            (EventKind::Delivery, format!("delivery:{watermark}"))
        } else if let Some(watermark) = event.get("read").and_then(|d| d.get("watermark")) {
            (EventKind::Read, format!("read:{watermark}"))
        } else {
            let kind = if event.get("referral").is_some() {
                EventKind::Referral
            } else if event.get("optin").is_some() {
                EventKind::Optin
            } else if [
                "pass_thread_control",
                "take_thread_control",
                "request_thread_control",
                "app_roles",
            ]
            .iter()
            .any(|key| event.get(key).is_some())
            {
                EventKind::Handover
            } else {
                EventKind::Other
            };
            (kind, format!("hash:{}", canonical_hash(event)))
        };
        EventFacts {
            kind,
            identity,
            user_psid,
            timestamp_ms,
        }
    }

    /// The same facts as [`EventFacts::of`], read from the event's text: the keys that decide
    /// them, without a `Value` of the whole event when it has the usual shape.
    pub fn of_raw(page_id: &str, event: &RawValue) -> Self {
        Self::of_keys(page_id, event).unwrap_or_else(|| {
            let value: Value = serde_json::from_str(event.get()).unwrap_or(Value::Null);
            Self::of(page_id, &value)
        })
    }

    /// [`EventFacts::of`]'s rules on the deciding keys alone; `None` for an event these cannot
    /// settle (not an object, a key given twice, an identity that is a hash).
    fn of_keys(page_id: &str, event: &RawValue) -> Option<Self> {
        let keys: EventKeys = keys_of(Some(event))??;
        let id_of = |party: Option<&RawValue>| -> Option<Option<String>> {
            Some(keys_of::<InnerKeys>(party)?.and_then(|party| text_of(party.id)))
        };
        let sender = id_of(keys.sender)?;
        let recipient = id_of(keys.recipient)?;
        let user_psid = match (sender, recipient) {
            (Some(s), _) if s != page_id => Some(s),
            (_, Some(r)) if r != page_id => Some(r),
            _ => None,
        };
        let timestamp_ms = value_of(keys.timestamp)
            .as_ref()
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let (kind, identity) = if keys.message.is_some() {
            let message = keys_of::<InnerKeys>(keys.message)??;
            let is_echo = value_of(message.is_echo)
                .as_ref()
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let kind = if is_echo {
                EventKind::Echo
            } else {
                EventKind::Message
            };
            (kind, format!("mid:{}", text_of(message.mid)?))
        } else if keys.postback.is_some() {
            let postback = keys_of::<InnerKeys>(keys.postback)??;
            (
                EventKind::Postback,
                format!("postback:{}", text_of(postback.mid)?),
            )
        } else if keys.reaction.is_some() {
            let reaction = keys_of::<InnerKeys>(keys.reaction)??;
            let mid = text_of(reaction.mid)?;
            let action = text_of(reaction.action).unwrap_or_default();
            let emoji = text_of(reaction.reaction).unwrap_or_default();
            (
                EventKind::Reaction,
                format!("reaction:{mid}:{action}:{emoji}:{timestamp_ms}"),
            )
        } else if keys.message_edit.is_some() {
            let edit = keys_of::<InnerKeys>(keys.message_edit)??;
            let (mid, num_edit) = (text_of(edit.mid)?, text_of(edit.num_edit)?);
            (EventKind::Edit, format!("edit:{mid}:{num_edit}"))
        } else if let Some(watermark) =
            keys_of::<InnerKeys>(keys.delivery)?.and_then(|d| d.watermark)
        {
            (
                EventKind::Delivery,
                format!("delivery:{}", value_of(Some(watermark))?),
            )
        } else if let Some(watermark) = keys_of::<InnerKeys>(keys.read)?.and_then(|d| d.watermark) {
            (
                EventKind::Read,
                format!("read:{}", value_of(Some(watermark))?),
            )
        } else {
            // Anything else is named by its hash, over the whole event.
            return None;
        };
        Some(EventFacts {
            kind,
            identity,
            user_psid,
            timestamp_ms,
        })
    }
}

/// The text of an identity part: a string as it reads, a number in its JSON form; `None` for
/// anything else.
fn scalar_text(node: &Value) -> Option<String> {
    match node {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The keys of a messaging event that decide its facts, as their JSON text. `None` means the
/// key is absent; a `null` is present (the `Value` path tells `"message": null` from no
/// message). A key given twice fails the read, and the caller falls back to the `Value` path
/// (which keeps the last).
#[derive(Deserialize)]
struct EventKeys<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    sender: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    recipient: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    message: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    postback: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    reaction: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    message_edit: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    delivery: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    read: Option<&'a RawValue>,
}

/// The keys one level down that the facts read (`sender.id`, `message.mid`, `reaction.action`,
/// `delivery.watermark`, ...), one struct for every parent: a parent only reads its own.
#[derive(Deserialize)]
struct InnerKeys<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    mid: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    is_echo: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    action: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    reaction: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    num_edit: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    watermark: Option<&'a RawValue>,
}

/// A key that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// The keys of `raw` when it is an object; `Some(None)` when it is absent or not an object
/// (looking a key up in it finds nothing, as `Value::get` does); `None` when it cannot be read
/// this way (a key given twice), for the caller to fall back.
fn keys_of<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<Option<T>> {
    match raw {
        // Only an object: a struct would also read an array, by position.
        Some(raw) if raw.get().starts_with('{') => serde_json::from_str(raw.get()).ok().map(Some),
        _ => Some(None),
    }
}

/// The value of a key's text (scalars here: no allocation but a string's).
fn value_of(raw: Option<&RawValue>) -> Option<Value> {
    serde_json::from_str(raw?.get()).ok()
}

/// [`scalar_text`] of a key's text.
fn text_of(raw: Option<&RawValue>) -> Option<String> {
    scalar_text(&value_of(raw)?)
}

/// SHA-256 of the JSON with object keys sorted at every level, so two copies of the same event
/// hash alike whatever their key order or escaping.
pub fn canonical_hash(value: &Value) -> String {
    fn write_canonical(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write_canonical(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_canonical(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    write_canonical(value, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "510249619162304";
    const USER: &str = "1066835436691078";

    /// A webhook delivery from the repository's tests/fixtures/messenger, byte for byte.
    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../tests/fixtures/messenger/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    #[test]
    fn a_kind_as_a_number_is_its_place_in_the_list_of_all_kinds() {
        for (place, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, place, "{kind:?}");
        }
    }

    #[test]
    fn every_fixture_splits_into_one_event_of_the_right_kind() {
        let cases = [
            (
                "message.json",
                EventKind::Message,
                "mid:mid.1468152703527:6600c706f15a292027",
            ),
            (
                "echo.json",
                EventKind::Echo,
                "mid:mid.1468152706286:e7982eb7618034a075",
            ),
            (
                "delivery.json",
                EventKind::Delivery,
                "delivery:1468152706921",
            ),
            ("read.json", EventKind::Read, "read:1468152706921"),
            (
                "quick_reply.json",
                EventKind::Message,
                "mid:mid.1457764197618:41d102a3e1ae206a38",
            ),
        ];
        for (name, kind, id) in cases {
            let events = split_delivery(&fixture(name), 1).expect(name);
            assert_eq!(events.len(), 1, "{name}");
            assert_eq!(events[0].kind, kind, "{name}");
            assert_eq!(events[0].event_id, id, "{name}");
            assert_eq!(events[0].user_psid.as_deref(), Some(USER), "{name}");
            assert_eq!(events[0].page_id, PAGE);
        }
        let postback = split_delivery(&fixture("postback.json"), 1).expect("postback");
        assert_eq!(postback[0].kind, EventKind::Postback);
        assert!(postback[0].event_id.starts_with("hash:"));
        let change = split_delivery(&fixture("page_change.json"), 1).expect("change");
        assert_eq!(change[0].kind, EventKind::PageChange);
        assert_eq!(change[0].kind.job_kind(), JobKind::PageChange);
    }

    #[test]
    fn raw_event_text_is_kept_byte_for_byte() {
        let events = split_delivery(&fixture("echo.json"), 1).expect("echo");
        assert!(events[0].event.get().contains(r"abecad\u0142o"));
    }

    #[test]
    fn a_batch_gives_one_message_per_event() {
        let body = r#"{"object":"page","entry":[
              {"id":"1","time":1,"messaging":[
                 {"sender":{"id":"u1"},"recipient":{"id":"1"},"timestamp":5,"message":{"mid":"m1","text":"a"}},
                 {"sender":{"id":"u2"},"recipient":{"id":"1"},"timestamp":6,"message":{"mid":"m2","text":"b"}}]},
              {"id":"2","time":1,"standby":[
                 {"sender":{"id":"u3"},"recipient":{"id":"2"},"timestamp":7,"message":{"mid":"m3","text":"c"}}],
               "changes":[{"field":"name","value":"x"}]}]}"#.to_string();
        let events = split_delivery(body.as_bytes(), 1).expect("valid");
        let ids: Vec<_> = events
            .iter()
            .map(|e| (e.page_id.as_str(), e.event_id.as_str(), e.standby))
            .collect();
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[0], ("1", "mid:m1", false));
        assert_eq!(ids[2], ("2", "mid:m3", true));
        assert!(ids[3].1.starts_with("change:"));
    }

    #[test]
    fn bad_bodies_are_refused() {
        assert!(matches!(
            split_delivery(b"nope", 1),
            Err(DeliveryError::NotJson(_))
        ));
        assert_eq!(
            split_delivery(br#"{"object":"user","entry":[]}"#, 1).err(),
            Some(DeliveryError::NotPage("\"user\"".into()))
        );
    }

    /// The keys-only reading gives the `Value` path's facts for every shape, and settles the
    /// usual ones by itself.
    #[test]
    fn facts_from_the_text_are_the_facts_from_the_value() {
        let usual = [
            r#"{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":5,"message":{"mid":"m","text":"a"}}"#,
            r#"{"sender":{"id":"p"},"recipient":{"id":"u"},"timestamp":5,"message":{"mid":"m","is_echo":true}}"#,
            r#"{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":5,"message":{"mid":"\u0041b","is_echo":"true"}}"#,
            r#"{"sender":{"id":7},"recipient":{"id":1.5},"timestamp":5.5,"message":{"mid":12}}"#,
            r#"{"sender":{"id":null},"recipient":["p"],"timestamp":"5","message":{"mid":"m"}}"#,
            r#"{"sender":{"id":"p"},"recipient":{"id":"p"},"message":{"mid":"m"},"postback":{}}"#,
            r#"{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":9,"postback":{"mid":"pb","title":"x"}}"#,
            r#"{"sender":{"id":"u"},"timestamp":9,"reaction":{"mid":"m","action":"react","reaction":"love"}}"#,
            r#"{"sender":{"id":"u"},"timestamp":9,"reaction":{"mid":"m","reaction":{"x":1}}}"#,
            r#"{"sender":{"id":"u"},"message_edit":{"mid":"m","num_edit":2}}"#,
            r#"{"sender":{"id":"u"},"delivery":{"mids":["a"],"watermark":1468152706921}}"#,
            r#"{"sender":{"id":"u"},"delivery":{"watermark":"1e3"}}"#,
            r#"{"sender":{"id":"u"},"delivery":{"watermark":null}}"#,
            r#"{"sender":{"id":"u"},"delivery":{"watermark":{"b":1, "a":[2]}}}"#,
            r#"{"sender":{"id":"u"},"delivery":[1],"read":{"watermark":1e3}}"#,
            r#"{"sender":{"id":"u"},"delivery":{"seq":1},"read":{"watermark":-0}}"#,
        ];
        let unusual = [
            r#"{"sender":{"id":"u"},"message":null}"#,
            r#"{"sender":{"id":"u"},"message":"m"}"#,
            r#"{"sender":{"id":"u"},"message":["m"]}"#,
            r#"{"sender":{"id":"u"},"message":{"text":"no mid"}}"#,
            r#"{"sender":{"id":"u"},"message":{"mid":"a"},"message":{"mid":"b"}}"#,
            r#"{"sender":{"id":"u"},"message":{"mid":"a","mid":"b"}}"#,
            r#"{"sender":{"id":"u"},"sender":{"id":"v"},"message":{"mid":"a"}}"#,
            r#"{"sender":{"id":"u","id":"v"},"message":{"mid":"a"}}"#,
            r#"{"sender":{"id":"u"},"postback":{"title":"no mid"}}"#,
            r#"{"sender":{"id":"u"},"postback":null}"#,
            r#"{"sender":{"id":"u"},"reaction":{"action":"react"}}"#,
            r#"{"sender":{"id":"u"},"message_edit":{"mid":"m"}}"#,
            r#"{"sender":{"id":"u"},"delivery":{"seq":1}}"#,
            r#"{"sender":{"id":"u"},"referral":{"ref":"x"}}"#,
            r#"{"sender":{"id":"u"},"optin":{"ref":"x"}}"#,
            r#"{"sender":{"id":"u"},"pass_thread_control":{}}"#,
            r#"{"sender":{"id":"u"},"something_new":{}}"#,
            r#"["sender","message"]"#,
            r#"{}"#,
            r#"null"#,
            r#"3"#,
        ];
        let fixtures = [
            "message.json",
            "echo.json",
            "delivery.json",
            "read.json",
            "quick_reply.json",
            "postback.json",
            "message_edit.json",
        ];
        let mut fixture_events = Vec::new();
        for name in fixtures {
            let body: Value = serde_json::from_slice(&fixture(name)).expect(name);
            for event in body["entry"][0]["messaging"].as_array().expect(name) {
                fixture_events.push(event.to_string());
            }
        }
        let all = usual
            .iter()
            .chain(&unusual)
            .map(|text| text.to_string())
            .chain(fixture_events);
        for text in all {
            let raw = RawValue::from_string(text.clone()).expect("valid JSON");
            let value: Value = serde_json::from_str(&text).expect("valid JSON");
            for page in [PAGE, "p", "u"] {
                assert_eq!(
                    EventFacts::of_raw(page, &raw),
                    EventFacts::of(page, &value),
                    "{text}"
                );
            }
        }
        for text in usual {
            let raw = RawValue::from_string(text.to_string()).expect("valid JSON");
            assert!(EventFacts::of_keys("p", &raw).is_some(), "{text}");
        }
        for text in unusual {
            let raw = RawValue::from_string(text.to_string()).expect("valid JSON");
            assert!(EventFacts::of_keys("p", &raw).is_none(), "{text}");
        }
    }

    #[test]
    fn envelopes_read_as_before() {
        let split = |body: &str| split_delivery(body.as_bytes(), 1);
        let ids = |body: &str| -> Vec<String> {
            split(body)
                .expect(body)
                .into_iter()
                .map(|e| e.page_id)
                .collect()
        };
        assert_eq!(
            ids(
                r#"{"object":"page","entry":[{"id":"1","messaging":[{}]},{"id":2,"changes":[{}]},{"id":"\u0033","standby":[{}]},{"id":null,"messaging":[{}]}]}"#
            ),
            ["1", "2", "3", ""]
        );
        assert_eq!(
            ids(r#"{"object":"p\u0061ge","entry":[]}"#),
            Vec::<String>::new()
        );
        assert_eq!(ids(r#"{"object":"page"}"#), Vec::<String>::new());
        assert_eq!(
            split(r#"{"object":{"a": 1}}"#).err(),
            Some(DeliveryError::NotPage(r#"{"a":1}"#.into()))
        );
        for refused in [
            r#"{"entry":[]}"#,
            r#"{"object":"page","entry":[{"time":1}]}"#,
            r#"{"object":"page","object":"page"}"#,
            r#"{"object":"page","entry":null}"#,
            r#"{"object":"page","entry":[{"id":"1","messaging":null}]}"#,
        ] {
            assert!(
                matches!(split(refused), Err(DeliveryError::NotJson(_))),
                "{refused}"
            );
        }
    }

    #[test]
    fn canonical_hash_ignores_key_order_and_escapes() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":"\u00e4"}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"b":"ä","a":1}"#).expect("json");
        assert_eq!(canonical_hash(&a), canonical_hash(&b));
    }

    #[test]
    fn react_unreact_react_again_are_three_events_and_a_retry_is_one() {
        let reaction = |timestamp: i64, action: &str| {
            serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":timestamp,
                "reaction":{"mid":"m_1","action":action,"reaction":"love"}})
        };
        let ids: Vec<String> = [(1, "react"), (2, "unreact"), (3, "react")]
            .iter()
            .map(|(t, action)| EventFacts::of("p", &reaction(*t, action)).identity)
            .collect();
        assert_eq!(
            ids.iter().collect::<std::collections::HashSet<_>>().len(),
            3,
            "{ids:?}"
        );
        // Facebook retrying the same delivery: the same event, the same identity.
        assert_eq!(EventFacts::of("p", &reaction(1, "react")).identity, ids[0]);
        // Reactions without a mid do not collapse into one.
        let no_mid = |timestamp: i64| {
            serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":timestamp,
                "reaction":{"action":"react","reaction":"like"}})
        };
        assert_ne!(
            EventFacts::of("p", &no_mid(1)).identity,
            EventFacts::of("p", &no_mid(2)).identity
        );
    }

    #[test]
    fn each_edit_of_a_message_is_its_own_event() {
        let events = split_delivery(&fixture("message_edit.json"), 1).expect("edit");
        assert_eq!(events[0].kind, EventKind::Edit);
        assert_eq!(
            events[0].event_id,
            "edit:mid.1468152703527:6600c706f15a292027:1"
        );
        let edit = |num_edit: i64| {
            serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":num_edit,
                "message_edit":{"mid":"m_1","text":format!("v{num_edit}"),"num_edit":num_edit}})
        };
        assert_ne!(
            EventFacts::of("p", &edit(1)).identity,
            EventFacts::of("p", &edit(2)).identity
        );
        assert_ne!(
            EventFacts::of("p", &edit(1)).identity,
            EventFacts::of(
                "p",
                &serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},
                "timestamp":1,"message":{"mid":"m_1","text":"v0"}})
            )
            .identity,
            "the edit and the message are both kept"
        );
    }
}
