//! Unit tests of the confirming publisher's bookkeeping.

use super::*;

fn message(routing_key: &str, message_id: &str) -> Outgoing {
    Outgoing {
        exchange: "events".into(),
        routing_key: routing_key.into(),
        body: Vec::new(),
        message_id: message_id.into(),
        headers: FieldTable::default(),
        expiration: None,
    }
}

fn ack(returned: Option<(&str, &str)>) -> Confirmed {
    Confirmed {
        acked: true,
        returned: returned.map(|(key, id)| ("events".to_string(), key.to_string(), id.to_string())),
    }
}

#[test]
fn a_returned_message_is_the_one_it_names_not_the_one_whose_confirm_it_came_with() {
    let messages = [
        message("conversation", "m1"),
        message("conversation", "m2"),
        message("gone", "m3"),
    ];
    // One multiple-ack resolved the three confirms, and lapin gave m3's return to m1's.
    let confirmed = vec![ack(Some(("gone", "m3"))), ack(None), ack(None)];
    let outcomes: Vec<&str> = outcomes(&messages, confirmed)
        .iter()
        .map(|outcome| match outcome {
            Ok(()) => "ok",
            Err(PublishError::Unroutable) => "unroutable",
            Err(_) => "other",
        })
        .collect();
    assert_eq!(outcomes, ["ok", "ok", "unroutable"]);
}

#[test]
fn without_returns_each_confirm_is_the_outcome_of_its_own_message() {
    let messages = [message("conversation", "m1"), message("conversation", "m2")];
    let refused = Confirmed {
        acked: false,
        returned: None,
    };
    let outcomes = outcomes(&messages, vec![ack(None), refused]);
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    assert!(
        matches!(outcomes[1], Err(PublishError::Nacked)),
        "{outcomes:?}"
    );
}

#[test]
fn a_nack_is_a_refusal_and_a_return_of_another_publish_changes_nothing_here() {
    let messages = [message("conversation", "m1"), message("conversation", "m2")];
    let refused = Confirmed {
        acked: false,
        returned: None,
    };
    let confirmed = vec![refused, ack(Some(("conversation", "of-another-publish")))];
    let outcomes = outcomes(&messages, confirmed);
    assert!(
        matches!(outcomes[0], Err(PublishError::Nacked)),
        "{outcomes:?}"
    );
    assert!(outcomes[1].is_ok(), "{outcomes:?}");
}
