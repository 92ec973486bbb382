//! Dead letters: poison work parked in `<prefix>.dead` with its original body and why.
//!
//! The worker dead-letters on purpose (malformed event, unknown Page, token error, attempts
//! exhausted) by publishing a copy with the headers below and acking the original only after the
//! copy is confirmed. The broker dead-letters on its own after the delivery limit; those
//! messages carry `x-death` instead, and [`DeadLetterInfo::from_headers`] reads both.
//!
//! This module is the letter's format; [`sender`] sends letters from the consumers, and
//! [`operator_session`] is the operator's session on the queue (list, replay, purge).

pub mod operator_session;
pub mod sender;

use fbsync_shared::queue::{Outgoing, Topology};
use lapin::types::{AMQPValue, FieldTable};

pub const REASON: &str = "x-fbsync-reason";
pub const ERROR: &str = "x-fbsync-error";
pub const ATTEMPTS: &str = "x-fbsync-attempts";
pub const ROUTING_KEY: &str = "x-fbsync-routing-key";
pub const FIRST_FAILURE_MS: &str = "x-fbsync-first-failure-ms";
pub const LAST_FAILURE_MS: &str = "x-fbsync-last-failure-ms";

/// Why a message was dead-lettered.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumString, strum::EnumIter,
)]
#[strum(serialize_all = "snake_case")]
pub enum DeadReason {
    /// Not an event message, or an event that names no conversation.
    Malformed,
    /// The Page is not registered.
    UnknownPage,
    /// The Graph API refused the Page's token (190); the Page needs re-authorisation.
    TokenError,
    /// A transient failure that did not clear within the retry policy.
    AttemptsExhausted,
    /// The Graph API refused the request for another reason.
    GraphError,
    /// The broker's delivery limit (the message crashed or stalled its workers).
    DeliveryLimit,
    /// Staged for a Page that was removed before its events were stored; replay them once the
    /// Page is added again.
    PageRemoved,
}

impl DeadReason {
    /// The reason's name in the letter's `x-fbsync-reason` header and in metrics.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The reason a header names, if this version knows it.
    pub fn parse(text: &str) -> Option<Self> {
        text.parse().ok()
    }

    /// Every reason, in declaration order.
    pub fn all() -> impl Iterator<Item = DeadReason> {
        <DeadReason as strum::IntoEnumIterator>::iter()
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Everything a dead letter says about its failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    pub reason: DeadReason,
    /// The last error, without secrets.
    pub error: String,
    pub attempts: i64,
    /// Where the message came from; replay publishes it there again.
    pub routing_key: String,
    pub first_failure_ms: i64,
    pub last_failure_ms: i64,
}

impl DeadLetterInfo {
    pub fn new(
        reason: DeadReason,
        error: impl Into<String>,
        attempts: u32,
        routing_key: &str,
        first_failure_ms: i64,
        last_failure_ms: i64,
    ) -> Self {
        Self {
            reason,
            error: error.into(),
            attempts: i64::from(attempts),
            routing_key: routing_key.to_string(),
            first_failure_ms,
            last_failure_ms,
        }
    }

