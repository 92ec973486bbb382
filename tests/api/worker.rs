//! The worker, end to end through the real binary: deliveries end up in the store in the
//! seed's layout, exactly once, sorted; on every store and database; with several workers;
//! within Spaces' limits; through a storage outage.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{FbsyncProcess, drain_queue, fixture};
use crate::pipeline::{
    DbKind, PAGE_ID, PAGE_TOKEN, Pipeline, StoreKind, USER_UUID, message_delivery, mids, post_all,
    post_signed, sorted_by_timestamp,
};
use crate::spaces_limits::{SpacesLimitLayer, SpacesLimits, s3_endpoint};

const FIXTURE_USER: &str = "1066835436691078";

/// Every fixture (twice, shuffled) into one conversation; the file holds each event once,
/// sorted, and a replay changes nothing.
async fn fixtures_end_up_in_the_store(db: DbKind, store: StoreKind) {
    let pipeline = Pipeline::new(db, store).await;
    pipeline.register_page(PAGE_ID).await;
    let (mut process, url) = pipeline.up().await;
    let client = reqwest::Client::new();
    let names = [
        "read.json",
        "message.json",
        "echo.json",
        "delivery.json",
        "postback.json",
        "quick_reply.json",
    ];
    for round in 0..2 {
        for name in names {
            assert_eq!(
                post_signed(&client, &url, &fixture(name)).await,
                200,
                "{name} round {round}"
            );
        }
    }
    let events = pipeline
        .wait_for_conversation(PAGE_ID, FIXTURE_USER, names.len(), Duration::from_secs(30))
        .await;
    assert_eq!(
        events.len(),
        names.len(),
        "each event exactly once: {events:#?}"
    );
    assert!(sorted_by_timestamp(&events));
    let echo = events
        .iter()
        .find(|e| e["message"]["is_echo"] == true)
        .expect("the echo is in the user's file");
    assert_eq!(
        echo["message"]["attachments"][0]["payload"]["elements"][0]["buttons"][0]["title"],
        "abecadło"
    );
    let key =
        format!("users/{USER_UUID}/facebook_messenger/{PAGE_ID}/conversations/{FIXTURE_USER}.json");
    let raw = pipeline.object(&key).await.expect("stored");
    assert!(
        String::from_utf8_lossy(&raw).contains(r"abecad\u0142o"),
        "stored as Facebook sent it"
    );

    // The same deliveries again: nothing changes.
    for name in names {
        assert_eq!(post_signed(&client, &url, &fixture(name)).await, 200);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pipeline.object(&key).await.expect("stored"), raw);

    let metrics_url = url.replace("/facebook/webhook", "/metrics");
    let metrics = client
        .get(&metrics_url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for expected in [
        "fbsync_events_staged_total{kind=\"echo\"}",
        "fbsync_flushes_total{outcome=\"written\"}",
        "fbsync_object_writes_total{object=\"conversation\"}",
        "fbsync_visibility_seconds_bucket",
        "fbsync_storage_request_seconds_bucket{operation=\"put\"",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from /metrics:\n{metrics}"
        );
    }

    let (code, listing, _) = pipeline.run(&["pages", "list", "--json"]).await;
    assert_eq!(code, 0);
    let page: Value =
        serde_json::from_str(listing.lines().next().expect("one page")).expect("json");
    assert_eq!(page["page_id"], PAGE_ID);
    assert_eq!(page["staged"], 0);
    assert!(page["last_flush_ms"].as_i64().is_some());
    assert!(!listing.contains(PAGE_TOKEN));

    process.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn deliveries_reach_a_local_directory_on_sqlite() {
    fixtures_end_up_in_the_store(DbKind::Sqlite, StoreKind::Local).await;
}

#[tokio::test]
async fn deliveries_reach_the_s3_bucket_on_sqlite() {
    fixtures_end_up_in_the_store(DbKind::Sqlite, StoreKind::S3 { endpoint: None }).await;
}

#[tokio::test]
async fn deliveries_reach_the_s3_bucket_on_postgres() {
    fixtures_end_up_in_the_store(DbKind::Postgres, StoreKind::S3 { endpoint: None }).await;
}

#[tokio::test]
async fn events_of_an_unregistered_page_are_dead_lettered_once_logged_once() {
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let (mut process, url) = pipeline.up().await;
    let client = reqwest::Client::new();
    for i in 0..5 {
        let body = message_delivery("999", "u1", &format!("m_{i}"), 1000 + i, false);
        assert_eq!(post_signed(&client, &url, &body).await, 200);
    }
    let warning = process
        .wait_for_log_containing("not registered", Duration::from_secs(20))
        .await;
    assert_eq!(warning["fields"]["page_id"], "999");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead = drain_queue(&format!("{}.dead", pipeline.prefix)).await;
    assert_eq!(dead.len(), 5);
    assert!(pipeline.conversation("999", "u1").await.is_none());
    let more_warnings = process.count_logs_containing("not registered");
    assert_eq!(more_warnings, 0, "logged once per Page, not once per event");
    process.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn bad_worker_configuration_is_refused_with_clear_lines() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("TOKEN_ENCRYPTION_KEY", "c2hvcnQ=");
    pipeline.set("SPACES_ENDPOINT", "http://127.0.0.1:1");
    let (code, _, stderr) = pipeline.run(&["worker"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("TOKEN_ENCRYPTION_KEY is malformed"),
        "{stderr}"
    );
    assert!(stderr.contains("SPACES_BUCKET is not set"), "{stderr}");
    assert!(!stderr.contains("panicked"));
    let (code, _, stderr) = pipeline
        .run(&[
            "pages",
            "add",
            "--page-id",
            "abc",
            "--user-uuid",
            "x",
            "--token",
            "t",
        ])
        .await;
    assert_eq!(code, 2, "{stderr}");
    pipeline.cleanup().await;
}

/// Two worker processes on PostgreSQL, 5,000 messages over 10 conversations delivered
/// concurrently with duplicates mixed in: every file holds every message once, sorted.
#[tokio::test]
async fn two_workers_store_every_message_exactly_once() {
    let mut pipeline = Pipeline::new(DbKind::Postgres, StoreKind::S3 { endpoint: None }).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let mut ingest = pipeline.spawn(&["ingest"]);
    let line = ingest
        .wait_for_log("ingest listening", Duration::from_secs(30))
        .await;
    let url = format!(
        "http://{}/facebook/webhook",
        line["fields"]["addr"].as_str().expect("addr")
    );
    let workers: Vec<FbsyncProcess> = (0..2).map(|_| pipeline.spawn(&["worker"])).collect();

    let client = reqwest::Client::new();
    let (conversations, per_conversation) = (10, 500);
    let mut bodies = Vec::new();
    for n in 0..per_conversation {
        for c in 0..conversations {
            // Timestamps run backwards for odd conversations: arrival order is not file order.
            let ts = if c % 2 == 0 { 1_000 + n } else { 1_000_000 - n };
            let body = message_delivery(
                PAGE_ID,
                &format!("user{c}"),
                &format!("m_{c}_{n}"),
                ts as i64,
                n % 7 == 0,
            );
            if n % 10 == 0 {
                bodies.push(body.clone());
            }
            bodies.push(body);
        }
    }
    assert_eq!(post_all(&client, &url, &bodies, 32).await, bodies.len());

    for c in 0..conversations {
        let user = format!("user{c}");
        let events = pipeline
            .wait_for_conversation(PAGE_ID, &user, per_conversation, Duration::from_secs(120))
            .await;
        let mut ids = mids(&events);
        assert_eq!(ids.len(), per_conversation, "{user}");
        assert!(sorted_by_timestamp(&events), "{user}");
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            per_conversation,
            "{user}: duplicates in the file"
        );
    }
    ingest.terminate();
    for mut worker in workers {
        worker.stop().await;
    }
    pipeline.cleanup().await;
}

/// A burst of 2,000 messages on 20 conversations through a layer that answers 503 SlowDown
/// beyond Spaces' limits (per-object window shortened to 10 s on both sides so the test is
/// quick; bucket rates lowered so they bind): everything is stored and nothing was throttled.
#[tokio::test]
async fn a_burst_within_spaces_limits_is_stored_without_a_throttled_request() {
    let limits = SpacesLimits {
        object_puts: 5,
        object_window: Duration::from_secs(10),
        bucket_writes_per_second: 20,
        bucket_operations_per_second: 30,
    };
    let layer = SpacesLimitLayer::start(&s3_endpoint(), limits).await;
    let mut pipeline = Pipeline::new(
        DbKind::Sqlite,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "5");
    pipeline.set("SPACES_OBJECT_PUT_WINDOW_SECS", "10");
    pipeline.set("SPACES_WRITES_PER_SEC", "20");
    pipeline.set("SPACES_OPS_PER_SEC", "30");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, url) = pipeline.up().await;
    let client = reqwest::Client::new();
    let (conversations, per_conversation) = (20, 100);
    let bodies: Vec<Vec<u8>> = (0..per_conversation)
        .flat_map(|n| {
            (0..conversations).map(move |c| {
                message_delivery(
                    PAGE_ID,
                    &format!("u{c}"),
                    &format!("m_{c}_{n}"),
                    10 + n as i64,
                    false,
                )
            })
        })
        .collect();
    assert_eq!(post_all(&client, &url, &bodies, 40).await, bodies.len());
    for c in 0..conversations {
        let events = pipeline
            .wait_for_conversation(
                PAGE_ID,
                &format!("u{c}"),
                per_conversation,
                Duration::from_secs(90),
            )
            .await;
        assert_eq!(events.len(), per_conversation);
    }
    assert_eq!(
        layer.throttled(),
        0,
        "requests over a limit: {:?}",
        layer.violations()
    );
    assert!(layer.forwarded() > 0);
    process.stop().await;
    pipeline.cleanup().await;
}

/// Storage answers 503 while deliveries arrive: nothing is lost or dead-lettered, and
/// everything is stored once it is back.
#[tokio::test]
async fn a_storage_outage_delays_but_loses_nothing() {
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::default()).await;
    let mut pipeline = Pipeline::new(
        DbKind::Sqlite,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, url) = pipeline.up().await;
    layer.set_down(true);
    let client = reqwest::Client::new();
    for n in 0..200 {
        let body = message_delivery(
            PAGE_ID,
            &format!("u{}", n % 4),
            &format!("m_{n}"),
            100 + n,
            false,
        );
        assert_eq!(post_signed(&client, &url, &body).await, 200);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        layer.refused_while_down() > 0,
        "the worker tried the store during the outage"
    );
    layer.set_down(false);
    for c in 0..4 {
        let events = pipeline
            .wait_for_conversation(PAGE_ID, &format!("u{c}"), 50, Duration::from_secs(60))
            .await;
        assert_eq!(events.len(), 50);
    }
    assert!(
        drain_queue(&format!("{}.dead", pipeline.prefix))
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
    process.stop().await;
    pipeline.cleanup().await;
}
