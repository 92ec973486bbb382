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
//!
//! The rooms: `split.rs` splits a delivery, `facts.rs` reads an event's facts (both paths),
//! `identity.rs` is the one form of an event's identity; the tests are in `tests.rs`.

mod facts;
mod identity;
mod split;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use facts::EventFacts;
pub use identity::{Identity, canonical_hash};
pub use split::{describe_messaging_event, split_delivery};

/// What an event is, as far as storage cares.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
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
    pub const ALL: &'static [EventKind] = <EventKind as strum::VariantArray>::VARIANTS;

    /// The kind's name in queue messages, metrics and logs.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Where an event came from; a webhook copy wins over a polled reconstruction of it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    Default,
    strum::IntoStaticStr,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum EventSource {
    #[default]
    Webhook,
    Poll,
}

impl EventSource {
    /// The source's name in staged rows and logs.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Staged rows hold the source as text.
impl TryFrom<String> for EventSource {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
            .map_err(|_| format!("unknown event source {text:?}"))
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

/// Why a delivery body was refused (answered 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("object is {0:?}, not \"page\"")]
    NotPage(String),
    /// Nested deeper than [`MAX_JSON_DEPTH`]: the worker could not read such an event back to
    /// merge it, so it is refused here rather than accepted and lost.
    #[error("the body nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
    /// More events than [`MAX_EVENTS_PER_DELIVERY`].
    #[error("the body holds {0} events, more than {MAX_EVENTS_PER_DELIVERY}")]
    TooManyEvents(usize),
    /// A Page id or a person's id that is not one: it would name an object and travel in a
    /// queue header.
    #[error("{0}")]
    BadId(#[from] crate::ids::InvalidId),
}

/// The deepest nesting of arrays and objects a delivery may have: Facebook's are about 8 deep,
/// and an event must stay well within the 128 levels the worker's JSON reader allows once it
/// sits in a conversation file.
pub const MAX_JSON_DEPTH: usize = 64;

/// The most events one delivery may carry: twice the 1,000 updates Facebook batches at most.
pub const MAX_EVENTS_PER_DELIVERY: usize = 2000;

#[cfg(test)]
mod tests;