    /// Reads our headers, or the broker's `x-death` for its own dead letters.
    pub fn from_headers(headers: Option<&FieldTable>, fallback_routing_key: &str) -> Self {
        let table = headers.map(|h| h.inner().clone()).unwrap_or_default();
        let text = |name: &str| match table.get(name) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
            _ => None,
        };
        let number = |name: &str| match table.get(name) {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
            Some(AMQPValue::Timestamp(n)) => i64::try_from(*n).ok(),
            _ => None,
        };
        // A reason this version does not know is read as the broker's (from `x-death`).
        if let Some(reason) = text(REASON).and_then(|text| DeadReason::parse(&text)) {
            return Self {
                reason,
                error: text(ERROR).unwrap_or_default(),
                attempts: number(ATTEMPTS).unwrap_or(1),
                routing_key: text(ROUTING_KEY).unwrap_or_else(|| fallback_routing_key.to_string()),
                first_failure_ms: number(FIRST_FAILURE_MS).unwrap_or(0),
                last_failure_ms: number(LAST_FAILURE_MS).unwrap_or(0),
            };
        }
        // A broker dead letter: x-death is an array of tables, newest first.
        let death = match table.get("x-death") {
            Some(AMQPValue::FieldArray(deaths)) => {
                deaths.as_slice().first().and_then(|d| match d {
                    AMQPValue::FieldTable(t) => Some(t.inner().clone()),
                    _ => None,
                })
            }
            _ => None,
        }
        .unwrap_or_default();
        let death_text = |name: &str| match death.get(name) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        };
        let routing_key = match death.get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(|k| match k {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            }),
            _ => None,
        };
        let time_ms = match death.get("time") {
            Some(AMQPValue::Timestamp(seconds)) => i64::try_from(*seconds).unwrap_or(0) * 1000,
            _ => 0,
        };
        let attempts = match death.get("count") {
            Some(AMQPValue::LongLongInt(n)) => *n,
            _ => 1,
        };
        Self {
            reason: DeadReason::DeliveryLimit,
            error: death_text("reason")
                .map(|r| format!("broker dead-lettered it: {r}"))
                .unwrap_or_default(),
            attempts,
            routing_key: routing_key.unwrap_or_else(|| fallback_routing_key.to_string()),
            first_failure_ms: time_ms,
            last_failure_ms: time_ms,
        }
    }

    /// The headers that carry this information.
    pub fn to_headers(&self, original: Option<&FieldTable>) -> FieldTable {
        let mut headers = original.cloned().unwrap_or_default();
        let text = |value: &str| AMQPValue::LongString(value.into());
        headers.insert(REASON.into(), text(self.reason.as_str()));
        headers.insert(ERROR.into(), text(&truncate_chars(&self.error, 1000)));
        headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(self.attempts));
        headers.insert(ROUTING_KEY.into(), text(&self.routing_key));
        headers.insert(
            FIRST_FAILURE_MS.into(),
            AMQPValue::LongLongInt(self.first_failure_ms),
        );
        headers.insert(
            LAST_FAILURE_MS.into(),
            AMQPValue::LongLongInt(self.last_failure_ms),
        );
        headers
    }

    /// The dead-letter copy of a message with body `body`.
    pub fn to_outgoing(
        &self,
        topology: &Topology,
        body: &[u8],
        message_id: &str,
        original: Option<&FieldTable>,
    ) -> Outgoing {
        Outgoing {
            exchange: topology.dead(),
            routing_key: self.routing_key.clone(),
            body: body.to_vec(),
            message_id: message_id.to_string(),
            headers: self.to_headers(original),
            expiration: None,
        }
    }
}

/// The AMQP message id of a delivery (the event id ingest gave it), or empty.
pub fn message_id(properties: &lapin::BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default()
}

fn truncate_chars(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let info = DeadLetterInfo::new(
            DeadReason::UnknownPage,
            "page 1 is not registered",
            1,
            "conversation",
            10,
            20,
        );
        let headers = info.to_headers(None);
        assert_eq!(DeadLetterInfo::from_headers(Some(&headers), "x"), info);
    }

    #[test]
    fn reasons_keep_their_names_on_the_wire() {
        let names: Vec<&str> = DeadReason::all().map(DeadReason::as_str).collect();
        let documented = [
            "malformed",
            "unknown_page",
            "token_error",
            "attempts_exhausted",
            "graph_error",
            "delivery_limit",
            "page_removed",
        ];
        assert_eq!(
            names, documented,
            "letters in queues and dashboards use these"
        );
        for reason in DeadReason::all() {
            assert_eq!(DeadReason::parse(reason.as_str()), Some(reason));
        }
    }
}
