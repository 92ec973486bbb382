//! The event model: a webhook delivery split into one [`EventMessage`] per event, each with a
//! stable identity so every later stage can de-duplicate.
//!
//! Events keep the exact JSON text Facebook sent ([`RawValue`]): the bucket stores them as they
//! came. Identity (the storage contract in docs/ARCHITECTURE.md): `message.mid` for messages and
//! echoes, `postback.mid`, `reaction.mid` + action + emoji + timestamp for reactions (each
//! reaction event is kept), `message_edit.mid` + `num_edit` for edits (each version kept), kind
//! + watermark for deliveries and reads, and a hash of the canonical JSON for anything else.

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

#[derive(Deserialize)]
struct Delivery {
    object: Value,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    id: Value,
    #[serde(default)]
    time: Option<i64>,
    #[serde(default)]
    messaging: Vec<Box<RawValue>>,
    #[serde(default)]
    standby: Vec<Box<RawValue>>,
    #[serde(default)]
    changes: Vec<Box<RawValue>>,
}

/// Splits a delivery into its events: messaging, standby and page changes.
pub fn split_delivery(
    body: &[u8],
    received_at_ms: i64,
) -> Result<Vec<EventMessage>, DeliveryError> {
    let delivery: Delivery =
        serde_json::from_slice(body).map_err(|e| DeliveryError::NotJson(e.to_string()))?;
    match &delivery.object {
        Value::String(object) if object == "page" => {}
        other => return Err(DeliveryError::NotPage(other.to_string())),
    }
    let mut events = Vec::new();
    for entry in delivery.entry {
        let page_id = match &entry.id {
            Value::String(id) => id.clone(),
            Value::Number(id) => id.to_string(),
            _ => String::new(),
        };
        let streams = [(entry.messaging, false), (entry.standby, true)];
        for (raw_events, standby) in streams {
            for raw in raw_events {
                let mut message = describe_messaging_event(&page_id, raw, received_at_ms);
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
                event: raw,
            });
        }
    }
    Ok(events)
}

/// Identity, kind, conversation partner and time of one messaging event.
pub fn describe_messaging_event(
    page_id: &str,
    raw: Box<RawValue>,
    received_at_ms: i64,
) -> EventMessage {
    let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
    let facts = EventFacts::of(page_id, &value);
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
            match node {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
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
