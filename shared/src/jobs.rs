//! Jobs: every unit of work that travels on the broker, and its one wire codec.
//!
//! A [`Job`] is the message only; the worker's handlers (one per kind) say what is done with
//! it. Every job is encoded by [`Job::envelope`] and decoded by [`Job::decode`], and nowhere
//! else: ingest, the scheduler, the owner routes, the CLI and the worker all go through them, so
//! a body a role writes is a body every other role reads.
//!
//! [`JobKind`] names the queue a job travels on (`<prefix>.<kind>`, the routing key): the
//! owners' two jobs (onboarding a Page, deleting a user's data) share the `onboard` queue, so a
//! queue's body may hold several jobs, told apart by a `"job"` tag. The bodies are the ones the
//! queues have always carried, so letters dead-lettered by an earlier version replay:
//! - `conversation`, `page_change`: an [`EventMessage`];
//! - `poll`: a [`PollRequest`];
//! - `onboard`: `{"job": "onboard_page", "page_id": ..}` or
//!   `{"job": "delete_user_data", "confirmation_code": ..}`.

use serde::{Deserialize, Serialize};

use crate::facebook::event::{EventKind, EventMessage};
use crate::ids::PageId;

/// The queue a message goes to; one durable queue per kind.
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
    strum::EnumString,
    strum::VariantArray,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
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
    /// Every kind, in declaration order.
    pub const ALL: &'static [JobKind] = <JobKind as strum::VariantArray>::VARIANTS;

    /// The routing key and queue suffix of this kind.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The kind a queue name suffix names, if this version knows it.
    pub fn parse(name: &str) -> Option<Self> {
        name.parse().ok()
    }

    /// The queue an event of `kind` travels on.
    pub fn of_event(kind: EventKind) -> Self {
        match kind {
            EventKind::PageChange => JobKind::PageChange,
            _ => JobKind::Conversation,
        }
    }
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
    /// Read back to this time instead of the last complete poll's start: a reconciliation of a
    /// gap in the webhooks reads from the gap's start, no further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
}

/// One unit of work on the broker.
#[derive(Debug, Clone)]
pub enum Job {
    /// A Messenger event that ends up in a conversation file (staged in batches).
    Conversation(EventMessage),
    /// A Page field change: refresh the Page's `page_data.json`.
    PageChange(EventMessage),
    /// Poll one Page's metadata and conversations from the Graph API.
    Poll(PollRequest),
    /// A Page connected through Facebook Login: subscribe the app, write `page_data.json`,
    /// start the conversation backfill.
    OnboardPage(OnboardPage),
    /// Meta's data-deletion request: delete the objects of its users.
    DeleteUserData(DeleteUserData),
    /// The scheduler's periodic check of a Page's webhook subscription: subscribe it again
    /// (and poll the gap) when it was lost or lacks a field.
    CheckSubscription(CheckSubscription),
    /// Ingest refused deliveries for a while (the broker was away): poll every active Page
    /// back to the window's start, as Facebook's retries may have given up meanwhile.
    Reconcile(Reconcile),
}

/// The body of a reconciliation: the window in which deliveries may have been lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconcile {
    /// When the window began (ms): the polls read back to it.
    pub since_ms: i64,
    /// When it ended (ms).
    pub until_ms: i64,
}

/// The body of a subscription check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSubscription {
    /// The Page to check.
    pub page_id: PageId,
    /// The check period it belongs to (ms), so a redelivery is the same check.
    pub period_ms: i64,
}

/// The body of an onboarding job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnboardPage {
    /// The Page the owner connected.
    pub page_id: PageId,
}

/// The body of a data-deletion job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteUserData {
    /// Names the request's row and its status page.
    pub confirmation_code: String,
}

/// A job as the broker carries it, without the broker's types: the routing key, the message
/// id, the headers and the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The queue it goes to (its routing key on the events exchange).
    pub kind: JobKind,
    /// The AMQP message id: an event's identity, or a name that says what the job is.
    pub message_id: String,
    /// Headers for operators reading the queues (the Page, the event kind).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl Envelope {
    /// The message of one event, without taking it (ingest publishes the events it split and
    /// counts them afterwards): what [`Job::envelope`] gives for [`Job::of_event`].
    pub fn of_event(event: &EventMessage) -> Self {
        Envelope {
            kind: JobKind::of_event(event.kind),
            message_id: event.event_id.clone(),
            headers: vec![
                ("page_id", event.page_id.clone()),
                ("kind", event.kind.as_str().to_string()),
            ],
            body: event_body(event),
        }
    }
}

/// Why a body is not a job of its queue: the job is dead-lettered as `malformed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedJob(pub String);

/// The `onboard` queue's tagged body.
#[derive(Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
enum OwnerJobBody {
    OnboardPage { page_id: String },
    DeleteUserData { confirmation_code: String },
    CheckSubscription { page_id: String, period_ms: i64 },
    Reconcile { since_ms: i64, until_ms: i64 },
}

impl Job {
    /// The job of one event split from a webhook delivery: a page change or a conversation
    /// event, by its kind.
    pub fn of_event(event: EventMessage) -> Self {
        match JobKind::of_event(event.kind) {
            JobKind::PageChange => Job::PageChange(event),
            _ => Job::Conversation(event),
        }
    }

    /// The queue this job travels on.
    pub fn kind(&self) -> JobKind {
        match self {
            Job::Conversation(_) => JobKind::Conversation,
            Job::PageChange(_) => JobKind::PageChange,
            Job::Poll(_) => JobKind::Poll,
            Job::OnboardPage(_)
            | Job::DeleteUserData(_)
            | Job::CheckSubscription(_)
            | Job::Reconcile(_) => JobKind::Onboard,
        }
    }

