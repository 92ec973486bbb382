//! Tests of conversation claims on both backends: who wins, what is due first, fencing.

use super::*;
use crate::facebook::event::EventSource;
use crate::storage::budget::PutBudget;
use crate::storage::db::NewStagedEvent;
use crate::storage::db::PutReservation;
use crate::storage::db::test_support::backends;

fn key(psid: &str) -> ConversationKey {
    ConversationKey {
        page_id: PageId::parse("1").expect("page"),
        user_psid: Psid::parse(psid).expect("psid"),
    }
}

async fn stage(db: &Database, key: &ConversationKey, event_id: &str, now: i64) {
    let event = NewStagedEvent {
        key: key.clone(),
        event_id: event_id.into(),
        source: EventSource::Webhook,
        timestamp_ms: now,
        received_at_ms: now,
        body: format!(r#"{{"id":"{event_id}"}}"#),
    };
    db.staging()
        .stage_events(&[event], now)
        .await
        .expect("stage");
}

const LEASE: Duration = Duration::from_secs(60);

/// The stage numbers of `key`'s staged events: what finishing a claim of it deletes.
async fn staged_seqs(db: &Database, key: &ConversationKey) -> Vec<i64> {
    let staged = db.staging().staged_events(key).await.expect("staged");
    staged.iter().map(|event| event.seq).collect()
}

/// `owner`'s claim of `key` at `now`, which must be due.
async fn claim_due(
    db: &Database,
    key: &ConversationKey,
    owner: &str,
    now: i64,
) -> ConversationClaim {
    db.conversations()
        .claim_conversation(key, owner, now, LEASE)
        .await
        .expect("claim")
        .expect("due")
}

/// One whole flush of `key` at `now`, as a flusher does it: claim, read what is staged, finish.
async fn flush_all(db: &Database, key: &ConversationKey, now: i64) {
    let mut claim = claim_due(db, key, "flusher", now).await;
    let seqs = staged_seqs(db, key).await;
    claim.finish(&seqs, now, now).await.expect("finish");
}

#[tokio::test]
async fn a_claim_passes_over_a_conversation_another_transaction_holds_instead_of_waiting() {
    for (backend, db) in backends().await {
        if backend != "postgres" {
            continue; // SQLite: one writer at a time, nothing to pass over.
        }
        let (held, free) = (key("u1"), key("u2"));
        stage(&db, &held, "e1", 1_000).await;
        stage(&db, &free, "e1", 1_001).await;
        // Another transaction (staging, another worker's claim) holds u1's row.
        let mut holder = db.pool.begin().await.expect("begin");
        sqlx::query("UPDATE conversations SET failures = failures WHERE user_psid = 'u1'")
            .execute(&mut *holder)
            .await
            .expect("lock u1");
        let claims = tokio::time::timeout(
            Duration::from_secs(5),
            db.conversations()
                .claim_due_conversations("a", 2_000, LEASE, 10),
        )
        .await
        .expect("the claim does not wait for the held row")
        .expect("claim");
        let claimed: Vec<&str> = claims.iter().map(|c| c.key().user_psid.as_str()).collect();
        assert_eq!(claimed, ["u2"], "{backend}");
        holder.rollback().await.expect("rollback");
        let claims = db
            .conversations()
            .claim_due_conversations("a", 2_000, LEASE, 10)
            .await
            .expect("claim");
        let claimed: Vec<&str> = claims.iter().map(|c| c.key().user_psid.as_str()).collect();
        assert_eq!(claimed, ["u1"], "{backend}: taken once it is free");
    }
}

#[tokio::test]
async fn an_object_known_absent_is_written_unread_once_and_any_end_of_a_flush_forgets_it() {
    for (backend, db) in backends().await {
        let (fresh, failing, flushed) = (key("u1"), key("u2"), key("u3"));
        for key in [&fresh, &failing, &flushed] {
            stage(&db, key, "e1", 1_000).await;
        }
        // u3 was written by a flush before the listing's marks arrive.
        let mut claim = claim_due(&db, &flushed, "a", 1_000).await;
        claim.finish(&[], 1_000, 1_000).await.expect("finish");
        let psids = [&fresh.user_psid, &failing.user_psid, &flushed.user_psid];
        let marked = db
            .conversations()
            .mark_objects_absent(&fresh.page_id, &psids)
            .await
            .expect("mark");
        assert_eq!(
            marked, 2,
            "{backend}: a conversation flushed already is not marked"
        );

        let mut claim = claim_due(&db, &fresh, "a", 2_000).await;
        assert!(claim.object_known_absent(), "{backend}");
        claim.finish(&[], 2_000, 2_000).await.expect("finish");
        stage(&db, &fresh, "e2", 3_000).await;
        let claim = claim_due(&db, &fresh, "a", 3_000).await;
        assert!(
            !claim.object_known_absent(),
            "{backend}: written once, read from then on"
        );

        let claim = claim_due(&db, &failing, "a", 3_000).await;
        assert!(claim.object_known_absent(), "{backend}");
        claim.fail("refused", 3_000).await.expect("fail");
        let claim = claim_due(&db, &failing, "a", 3_000).await;
        assert!(
            !claim.object_known_absent(),
            "{backend}: after a failure, the next flush reads first"
        );
    }
}

#[tokio::test]
async fn the_conversation_whose_oldest_event_waited_longest_is_due_first() {
    for (backend, db) in backends().await {
        let (flushed_long_ago, never_flushed, staged_during_a_flush) =
            (key("u1"), key("u2"), key("u3"));
        stage(&db, &flushed_long_ago, "e1", 1_000).await;
        flush_all(&db, &flushed_long_ago, 1_000).await;

        stage(&db, &staged_during_a_flush, "e1", 1_500).await;
        let mut claim = claim_due(&db, &staged_during_a_flush, "a", 1_500).await;
        let seqs = staged_seqs(&db, &staged_during_a_flush).await;
        stage(&db, &staged_during_a_flush, "e2", 2_000).await;
        claim.finish(&seqs, 4_000, 4_000).await.expect("finish");

        stage(&db, &never_flushed, "e1", 3_000).await;
        stage(&db, &flushed_long_ago, "e2", 5_000).await;
        let due = db
            .conversations()
            .due_conversations(6_000, 10)
            .await
            .expect("due");
        let order: Vec<&str> = due.iter().map(|k| k.user_psid.as_str()).collect();
        assert_eq!(
            order,
            ["u3", "u2", "u1"],
            "{backend}: by the oldest waiting event (2,000, 3,000, 5,000), not by the last write"
        );
    }
}

#[tokio::test]
async fn a_batch_claim_takes_the_longest_waiting_and_never_one_already_held() {
    for (backend, db) in backends().await {
        for (i, psid) in ["u5", "u4", "u3", "u2", "u1"].iter().enumerate() {
            stage(&db, &key(psid), "e1", 1_000 + i as i64).await;
        }
        let held = claim_due(&db, &key("u4"), "x", 2_000).await;
        let first = db
            .conversations()
            .claim_due_conversations("a", 2_000, LEASE, 2)
            .await
            .expect("claim");
        let psids = |claims: &[ConversationClaim]| -> Vec<String> {
            claims
                .iter()
                .map(|c| c.key().user_psid.to_string())
                .collect()
        };
        assert_eq!(
            psids(&first),
            ["u5", "u3"],
            "{backend}: oldest first, u4 is held"
        );
        let rest = db
            .conversations()
            .claim_due_conversations("b", 2_000, LEASE, 10)
            .await
            .expect("claim");
        assert_eq!(psids(&rest), ["u2", "u1"], "{backend}");
        assert!(
            db.conversations()
                .claim_due_conversations("c", 2_000, LEASE, 10)
                .await
                .expect("claim")
                .is_empty(),
            "{backend}: every conversation is held"
        );
        assert!(first.iter().chain(&rest).all(|c| c.generation() > 0));
        drop(held);
    }
}

#[tokio::test]
async fn a_second_claim_of_a_leased_conversation_gets_nothing() {
    for (backend, db) in backends().await {
        let key = key("u1");
        stage(&db, &key, "e1", 1_000).await;
        let first = db
            .conversations()
            .claim_conversation(&key, "a", 1_000, LEASE)
            .await
            .expect("claim");
        assert!(first.is_some(), "{backend}: the first claim wins");
        assert!(
            first.as_ref().is_some_and(|claim| claim.owner().is_none()),
            "{backend}: no owner for a Page that is not registered"
        );
        let second = db
            .conversations()
            .claim_conversation(&key, "b", 1_001, LEASE)
            .await
            .expect("claim");
        assert!(
            second.is_none(),
            "{backend}: a leased conversation cannot be claimed"
        );
        assert!(
            db.conversations()
                .due_conversations(1_001, 10)
                .await
                .expect("due")
                .is_empty(),
            "{backend}: a leased conversation is not due"
        );
    }
}

#[tokio::test]
async fn a_claim_carries_the_pages_owner_as_it_is_now() {
    for (backend, db) in backends().await {
        let key = key("u5");
        let owner = UserUuid::parse("6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11").expect("uuid");
        db.registry()
            .upsert_page(&key.page_id, &owner, vec![1], 1)
            .await
            .expect("page");
        stage(&db, &key, "e1", 1_000).await;
        let mut claim = claim_due(&db, &key, "a", 1_000).await;
        assert_eq!(claim.owner(), Some(&owner), "{backend}");
        claim.defer(1_000).await.expect("defer");
        // The Page moves to another owner: the next claim writes to the new folder.
        let moved = UserUuid::parse("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d").expect("uuid");
        db.registry()
            .upsert_page(&key.page_id, &moved, vec![1], 2)
            .await
            .expect("page");
        let claim = claim_due(&db, &key, "b", 2_000).await;
        assert_eq!(claim.owner(), Some(&moved), "{backend}");
    }
}

#[tokio::test]
async fn a_sixth_put_reservation_inside_the_window_is_deferred() {
    let budget = PutBudget {
        puts_per_window: 5,
        window_ms: 300_000,
        margin_ms: 1_000,
    };
    for (backend, db) in backends().await {
        let key = key("u2");
        let mut now = 10_000;
        for put in 1..=5 {
            stage(&db, &key, &format!("e{put}"), now).await;
            let mut claim = claim_due(&db, &key, "a", now).await;
            assert_eq!(
                claim.reserve_put(&budget, now).await.expect("reserve"),
                PutReservation::Reserved,
                "{backend}: PUT {put} fits the budget"
            );
            claim.finish(&[], now, now).await.expect("finish");
            now += 1_000;
        }
        stage(&db, &key, "e6", now).await;
        let mut claim = claim_due(&db, &key, "b", now).await;
        assert_eq!(
            claim.reserve_put(&budget, now).await.expect("reserve"),
            PutReservation::NotBefore(10_000 + 300_000 + 1_000),
            "{backend}: the sixth PUT waits for the first to leave the window"
        );
        claim.defer(311_000).await.expect("defer");
        // The deferral recorded nothing: a new claim sees the same five PUTs.
        assert!(
            db.conversations()
                .claim_conversation(&key, "c", now, LEASE)
                .await
                .expect("claim")
                .is_none()
        );
        let later = db
            .conversations()
            .claim_conversation(&key, "c", 311_000, LEASE)
            .await
            .expect("claim")
            .expect("due again when the budget allows");
        assert_eq!(later.recent_puts.times().len(), 5, "{backend}");
    }
}

#[tokio::test]
async fn a_reserved_put_that_is_deferred_unsent_leaves_the_object_budget_as_it_was() {
    let budget = PutBudget {
        puts_per_window: 1,
        window_ms: 300_000,
        margin_ms: 1_000,
    };
    for (backend, db) in backends().await {
        let key = key("u-unsent");
        stage(&db, &key, "e1", 1_000).await;
        for attempt in 0..3 {
            let now = 1_000 + attempt * 100;
            let mut claim = claim_due(&db, &key, "a", now).await;
            assert_eq!(
                claim.reserve_put(&budget, now).await.expect("reserve"),
                PutReservation::Reserved,
                "{backend}: attempt {attempt}: no PUT was ever sent"
            );
            // No room in the bucket's budget: deferred before the PUT is sent.
            claim.defer(now).await.expect("defer");
        }
    }
}

#[tokio::test]
async fn a_set_aside_conversation_is_never_due_until_requeued() {
    for (backend, db) in backends().await {
        let key = key("u4");
        stage(&db, &key, "e1", 1_000).await;
        let claim = claim_due(&db, &key, "a", 1_000).await;
        claim
            .set_aside("not a JSON array")
            .await
            .expect("set aside");
        assert!(
            db.conversations()
                .due_conversations(i64::MAX / 4, 10)
                .await
                .expect("due")
                .is_empty(),
            "{backend}"
        );
        assert!(
            db.conversations()
                .claim_conversation(&key, "b", 2_000, LEASE)
                .await
                .expect("claim")
                .is_none()
        );
        let aside = db
            .conversations()
            .set_aside_conversations(Some(&key.page_id))
            .await
            .expect("list");
        assert_eq!(aside.len(), 1, "{backend}");
        assert_eq!(aside[0].set_aside_reason, "not a JSON array");
        assert_eq!(
            db.staging()
                .staged_events(&key)
                .await
                .expect("staged")
                .len(),
            1,
            "{backend}: events kept"
        );
        assert_eq!(
            db.conversations()
                .requeue_set_aside(&key.page_id, None)
                .await
                .expect("requeue"),
            1
        );
        assert_eq!(
            db.conversations()
                .due_conversations(2_000, 10)
                .await
                .expect("due"),
            vec![key.clone()],
            "{backend}"
        );
    }
}

#[tokio::test]
async fn a_lease_taken_over_after_expiry_fences_the_old_holder() {
    let budget = PutBudget {
        puts_per_window: 5,
        window_ms: 300_000,
        margin_ms: 1_000,
    };
    for (backend, db) in backends().await {
        let key = key("u3");
        stage(&db, &key, "e1", 1_000).await;
        let lease = Duration::from_millis(100);
        let mut stalled = db
            .conversations()
            .claim_conversation(&key, "stalled", 1_000, lease)
            .await
            .expect("claim")
            .expect("due");
        let seqs = staged_seqs(&db, &key).await;
        // The lease runs out; another worker takes the conversation over.
        let mut successor = db
            .conversations()
            .claim_conversation(&key, "successor", 1_200, LEASE)
            .await
            .expect("claim")
            .expect("an expired lease can be taken over");
        // The old holder wakes up: every step it tries is refused and changes nothing.
        assert!(
            matches!(stalled.renew(1_300).await, Err(ClaimError::Lost)),
            "{backend}: renew"
        );
        assert!(
            matches!(
                stalled.reserve_put(&budget, 1_300).await,
                Err(ClaimError::Lost)
            ),
            "{backend}: a PUT reservation"
        );
        assert!(
            matches!(
                stalled.finish(&seqs, 1_300, 1_300).await,
                Err(ClaimError::Lost)
            ),
            "{backend}: finishing deletes nothing"
        );
        assert_eq!(
            db.staging()
                .staged_events(&key)
                .await
                .expect("staged")
                .len(),
            1,
            "{backend}: the staged event is still there"
        );
        // The successor's claim is intact and saw no PUT recorded by the old holder.
        assert!(successor.recent_puts.times().is_empty(), "{backend}");
        assert_eq!(
            successor
                .reserve_put(&budget, 1_400)
                .await
                .expect("reserve"),
            PutReservation::Reserved
        );
        successor.finish(&seqs, 1_400, 1_400).await.expect("finish");
        assert!(
            db.staging()
                .staged_events(&key)
                .await
                .expect("staged")
                .is_empty(),
            "{backend}"
        );
    }
}
