//! The owners' jobs on the `onboard` queue: ingest's owner routes publish them (the callbacks
//! answer at once), workers carry them out. Both are idempotent: a redelivery repeats nothing
//! that was done (a subscription already there is not made again, `page_data.json` is written
//! only when it changed, deleting what is gone is a no-op).

use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

use super::{Outgoing, Topology};
use crate::facebook::event::JobKind;

/// One job of the `onboard` queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum OwnerJob {
    /// A Page connected through Facebook Login: subscribe the app, write `page_data.json`,
    /// start the conversation backfill.
    OnboardPage {
        /// The Page (digits; checked again by the worker).
        page_id: String,
    },
    /// Meta's data-deletion request: delete the objects of its users.
    DeleteUserData {
        /// Names the request's row and status page.
        confirmation_code: String,
    },
}

impl OwnerJob {
    /// The queue message of this job.
    pub fn to_outgoing(&self, topology: &Topology) -> Outgoing {
        let (message_id, page_id) = match self {
            OwnerJob::OnboardPage { page_id } => (
                format!("onboard-{page_id}-{}", uuid::Uuid::new_v4()),
                page_id.as_str(),
            ),
            OwnerJob::DeleteUserData { confirmation_code } => {
                (format!("delete-{confirmation_code}"), "")
            }
        };
        let mut headers = FieldTable::default();
        if !page_id.is_empty() {
            headers.insert("page_id".into(), AMQPValue::LongString(page_id.into()));
        }
        Outgoing {
            exchange: topology.events_exchange(),
            routing_key: JobKind::Onboard.as_str().to_string(),
            body: serde_json::to_vec(self).expect("a job always serialises"),
            message_id,
            headers,
            expiration: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_go_to_the_onboard_queue_as_tagged_json() {
        let job = OwnerJob::OnboardPage {
            page_id: "42".into(),
        };
        let outgoing = job.to_outgoing(&Topology::new("t"));
        assert_eq!(outgoing.routing_key, "onboard");
        let body: serde_json::Value = serde_json::from_slice(&outgoing.body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"job": "onboard_page", "page_id": "42"})
        );
        let back: OwnerJob = serde_json::from_slice(&outgoing.body).expect("parses");
        assert_eq!(back, job);
    }
}
