//! A Page's conversations from the Graph API, and the seed's reconstruction of a polled message
//! as a Messenger event.
//!
//! `GET /{page-id}/conversations?platform=messenger` answers pages of conversations, newest
//! update first, each with its most recent messages nested; older messages are behind the
//! nested `paging.next`, and every level is followed until `paging.next` is absent (a short page
//! does not mean the end). The Graph API gives a message's details only for a conversation's 20
//! most recent messages: an older one comes without them, and asking for them answers an error.
//!
//! A polled message becomes the event the seed wrote: `sender`, `recipient`, `timestamp` (ms,
//! from `created_time`) and `message{mid, text}`, with `is_echo: true` when the Page sent it and
//! the Graph API's attachment objects, as they are, under `message.attachments`. Its identity
//! is the webhook's (`mid`), so a message that came both ways is stored once.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::event::EventFacts;
use super::graph::{GraphClient, GraphError};

/// Conversations per page of results (the Graph API's default).
pub const CONVERSATIONS_PER_PAGE: &str = "25";

/// A message's fields, nested and alone.
pub const MESSAGE_FIELDS: &str = "id,created_time,from,to,message,attachments";

/// One page of `/{page-id}/conversations`.
#[derive(Debug, Clone, Deserialize)]
pub struct ConversationsPage {
    #[serde(default)]
    pub data: Vec<Conversation>,
    #[serde(default)]
    pub paging: Option<Paging>,
}

/// One conversation with its most recent messages.
#[derive(Debug, Clone, Deserialize)]
pub struct Conversation {
    pub id: String,
    /// When the conversation last changed (Graph's time format).
    #[serde(default)]
    pub updated_time: Option<String>,
    #[serde(default)]
    pub messages: Option<MessagesPage>,
}

impl Conversation {
    /// `updated_time` in milliseconds; `None` when absent or unreadable.
    pub fn updated_ms(&self) -> Option<i64> {
        self.updated_time.as_deref().and_then(graph_time_ms)
    }
}

/// One page of a conversation's messages, newest first.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MessagesPage {
    #[serde(default)]
    pub data: Vec<GraphMessage>,
    #[serde(default)]
    pub paging: Option<Paging>,
}

/// A message as the Graph API gives it; without `from` when its details are withheld.
#[derive(Debug, Clone, Deserialize)]
pub struct GraphMessage {
    pub id: String,
    #[serde(default)]
    pub created_time: Option<String>,
    #[serde(default)]
    pub from: Option<Party>,
    #[serde(default)]
    pub to: Option<Parties>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub attachments: Option<Attachments>,
}

impl GraphMessage {
    /// Whether the answer carried the message's details (sender and time).
    pub fn has_details(&self) -> bool {
        self.from.is_some() && self.created_time.is_some()
    }

