use super::*;

use crate::facebook::event::describe_messaging_event;
use serde_json::value::RawValue;

fn event(raw: &str) -> EventMessage {
    let raw = RawValue::from_string(raw.to_string()).expect("json");
    describe_messaging_event("42", raw, 7)
}

#[test]
fn every_job_decodes_from_its_own_envelope() {
    let jobs = [
        Job::of_event(event(
            r#"{"sender":{"id":"9"},"message":{"mid":"m.1"},"timestamp":1}"#,
        )),
        Job::Poll(PollRequest {
            page_id: "42".into(),
            backfill: true,
            requested_by: "operator".into(),
            requested_at_ms: 5,
            since_ms: None,
        }),
        Job::Reconcile(Reconcile {
            since_ms: 1,
            until_ms: 2,
        }),
        Job::OnboardPage(OnboardPage {
            page_id: PageId::parse("42").expect("id"),
        }),
        Job::DeleteUserData(DeleteUserData {
            confirmation_code: "abc".into(),
        }),
        Job::CheckSubscription(CheckSubscription {
            page_id: PageId::parse("42").expect("id"),
            period_ms: 900_000,
        }),
    ];
    for job in jobs {
        let envelope = job.envelope();
        assert_eq!(envelope.kind, job.kind());
        let back = Job::decode(envelope.kind, &envelope.body).expect("decodes");
        assert_eq!(back.name(), job.name());
        assert_eq!(back.envelope().body, envelope.body, "{}", job.name());
    }
}

#[test]
fn owner_jobs_go_to_the_onboard_queue_as_tagged_json() {
    let job = Job::OnboardPage(OnboardPage {
        page_id: PageId::parse("42").expect("id"),
    });
    let envelope = job.envelope();
    assert_eq!(envelope.kind.as_str(), "onboard");
    let body: serde_json::Value = serde_json::from_slice(&envelope.body).expect("json");
    assert_eq!(
        body,
        serde_json::json!({"job": "onboard_page", "page_id": "42"})
    );
    assert!(envelope.message_id.starts_with("onboard-42-"));
    assert_eq!(envelope.headers, vec![("page_id", "42".to_string())]);
    let deletion = Job::DeleteUserData(DeleteUserData {
        confirmation_code: "abc".into(),
    })
    .envelope();
    let body: serde_json::Value = serde_json::from_slice(&deletion.body).expect("json");
    assert_eq!(
        body,
        serde_json::json!({"job": "delete_user_data", "confirmation_code": "abc"})
    );
    assert_eq!(deletion.message_id, "delete-abc");
    let check = Job::CheckSubscription(CheckSubscription {
        page_id: PageId::parse("42").expect("id"),
        period_ms: 900_000,
    })
    .envelope();
    assert_eq!(check.kind.as_str(), "onboard");
    assert_eq!(check.message_id, "subscription:42:900000");
}

#[test]
fn an_event_goes_to_the_queue_of_its_kind_with_its_identity_as_message_id() {
    let message = event(r#"{"sender":{"id":"9"},"message":{"mid":"m.1"},"timestamp":1}"#);
    let identity = message.event_id.clone();
    let envelope = Job::of_event(message).envelope();
    assert_eq!(envelope.kind, JobKind::Conversation);
    assert_eq!(envelope.message_id, identity);
    assert_eq!(
        envelope.headers,
        vec![
            ("page_id", "42".to_string()),
            ("kind", "message".to_string())
        ]
    );
}

#[test]
fn a_body_that_is_not_a_job_of_its_queue_is_malformed() {
    let poll = br#"{"page_id":"42","requested_by":"x","requested_at_ms":1}"#;
    assert!(Job::decode(JobKind::Poll, poll).is_ok());
    let error = Job::decode(JobKind::Onboard, poll).expect_err("not an owner job");
    assert!(error.0.starts_with("not an owner job"), "{error}");
    let bad_page = br#"{"job":"onboard_page","page_id":"../x"}"#;
    assert!(Job::decode(JobKind::Onboard, bad_page).is_err());
    let error = Job::decode(JobKind::Conversation, b"[]").expect_err("not an event");
    assert!(error.0.starts_with("not an event message"), "{error}");
}
