//! The facts of one messaging event (kind, identity, conversation partner, time), read two
//! ways that give the same answer: from a `serde_json::Value` ([`EventFacts::of`], the one
//! definition) or from the few deciding keys of its text ([`EventFacts::of_raw`]), falling back
//! to the `Value` whenever the text cannot settle them.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::Digest;

use super::{EventKind, Identity};
use crate::ids::{PAGE_EVENTS_THREAD, USER_REF_PREFIX};

/// What the merge needs to know about a messaging event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFacts {
    pub kind: EventKind,
    /// The event's [`Identity`], in its one text form.
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
        let names_the_page = [&sender, &recipient]
            .iter()
            .any(|id| id.as_deref() == Some(page_id));
        // A person known by a plugin's `user_ref` only, or else the Page's own thread for an
        // event with the Page and no person (policy enforcement, app roles).
        let user_psid = conversation_partner(page_id, sender, recipient)
            .or_else(|| {
                [
                    &["sender", "user_ref"][..],
                    &["recipient", "user_ref"],
                    &["optin", "user_ref"],
                ]
                .iter()
                .find_map(|path| str_at(path))
                .map(|user_ref| user_ref_thread(&user_ref))
            })
            .or_else(|| names_the_page.then(|| PAGE_EVENTS_THREAD.to_string()));
        let timestamp_ms = event.get("timestamp").and_then(whole_number).unwrap_or(0);
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
                Some(mid) => (kind, Identity::Message { mid }),
                None => (kind, Identity::hash_of(event)),
            }
        } else if event.get("postback").is_some() {
            match str_at(&["postback", "mid"]) {
                Some(mid) => (EventKind::Postback, Identity::Postback { mid }),
                None => (EventKind::Postback, Identity::hash_of(event)),
            }
        } else if event.get("reaction").is_some() {
            // Every reaction event is kept: react, unreact and react again are three events.
            // The timestamp tells them apart; a retried delivery carries the same one.
            match str_at(&["reaction", "mid"]) {
                Some(mid) => {
                    let action = str_at(&["reaction", "action"]).unwrap_or_default();
                    let emoji = str_at(&["reaction", "reaction"]).unwrap_or_default();
                    let identity = Identity::Reaction {
                        mid,
                        action,
                        emoji,
                        timestamp_ms,
                    };
                    (EventKind::Reaction, identity)
                }
                None => (EventKind::Reaction, Identity::hash_of(event)),
            }
        } else if event.get("message_edit").is_some() {
            // Each version of a message is kept once: the mid and the edit's number name it.
            match (
                str_at(&["message_edit", "mid"]),
                str_at(&["message_edit", "num_edit"]),
            ) {
                (Some(mid), Some(num_edit)) => (EventKind::Edit, Identity::Edit { mid, num_edit }),
                _ => (EventKind::Edit, Identity::hash_of(event)),
            }
        } else if let Some(watermark) = event.get("delivery").and_then(|d| d.get("watermark")) {
            let watermark = watermark.to_string();
            (EventKind::Delivery, Identity::Delivery { watermark })
        } else if let Some(watermark) = event.get("read").and_then(|d| d.get("watermark")) {
            let watermark = watermark.to_string();
            (EventKind::Read, Identity::Read { watermark })
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
            (kind, Identity::hash_of(event))
        };
        EventFacts {
            kind,
            identity: identity.to_string(),
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
    pub(super) fn of_keys(page_id: &str, event: &RawValue) -> Option<Self> {
        let keys: EventKeys = keys_of(Some(event))??;
        let id_of = |party: Option<&RawValue>| -> Option<Option<String>> {
            Some(keys_of::<InnerKeys>(party)?.and_then(|party| text_of(party.id)))
        };
        let sender = id_of(keys.sender)?;
        let recipient = id_of(keys.recipient)?;
        // No person by id: `user_ref` and the Page's own thread are `of`'s to settle.
        let user_psid = Some(conversation_partner(page_id, sender, recipient)?);
        let timestamp_ms = value_of(keys.timestamp)
            .as_ref()
            .and_then(whole_number)
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
            let mid = text_of(message.mid)?;
            (kind, Identity::Message { mid })
        } else if keys.postback.is_some() {
            let postback = keys_of::<InnerKeys>(keys.postback)??;
            let mid = text_of(postback.mid)?;
            (EventKind::Postback, Identity::Postback { mid })
        } else if keys.reaction.is_some() {
            let reaction = keys_of::<InnerKeys>(keys.reaction)??;
            let mid = text_of(reaction.mid)?;
            let action = text_of(reaction.action).unwrap_or_default();
            let emoji = text_of(reaction.reaction).unwrap_or_default();
            let identity = Identity::Reaction {
                mid,
                action,
                emoji,
                timestamp_ms,
            };
            (EventKind::Reaction, identity)
        } else if keys.message_edit.is_some() {
            let edit = keys_of::<InnerKeys>(keys.message_edit)??;
            let (mid, num_edit) = (text_of(edit.mid)?, text_of(edit.num_edit)?);
            (EventKind::Edit, Identity::Edit { mid, num_edit })
        } else if let Some(watermark) =
            keys_of::<InnerKeys>(keys.delivery)?.and_then(|d| d.watermark)
        {
            let watermark = value_of(Some(watermark))?.to_string();
            (EventKind::Delivery, Identity::Delivery { watermark })
        } else if let Some(watermark) = keys_of::<InnerKeys>(keys.read)?.and_then(|d| d.watermark) {
            let watermark = value_of(Some(watermark))?.to_string();
            (EventKind::Read, Identity::Read { watermark })
        } else {
            // Anything else is named by its hash, over the whole event.
            return None;
        };
        Some(EventFacts {
            kind,
            identity: identity.to_string(),
            user_psid,
            timestamp_ms,
        })
    }
}

/// The text of an identity part: a string as it reads, a number in its JSON form; `None` for
/// anything else.
/// A time as Facebook writes it: an integer, or a number with a fraction (`1492414608999.0`,
/// as in bodies of other projects' test suites), whose whole part counts. The event's text keeps
/// the number as it was sent.
pub(super) fn whole_number(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && f.abs() < 9.0e18)
            .map(|f| f.trunc() as i64)
    })
}

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

/// Whom the conversation is named after: whoever of sender and recipient is not the Page. An id
/// that reads as one of the reserved thread names (the Page's own thread, a `user_ref` thread)
/// names nobody: it could otherwise write into another thread's file.
fn conversation_partner(
    page_id: &str,
    sender: Option<String>,
    recipient: Option<String>,
) -> Option<String> {
    let reserved = |id: &str| id == PAGE_EVENTS_THREAD || id.starts_with(USER_REF_PREFIX);
    match (sender, recipient) {
        (Some(s), _) if s != page_id => Some(s),
        (_, Some(r)) if r != page_id => Some(r),
        _ => None,
    }
    .filter(|partner| !reserved(partner))
}

/// The thread of a person a plugin names by `user_ref` only: `user_ref_<ref>` when the ref is
/// short and plain (letters, digits, `_`, `-`: it then reads in the bucket as it was set), else
/// `user_ref_` and the first 32 hex digits of its SHA-256, so a ref of any shape has a file and
/// one odd ref never stops a delivery.
fn user_ref_thread(user_ref: &str) -> String {
    let plain = format!("{USER_REF_PREFIX}{user_ref}");
    if crate::ids::Psid::parse(&plain).is_ok() {
        return plain;
    }
    let digest = sha2::Sha256::digest(user_ref.as_bytes());
    format!("{USER_REF_PREFIX}{}", &hex::encode(digest)[..32])
}
