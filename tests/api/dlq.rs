//! The dead-letter queue tools: list with filters, replay after the cause is fixed, purge, and
//! dry runs that change nothing.

use std::time::Duration;

use serde_json::Value;

use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::tally::mids;
use crate::common::webhook::{message_delivery, post_signed};

/// `fbsync dlq list --json FILTERS`, which must succeed.
async fn list(pipeline: &Pipeline, filters: &[&str]) -> Vec<Value> {
    pipeline
        .dlq_list(filters)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn wait_for_dead_letters(pipeline: &Pipeline, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let letters = list(pipeline, &[]).await;
        if letters.len() >= count {
            assert_eq!(letters.len(), count);
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} dead letters, expected {count}",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn unknown_page_letters_are_listed_filtered_and_replayed_exactly_once() {
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();
    // 20 messages for the unregistered test Page (one of them delivered twice), 3 for another.
    for n in 0..20 {
        let body = message_delivery(PAGE_ID, "u1", &format!("m_{n}"), 100 + n, false);
        assert_eq!(post_signed(&client, &url, &body).await, 200);
    }
    assert_eq!(
        post_signed(
            &client,
            &url,
            &message_delivery(PAGE_ID, "u1", "m_3", 103, false)
        )
        .await,
        200
    );
    for n in 0..3 {
        let body = message_delivery("777", "u9", &format!("x_{n}"), 100 + n, false);
        assert_eq!(post_signed(&client, &url, &body).await, 200);
    }
    wait_for_dead_letters(&pipeline, 24).await;

    let ours = list(&pipeline, &["--page-id", PAGE_ID]).await;
    assert_eq!(ours.len(), 21);
    let letter = &ours[0];
    assert_eq!(letter["reason"], "unknown_page");
    assert_eq!(letter["kind"], "conversation");
    assert_eq!(letter["attempts"], 1);
    assert!(
        letter["error"]
            .as_str()
            .expect("error")
            .contains("not registered")
    );
    assert!(letter["age_secs"].as_i64().expect("age") < 60);
    assert_eq!(
        list(&pipeline, &["--reason", "unknown_page", "--since", "1h"])
            .await
            .len(),
        24
    );
    assert_eq!(list(&pipeline, &["--reason", "token_error"]).await.len(), 0);
    assert_eq!(list(&pipeline, &["--kind", "page_change"]).await.len(), 0);
    assert_eq!(list(&pipeline, &["--limit", "5"]).await.len(), 5);
    let (code, table, _) = pipeline.run(&["dlq", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("unknown_page") && table.contains("24 of 24 dead letters"),
        "{table}"
    );

    // A dry run changes nothing.
    let (code, stdout, _) = pipeline
        .run(&["dlq", "replay", "--page-id", PAGE_ID, "--dry-run"])
        .await;
    assert_eq!(code, 0);
    assert!(stdout.contains("would replay 21 of 24"), "{stdout}");
    assert_eq!(list(&pipeline, &[]).await.len(), 24);

    // Register the Page, replay its letters: every message stored once; the other Page's stay.
    pipeline.register_page(PAGE_ID).await;
    assert_eq!(pipeline.dlq_replay(&["--page-id", PAGE_ID]).await, Ok(21));
    let events = pipeline
        .wait_for_conversation(PAGE_ID, "u1", 20, Duration::from_secs(30))
        .await;
    let mut stored = mids(&events);
    stored.sort();
    stored.dedup();
    assert_eq!(stored.len(), 20);
    assert_eq!(events.len(), 20);
    let left = list(&pipeline, &[]).await;
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|l| l["page_id"] == "777"));

    // Purge: the dry run keeps them, the real one removes them.
    let (_, stdout, _) = pipeline
        .run(&["dlq", "purge", "--page-id", "777", "--dry-run"])
        .await;
    assert!(stdout.contains("would purge 3 of 3"), "{stdout}");
    assert_eq!(list(&pipeline, &[]).await.len(), 3);
    let (code, stdout, _) = pipeline.run(&["dlq", "purge", "--page-id", "777"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("purged 3"), "{stdout}");
    assert!(list(&pipeline, &[]).await.is_empty());

    process.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn bad_filters_are_refused_with_clear_lines() {
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let (code, _, stderr) = pipeline
        .run(&[
            "dlq", "list", "--since", "soon", "--kind", "nope", "--reason", "why",
        ])
        .await;
    assert_eq!(code, 2, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(stderr.contains("--kind \"nope\" is not a job kind"));
    assert!(stderr.contains("--reason \"why\" is not a reason"));
    assert!(stderr.contains("--since \"soon\" is not a duration"));
    pipeline.cleanup().await;
}