    /// What the job is, for logs and spans (`onboard_page`, not the shared queue's name).
    pub fn name(&self) -> &'static str {
        match self {
            Job::Conversation(_) => "conversation",
            Job::PageChange(_) => "page_change",
            Job::Poll(_) => "poll",
            Job::OnboardPage(_) => "onboard_page",
            Job::DeleteUserData(_) => "delete_user_data",
            Job::CheckSubscription(_) => "check_subscription",
            Job::Reconcile(_) => "reconcile",
        }
    }

    /// The Page the job is about, when it names one.
    pub fn page_id(&self) -> Option<&str> {
        match self {
            Job::Conversation(event) | Job::PageChange(event) => Some(&event.page_id),
            Job::Poll(request) => Some(&request.page_id),
            Job::OnboardPage(job) => Some(job.page_id.as_str()),
            Job::DeleteUserData(_) => None,
            Job::CheckSubscription(job) => Some(job.page_id.as_str()),
            Job::Reconcile(_) => None,
        }
    }

    /// The message that carries this job.
    pub fn envelope(&self) -> Envelope {
        let kind = self.kind();
        match self {
            Job::Conversation(event) | Job::PageChange(event) => Envelope::of_event(event),
            Job::Poll(request) => Envelope {
                kind,
                message_id: format!(
                    "poll:{}:{}:{}",
                    request.page_id, request.requested_by, request.requested_at_ms
                ),
                headers: Vec::new(),
                body: to_json(request),
            },
            Job::OnboardPage(job) => Envelope {
                kind,
                message_id: format!("onboard-{}-{}", job.page_id, uuid::Uuid::new_v4()),
                headers: vec![("page_id", job.page_id.as_str().to_string())],
                body: to_json(&OwnerJobBody::OnboardPage {
                    page_id: job.page_id.as_str().to_string(),
                }),
            },
            Job::CheckSubscription(job) => Envelope {
                kind,
                message_id: format!("subscription:{}:{}", job.page_id, job.period_ms),
                headers: vec![("page_id", job.page_id.as_str().to_string())],
                body: to_json(&OwnerJobBody::CheckSubscription {
                    page_id: job.page_id.as_str().to_string(),
                    period_ms: job.period_ms,
                }),
            },
            Job::Reconcile(job) => Envelope {
                kind,
                message_id: format!("reconcile:{}:{}", job.since_ms, job.until_ms),
                headers: Vec::new(),
                body: to_json(&OwnerJobBody::Reconcile {
                    since_ms: job.since_ms,
                    until_ms: job.until_ms,
                }),
            },
            Job::DeleteUserData(job) => Envelope {
                kind,
                message_id: format!("delete-{}", job.confirmation_code),
                headers: Vec::new(),
                body: to_json(&OwnerJobBody::DeleteUserData {
                    confirmation_code: job.confirmation_code.clone(),
                }),
            },
        }
    }

    /// Reads the event of a conversation or page-change body (staging decodes conversation
    /// events in batches, straight to the event).
    pub fn decode_event(body: &[u8]) -> Result<EventMessage, MalformedJob> {
        serde_json::from_slice(body).map_err(|e| MalformedJob(format!("not an event message: {e}")))
    }

    /// Reads a body taken from the queue of `kind`.
    pub fn decode(kind: JobKind, body: &[u8]) -> Result<Self, MalformedJob> {
        let malformed = |what: &str, e: serde_json::Error| MalformedJob(format!("{what}: {e}"));
        match kind {
            JobKind::Conversation => Self::decode_event(body).map(Job::Conversation),
            JobKind::PageChange => Self::decode_event(body).map(Job::PageChange),
            JobKind::Poll => serde_json::from_slice(body)
                .map(Job::Poll)
                .map_err(|e| malformed("not a poll job", e)),
            JobKind::Onboard => {
                match serde_json::from_slice(body).map_err(|e| malformed("not an owner job", e))? {
                    OwnerJobBody::OnboardPage { page_id } => {
                        let page_id =
                            PageId::parse(&page_id).map_err(|e| MalformedJob(e.to_string()))?;
                        Ok(Job::OnboardPage(OnboardPage { page_id }))
                    }
                    OwnerJobBody::DeleteUserData { confirmation_code } => {
                        Ok(Job::DeleteUserData(DeleteUserData { confirmation_code }))
                    }
                    OwnerJobBody::CheckSubscription { page_id, period_ms } => {
                        let page_id =
                            PageId::parse(&page_id).map_err(|e| MalformedJob(e.to_string()))?;
                        Ok(Job::CheckSubscription(CheckSubscription {
                            page_id,
                            period_ms,
                        }))
                    }
                    OwnerJobBody::Reconcile { since_ms, until_ms } => {
                        Ok(Job::Reconcile(Reconcile { since_ms, until_ms }))
                    }
                }
            }
        }
    }
}

/// A value as JSON; the job bodies are plain structs of strings and numbers.
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("a job body always serialises")
}

/// An event message's JSON body in one allocation: the event's text and room for the fields
/// around it (ingest writes one per event it accepts).
fn event_body(event: &EventMessage) -> Vec<u8> {
    /// The field names, the kind, the source and the numbers: under 200 bytes.
    const AROUND: usize = 200;
    let size = event.event.get().len()
        + event.page_id.len()
        + event.event_id.len()
        + event.user_psid.as_ref().map_or(0, String::len)
        + AROUND;
    let mut body = Vec::with_capacity(size);
    serde_json::to_writer(&mut body, event).expect("an event message always serialises");
    body
}

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