    /// `created_time` in milliseconds.
    pub fn created_ms(&self) -> Option<i64> {
        self.created_time.as_deref().and_then(graph_time_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Party {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Parties {
    #[serde(default)]
    pub data: Vec<Party>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Attachments {
    #[serde(default)]
    pub data: Vec<Value>,
}

/// Where the next page of results is.
#[derive(Debug, Clone, Deserialize)]
pub struct Paging {
    #[serde(default)]
    pub next: Option<String>,
}

impl Paging {
    pub fn next_of(paging: &Option<Paging>) -> Option<&str> {
        paging.as_ref().and_then(|p| p.next.as_deref())
    }
}

/// A polled message rebuilt as a Messenger event, ready to stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolledEvent {
    /// The person on the other side: names the conversation file.
    pub user_psid: String,
    /// The event's identity (`mid:<id>`), the webhook copy's too.
    pub event_id: String,
    pub timestamp_ms: i64,
    /// The event's JSON text.
    pub body: String,
}

/// The seed's event shape; fields serialise in this order.
#[derive(Serialize)]
struct EventShape<'a> {
    sender: Id<'a>,
    recipient: Id<'a>,
    timestamp: i64,
    message: MessageShape<'a>,
}

#[derive(Serialize)]
struct Id<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct MessageShape<'a> {
    mid: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_echo: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attachments: Option<&'a [Value]>,
}

/// Rebuilds a message of `page_id`'s conversation as an event; `None` when the message lacks
/// its details, or names nobody but the Page.
pub fn reconstruct(page_id: &str, message: &GraphMessage) -> Option<PolledEvent> {
    let sender = message.from.as_ref()?.id.as_str();
    let timestamp_ms = message.created_ms()?;
    let recipient = message
        .to
        .as_ref()
        .and_then(|to| to.data.iter().find(|p| p.id != sender).or(to.data.first()))
        .map(|p| p.id.as_str())?;
    let from_page = sender == page_id;
    let attachments = message
        .attachments
        .as_ref()
        .map(|a| a.data.as_slice())
        .filter(|a| !a.is_empty());
    let shape = EventShape {
        sender: Id { id: sender },
        recipient: Id { id: recipient },
        timestamp: timestamp_ms,
        message: MessageShape {
            mid: &message.id,
            text: message.message.as_deref().unwrap_or(""),
            is_echo: from_page.then_some(true),
            attachments,
        },
    };
    let body = serde_json::to_string(&shape).expect("the event shape serialises");
    let value: Value = serde_json::from_str(&body).expect("just serialised");
    let facts = EventFacts::of(page_id, &value);
    Some(PolledEvent {
        // A polled message is always with a person: one naming only the Page has no place.
        user_psid: facts
            .user_psid
            .filter(|thread| thread != crate::ids::PAGE_EVENTS_THREAD)?,
        event_id: facts.identity,
        timestamp_ms,
        body,
    })
}

/// Whether `event` has the shape [`reconstruct`] writes (`EventShape`): sender, recipient,
/// timestamp and a message with mid and text, maybe `is_echo`, and maybe the Graph API's
/// attachment objects (which, unlike a webhook's, have no `payload`). The merge lets a webhook
/// copy replace an event of this shape; the shape is defined and recognised here only.
pub fn is_polled_shape(event: &Value) -> bool {
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

/// Milliseconds since the epoch of a Graph time (`2022-07-12T19:11:07+0000`).
pub fn graph_time_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%z")
        .ok()
        .map(|t| t.timestamp_millis())
}

impl GraphClient {
    /// A page of the Page's Messenger conversations: the first, or the one `next` links to.
    pub async fn conversations(
        &self,
        page_id: &str,
        next: Option<&str>,
        token: &SecretString,
    ) -> Result<ConversationsPage, GraphError> {
        let answer = match next {
            Some(url) => self.get(url, &[], token).await?,
            None => {
                let fields = format!("id,updated_time,messages{{{MESSAGE_FIELDS}}}");
                let url = self.url(&format!("{page_id}/conversations"));
                let query = [
                    ("platform", "messenger"),
                    ("fields", fields.as_str()),
                    ("limit", CONVERSATIONS_PER_PAGE),
                ];
                self.get(&url, &query, token).await?
            }
        };
        parse_answer(answer, "conversations")
    }

    /// The page of a conversation's messages that `next` links to.
    pub async fn messages(
        &self,
        next: &str,
        token: &SecretString,
    ) -> Result<MessagesPage, GraphError> {
        parse_answer(self.get(next, &[], token).await?, "messages")
    }

    /// One message's details.
    pub async fn message(
        &self,
        message_id: &str,
        token: &SecretString,
    ) -> Result<GraphMessage, GraphError> {
        let url = self.url(message_id);
        let answer = self.get(&url, &[("fields", MESSAGE_FIELDS)], token).await?;
        parse_answer(answer, "message")
    }
}

fn parse_answer<T: for<'de> Deserialize<'de>>(answer: Value, what: &str) -> Result<T, GraphError> {
    serde_json::from_value(answer)
        .map_err(|e| GraphError::Permanent(format!("unexpected {what} answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "510249619162304";

    fn fixture() -> ConversationsPage {
        let text = include_str!("../../../tests/fixtures/graph/conversations.json");
        serde_json::from_str(text).expect("fixture parses")
    }

    #[test]
    fn a_polled_message_becomes_the_seeds_event_and_the_pages_own_is_an_echo() {
        let page = fixture();
        let messages = &page.data[0].messages.as_ref().expect("nested").data;
        let customer = reconstruct(PAGE, &messages[0]).expect("details");
        assert_eq!(customer.user_psid, "1066835436691078");
        assert_eq!(
            customer.event_id,
            format!("mid:{}", messages[0].id),
            "the webhook's identity"
        );
        assert_eq!(
            customer.body,
            format!(
                r#"{{"sender":{{"id":"1066835436691078"}},"recipient":{{"id":"{PAGE}"}},"timestamp":1714641238000,"message":{{"mid":"{}","text":"Is the blue mug still available?"}}}}"#,
                messages[0].id
            )
        );
        let reply = reconstruct(PAGE, &messages[1]).expect("details");
        assert_eq!(
            reply.user_psid, "1066835436691078",
            "named after the customer"
        );
        let value: Value = serde_json::from_str(&reply.body).expect("json");
        assert_eq!(value["message"]["is_echo"], true);
        assert_eq!(value["recipient"]["id"], "1066835436691078");
        assert!(Paging::next_of(&page.paging).is_some());
    }

    #[test]
    fn a_message_without_details_is_not_reconstructed_and_attachments_are_kept() {
        let bare: GraphMessage =
            serde_json::from_value(serde_json::json!({"id": "m_old"})).expect("parses");
        assert!(!bare.has_details());
        assert_eq!(reconstruct(PAGE, &bare), None);
        let with_image: GraphMessage = serde_json::from_value(serde_json::json!({
            "id": "m_img", "created_time": "2024-05-02T09:13:58+0000",
            "from": {"id": "42"}, "to": {"data": [{"id": PAGE}]}, "message": "",
            "attachments": {"data": [{"id": "a1", "mime_type": "image/jpeg",
                "image_data": {"url": "https://scontent.example.com/a1.jpg"}}]}
        }))
        .expect("parses");
        let event = reconstruct(PAGE, &with_image).expect("details");
        let value: Value = serde_json::from_str(&event.body).expect("json");
        assert_eq!(
            value["message"]["attachments"][0]["mime_type"],
            "image/jpeg"
        );
        assert_eq!(value["message"]["text"], "");
    }

    #[test]
    fn what_reconstruct_writes_is_recognised_as_the_polled_shape_and_a_webhook_event_is_not() {
        let page = fixture();
        for message in &page.data[0].messages.as_ref().expect("nested").data {
            if let Some(event) = reconstruct(PAGE, message) {
                let value: Value = serde_json::from_str(&event.body).expect("json");
                assert!(is_polled_shape(&value), "{}", event.body);
            }
        }
        let webhook = serde_json::json!({
            "sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": 1,
            "message": {"mid": "m", "text": "hi", "seq": 7}
        });
        assert!(!is_polled_shape(&webhook));
        let webhook_attachment = serde_json::json!({
            "sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": 1,
            "message": {"mid": "m", "attachments": [{"type": "image", "payload": {"url": "u"}}]}
        });
        assert!(!is_polled_shape(&webhook_attachment));
    }

    #[test]
    fn graph_times_are_read_as_milliseconds() {
        assert_eq!(graph_time_ms("1970-01-01T00:00:01+0000"), Some(1000));
        assert_eq!(
            graph_time_ms("2024-05-02T11:13:58+0200"),
            Some(1714641238000)
        );
        assert_eq!(graph_time_ms("yesterday"), None);
    }
}
