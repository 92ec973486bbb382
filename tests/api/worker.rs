//! The worker, end to end through the real binary: deliveries end up in the store in the
//! seed's layout, exactly once, sorted; on every store and database; with several workers;
//! within Spaces' limits; through a storage outage. Every reaction event and every version of
//! an edited message is kept; a conversation whose stored object is not a JSON array is set
//! aside, never overwritten, until `fbsync pages requeue`.

use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::telemetry::{EVENTS_STAGED, FLUSHES, OBJECT_WRITES};
use serde_json::Value;
use tokio::time::Instant;

use crate::common::broker::drain_queue;
use crate::common::fixtures::fixture;
use crate::common::metrics::{sample, scrape, total};
use crate::common::pipeline::{
    DbKind, PAGE_ID, PAGE_TOKEN, Pipeline, StoreKind, USER_UUID, conversation_key,
};
use crate::common::process::{FbsyncProcess, log_summary};
use crate::common::spaces_limits::{SpacesLimits, s3_endpoint};
use crate::common::tally::{expected_mids, mids, sorted_by_timestamp};
use crate::common::webhook::{
    accepted, conversation_burst, message_delivery, post_burst, post_signed, webhook_client,
};

const FIXTURE_USER: &str = "1066835436691078";

/// Every fixture (twice, shuffled) into one conversation; the file holds each event once,
/// sorted, and a replay changes nothing.
async fn fixtures_end_up_in_the_store(db: DbKind, store: StoreKind) {
    let mut pipeline = Pipeline::new(db, store).await;
    // No per-object PUT budget: the replay below is flushed (and compared) at once, not after
    // Spaces' five-minute window.
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let metrics_url = format!("{}/metrics", ingest.operator);
    let client = reqwest::Client::new();
    let names = [
        "read.json",
        "message.json",
        "echo.json",
        "delivery.json",
        "postback.json",
        "quick_reply.json",
        "float_timestamps.json",
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
    assert!(
        String::from_utf8_lossy(&raw).contains(r#""timestamp":1468152710123.0"#),
        "a time written with a fraction is stored as sent"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["message"]["mid"] == "m_float_timestamp_1468152710123")
            .count(),
        1,
        "and is kept once, sorted by its value (above)"
    );

    // The same deliveries again: once the worker has staged every re-sent event and flushed
    // them, nothing changed: the same bytes, and no write of the conversation object.
    let conversation_writes = format!("{OBJECT_WRITES}{{object=\"conversation\"}}");
    let unchanged_flushes = format!("{FLUSHES}{{outcome=\"unchanged\"}}");
    let before = scrape(&client, &metrics_url).await;
    for name in names {
        assert_eq!(post_signed(&client, &url, &fixture(name)).await, 200);
    }
    let resent = names.len() as f64;
    let staged_before = total(&before, EVENTS_STAGED);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let staged = total(&scrape(&client, &metrics_url).await, EVENTS_STAGED) - staged_before;
        if staged >= resent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{staged} of the {resent} re-sent events staged within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Staged; now flushed too: nothing staged or queued, and the file settled.
    let replayed = pipeline
        .wait_for_conversation(PAGE_ID, FIXTURE_USER, names.len(), Duration::from_secs(30))
        .await;
    assert_eq!(
        replayed.len(),
        names.len(),
        "the replay added events: {replayed:#?}"
    );
    assert_eq!(pipeline.object(&key).await.expect("stored"), raw);
    let metrics = scrape(&client, &metrics_url).await;
    assert_eq!(
        sample(&metrics, &conversation_writes),
        sample(&before, &conversation_writes),
        "the replay wrote the conversation object again"
    );
    assert!(
        sample(&metrics, &unchanged_flushes).unwrap_or(0.0)
            > sample(&before, &unchanged_flushes).unwrap_or(0.0),
        "no flush compared the replay with the file: {unchanged_flushes} did not grow"
    );

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
    let stored = page["conversations_stored"]
        .as_i64()
        .expect("conversations stored");
    assert!(stored > 0, "{page}");
    // The table says so too, in its own column.
    let (code, table, _) = pipeline.run(&["pages", "list"]).await;
    assert_eq!(code, 0);
    let header: Vec<&str> = table
        .lines()
        .next()
        .expect("header")
        .split_whitespace()
        .collect();
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .expect("the Page")
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "CONVERSATIONS")
        .expect("CONVERSATIONS column");
    assert_eq!(row[column], stored.to_string(), "{table}");

    process.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn deliveries_reach_a_local_directory_on_sqlite() {
    fixtures_end_up_in_the_store(DbKind::Sqlite, StoreKind::Local).await;
}

/// Conversations are personal data: on the local store every file fbsync writes is 0600 and
/// every folder it makes 0700 (the test runs with the usual umask, which would give 0644 and
/// 0755), and so is the SQLite database with its journal.
#[tokio::test]
async fn stored_conversations_and_the_database_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let body = message_delivery(PAGE_ID, "private", "m_private", 1, false);
    assert_eq!(
        post_signed(&webhook_client(), &ingest.webhook, &body).await,
        200
    );
    pipeline
        .wait_for_conversation(PAGE_ID, "private", 1, Duration::from_secs(30))
        .await;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let file = pipeline
        .data_dir
        .join(crate::common::pipeline::conversation_key(
            PAGE_ID, "private",
        ));
    assert_eq!(mode(&file), 0o600, "{}", file.display());
    let mut folder = file.parent();
    while let Some(dir) = folder.filter(|dir| *dir != pipeline.data_dir.as_path()) {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        folder = dir.parent();
    }
    for name in ["fbsync.db", "fbsync.db-wal"] {
        let path = pipeline.data_dir.join(name);
        if name == "fbsync.db" || path.exists() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    process.stop().await;
    pipeline.cleanup().await;
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
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();
    for i in 0..5 {
        let body = message_delivery("999", "u1", &format!("m_{i}"), 1000 + i, false);
        assert_eq!(post_signed(&client, &url, &body).await, 200);
    }
    let not_registered = |line: &str| line.contains("not registered");
    let warning = process
        .wait_for_line(
            "about the unregistered Page",
            Duration::from_secs(20),
            |line| {
                line["fields"]["message"]
                    .as_str()
                    .is_some_and(not_registered)
            },
        )
        .await;
    assert_eq!(warning["fields"]["page_id"], "999");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead = drain_queue(&format!("{}.dead", pipeline.prefix)).await;
    assert_eq!(dead.len(), 5);
    assert!(pipeline.conversation("999", "u1").await.is_none());
    let more_warnings = process
        .take_lines()
        .iter()
        .filter(|line| not_registered(line))
        .count();
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
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let mut workers = vec![pipeline.spawn_worker().await, pipeline.spawn_worker().await];

    // Timestamps run backwards for odd conversations (arrival order is not file order); every
    // 10th round of messages is delivered twice.
    let (conversations, per_conversation) = (10, 500);
    let unique = conversation_burst(PAGE_ID, "w", conversations, per_conversation);
    let mut deliveries = Vec::new();
    for (i, delivery) in unique.iter().enumerate() {
        if (i / conversations) % 10 == 0 {
            deliveries.push(delivery.clone());
        }
        deliveries.push(delivery.clone());
    }
    let deliveries = Arc::new(deliveries);
    let client = webhook_client();
    let answers = post_burst(
        &client,
        &urls.webhook,
        &deliveries,
        32,
        Duration::ZERO,
        &Arc::default(),
    )
    .await;
    assert_eq!(accepted(&answers), deliveries.len());

    for ((page_id, user), wanted) in expected_mids(unique.iter()) {
        let events = pipeline
            .wait_for_conversation(&page_id, &user, per_conversation, Duration::from_secs(120))
            .await;
        assert_eq!(
            events.len(),
            per_conversation,
            "{user}: not exactly the messages delivered; worker warnings:\n{}",
            warnings(&mut workers)
        );
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
        assert!(
            ids.iter().eq(wanted.iter()),
            "{user}: other messages stored"
        );
    }
    ingest.stop().await;
    for worker in &mut workers {
        worker.stop().await;
    }
    pipeline.cleanup().await;
}

/// The warnings and errors the processes logged so far, counted.
fn warnings(processes: &mut [FbsyncProcess]) -> String {
    let lines: Vec<String> = processes.iter_mut().flat_map(|p| p.take_lines()).collect();
    log_summary(&lines)
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
    let (mut pipeline, layer) = Pipeline::behind_spaces_limits(DbKind::Sqlite, limits).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "5");
    pipeline.set("SPACES_OBJECT_PUT_WINDOW_SECS", "10");
    pipeline.set("SPACES_WRITES_PER_SEC", "20");
    pipeline.set("SPACES_OPS_PER_SEC", "30");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let (conversations, per_conversation) = (20, 100);
    let deliveries = Arc::new(conversation_burst(
        PAGE_ID,
        "s",
        conversations,
        per_conversation,
    ));
    let answers = post_burst(
        &webhook_client(),
        &ingest.webhook,
        &deliveries,
        40,
        Duration::ZERO,
        &Arc::default(),
    )
    .await;
    assert_eq!(accepted(&answers), deliveries.len());
    for (page_id, user) in expected_mids(deliveries.iter()).into_keys() {
        let events = pipeline
            .wait_for_conversation(&page_id, &user, per_conversation, Duration::from_secs(90))
            .await;
        assert_eq!(events.len(), per_conversation, "{user}");
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

/// A worker writes a conversation again without reading what it wrote itself (one request per
/// flush, not two); an object changed outside fbsync meanwhile is refused by the conditional
/// write, then read and merged: never overwritten.
#[tokio::test]
async fn a_worker_rewrites_its_own_write_unread_and_never_overwrites_a_change_it_did_not_make() {
    let (pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let client = webhook_client();
    let psid = "u-rewrite";
    let object = format!("{psid}.json");
    for (i, mid) in ["m_w1", "m_w2"].into_iter().enumerate() {
        let delivery = message_delivery(PAGE_ID, psid, mid, 1_000 + i as i64, false);
        assert_eq!(post_signed(&client, &ingest.webhook, &delivery).await, 200);
        pipeline
            .wait_for_conversation(PAGE_ID, psid, i + 1, Duration::from_secs(30))
            .await;
    }
    assert_eq!(layer.puts_for(&object), 2);
    assert_eq!(
        layer.gets_for(&object),
        1,
        "the second flush merged into what it wrote"
    );

    // Someone else changes the object (the Python app, a hand edit).
    let mut events = pipeline.conversation(PAGE_ID, psid).await.expect("stored");
    events.push(serde_json::json!({"sender":{"id":psid},"recipient":{"id":PAGE_ID},"timestamp":1_500,"message":{"mid":"m_outside","text":"from outside"}}));
    crate::common::spaces_limits::s3_client(&s3_endpoint())
        .put_object()
        .bucket(pipeline.bucket.as_deref().expect("S3"))
        .key(crate::common::pipeline::conversation_key(PAGE_ID, psid))
        .body(serde_json::to_vec(&events).expect("json").into())
        .send()
        .await
        .expect("put");
    let delivery = message_delivery(PAGE_ID, psid, "m_w3", 2_000, false);
    assert_eq!(post_signed(&client, &ingest.webhook, &delivery).await, 200);
    let stored = pipeline
        .wait_for_conversation(PAGE_ID, psid, 4, Duration::from_secs(60))
        .await;
    assert_eq!(mids(&stored), ["m_w1", "m_w2", "m_outside", "m_w3"]);
    assert!(
        layer.gets_for(&object) >= 2,
        "the refused write was followed by a read"
    );
    assert_eq!(layer.throttled(), 0);
    process.stop().await;
    let paused: Vec<String> = process
        .take_lines()
        .into_iter()
        .filter(|line| line.contains("taking no new messages"))
        .collect();
    assert!(
        paused.is_empty(),
        "a refused conditional write is not the store being down: {paused:?}"
    );
    pipeline.cleanup().await;
}

/// A busy conversation is not copied whole as often as the flusher can: after a write, the
/// events that arrive within WORKER_OBJECT_WRITE_GAP_MS wait, and go into the next write
/// together (one PUT for three messages).
#[tokio::test]
async fn events_arriving_within_the_write_gap_wait_and_share_the_next_write() {
    let (mut pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    let gap = Duration::from_secs(5);
    pipeline.set("WORKER_OBJECT_WRITE_GAP_MS", &gap.as_millis().to_string());
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let client = webhook_client();
    let psid = "u-gap";
    let first = message_delivery(PAGE_ID, psid, "m_g1", 1_000, false);
    assert_eq!(post_signed(&client, &ingest.webhook, &first).await, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pipeline.conversation(PAGE_ID, psid).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the first message was not stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first write ended about now (seen within the polling's 20 ms): the gap holds until
    // about now + gap, and the check below comes at half of it.
    let first_seen = Instant::now();
    for (i, mid) in ["m_g2", "m_g3", "m_g4"].into_iter().enumerate() {
        let delivery = message_delivery(PAGE_ID, psid, mid, 2_000 + i as i64, false);
        assert_eq!(post_signed(&client, &ingest.webhook, &delivery).await, 200);
    }
    tokio::time::sleep_until(first_seen + gap / 2).await;
    let during_gap = pipeline.conversation(PAGE_ID, psid).await.expect("stored");
    assert_eq!(
        mids(&during_gap),
        ["m_g1"],
        "no second write within the gap"
    );
    let stored = pipeline
        .wait_for_conversation(PAGE_ID, psid, 4, Duration::from_secs(60))
        .await;
    assert_eq!(mids(&stored), ["m_g1", "m_g2", "m_g3", "m_g4"]);
    assert_eq!(
        layer.puts_for(&format!("{psid}.json")),
        2,
        "the three messages of the gap went into one write"
    );
    assert_eq!(layer.throttled(), 0);
    process.stop().await;
    pipeline.cleanup().await;
}

/// A burst of people new to the bucket: one listing of the Page's folder spares a read per
/// new conversation (each is written with `If-None-Match: *`, one request instead of two),
/// while a conversation whose object exists already (written before fbsync) is still read and
/// merged, never overwritten.
#[tokio::test]
async fn new_conversations_claimed_together_are_written_after_one_listing_without_reads() {
    let (pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    pipeline.register_page(PAGE_ID).await;
    // Two conversations stored before fbsync (the Python app wrote them).
    let s3 = crate::common::spaces_limits::s3_client(&s3_endpoint());
    for psid in ["u-old-0", "u-old-1"] {
        let before = serde_json::json!([{"sender":{"id":psid},"recipient":{"id":PAGE_ID},"timestamp":500,"message":{"mid":format!("m_before_{psid}"),"text":"before"}}]);
        s3.put_object()
            .bucket(pipeline.bucket.as_deref().expect("S3"))
            .key(crate::common::pipeline::conversation_key(PAGE_ID, psid))
            .body(serde_json::to_vec(&before).expect("json").into())
            .send()
            .await
            .expect("put");
    }
    // Every message waits in the queue, so the worker claims the conversations together.
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let client = webhook_client();
    let new: Vec<String> = (0..30).map(|n| format!("u-new-{n}")).collect();
    let old = ["u-old-0".to_string(), "u-old-1".to_string()];
    for (n, psid) in new.iter().chain(&old).enumerate() {
        let delivery = message_delivery(PAGE_ID, psid, &format!("m_l{n}"), 1_000 + n as i64, false);
        assert_eq!(post_signed(&client, &urls.webhook, &delivery).await, 200);
    }
    let mut worker = pipeline.spawn_worker().await;
    for psid in &new {
        let stored = pipeline
            .wait_for_conversation(PAGE_ID, psid, 1, Duration::from_secs(30))
            .await;
        assert_eq!(stored.len(), 1, "{psid}");
    }
    for psid in &old {
        let stored = pipeline
            .wait_for_conversation(PAGE_ID, psid, 2, Duration::from_secs(30))
            .await;
        assert_eq!(
            mids(&stored)[0],
            format!("m_before_{psid}"),
            "merged, not overwritten"
        );
    }
    let reads_of_new: u64 = new
        .iter()
        .map(|psid| layer.gets_for(&format!("/{psid}.json")))
        .sum();
    assert_eq!(reads_of_new, 0, "new conversations are written unread");
    for psid in &old {
        assert_eq!(
            layer.gets_for(&format!("/{psid}.json")),
            1,
            "{psid} was read"
        );
    }
    assert_eq!(layer.lists(), 1, "one listing serves every round");
    assert_eq!(layer.throttled(), 0);
    worker.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}

/// Storage answers 503 while deliveries arrive: nothing is lost or dead-lettered, and
/// everything is stored once it is back.
#[tokio::test]
async fn a_storage_outage_delays_but_loses_nothing() {
    let (mut pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
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

/// The messaging event of a one-event webhook delivery, as the JSON text Facebook sent: what
/// the conversation file must hold byte for byte.
fn messaging_event_text(delivery: &[u8]) -> String {
    use serde_json::value::RawValue;
    type Object = std::collections::HashMap<String, Box<RawValue>>;
    let delivery: Object = serde_json::from_slice(delivery).expect("a delivery");
    let entries: Vec<Object> = serde_json::from_str(delivery["entry"].get()).expect("entries");
    let messaging: Vec<Box<RawValue>> =
        serde_json::from_str(entries[0]["messaging"].get()).expect("messaging events");
    messaging[0].get().to_string()
}

/// A fixture with each `(from, to)` text replaced (all must occur): a new event in the same
/// captured shape.
fn fixture_with(name: &str, replacements: &[(&str, &str)]) -> Vec<u8> {
    let mut text = String::from_utf8(fixture(name)).expect("fixtures are UTF-8");
    for (from, to) in replacements {
        assert!(text.contains(from), "{name} has no {from:?}");
        text = text.replace(from, to);
    }
    text.into_bytes()
}

/// React, unreact and react again on one message are three events, and a retried delivery of
/// one of them stays one; two edits of the message are two versions, kept beside the message.
#[tokio::test]
async fn every_reaction_and_every_edit_is_kept_once() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let client = reqwest::Client::new();

    let message = fixture("message.json");
    let react = fixture("reaction.json");
    let unreact = fixture("unreact.json");
    // The same reaction as `reaction.json`, ten seconds after the unreact.
    let react_again = fixture_with(
        "reaction.json",
        &[
            ("\"time\":1468152710000", "\"time\":1468152730000"),
            ("\"timestamp\":1468152709991", "\"timestamp\":1468152729991"),
        ],
    );
    let edit = fixture("message_edit.json");
    let second_edit = fixture_with(
        "message_edit.json",
        &[
            ("\"time\":1468152740000", "\"time\":1468152750000"),
            ("\"timestamp\":1468152739912", "\"timestamp\":1468152749912"),
            ("test, edited", "test, edited twice"),
            ("\"num_edit\":1", "\"num_edit\":2"),
        ],
    );
    // In file order; Facebook retries the first reaction and the first edit.
    let distinct = [
        &message,
        &react,
        &unreact,
        &react_again,
        &edit,
        &second_edit,
    ];
    let posted = [
        &react,
        &message,
        &unreact,
        &react,
        &second_edit,
        &react_again,
        &edit,
        &edit,
    ];
    for body in posted {
        assert_eq!(post_signed(&client, &ingest.webhook, body).await, 200);
    }

    let events = pipeline
        .wait_for_conversation(
            PAGE_ID,
            FIXTURE_USER,
            distinct.len(),
            Duration::from_secs(30),
        )
        .await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|event| {
            let object = event.as_object().expect("an event is an object");
            ["message", "reaction", "message_edit"]
                .into_iter()
                .find(|kind| object.contains_key(*kind))
                .unwrap_or("other")
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "message",
            "reaction",
            "reaction",
            "reaction",
            "message_edit",
            "message_edit"
        ],
        "the message, three reaction events and two edits, in time order: {events:#?}"
    );
    let reactions: Vec<(&Value, &Value)> = events
        .iter()
        .filter(|e| e.get("reaction").is_some())
        .map(|e| (&e["reaction"]["action"], &e["timestamp"]))
        .collect();
    assert_eq!(
        reactions,
        [
            (&Value::from("react"), &Value::from(1_468_152_709_991_i64)),
            (&Value::from("unreact"), &Value::from(1_468_152_719_987_i64)),
            (&Value::from("react"), &Value::from(1_468_152_729_991_i64)),
        ]
    );
    let edits: Vec<(&Value, &Value)> = events
        .iter()
        .filter(|e| e.get("message_edit").is_some())
        .map(|e| (&e["message_edit"]["num_edit"], &e["message_edit"]["text"]))
        .collect();
    assert_eq!(
        edits,
        [
            (&Value::from(1), &Value::from("test, edited")),
            (&Value::from(2), &Value::from("test, edited twice")),
        ]
    );
    assert_eq!(
        events[0]["message"]["text"], "test",
        "the original message stays"
    );

    // Each event as Facebook sent it, once.
    let raw = pipeline
        .object(&crate::common::pipeline::conversation_key(
            PAGE_ID,
            FIXTURE_USER,
        ))
        .await
        .expect("stored");
    let raw = String::from_utf8(raw).expect("UTF-8");
    for body in distinct {
        let event = messaging_event_text(body);
        assert_eq!(raw.matches(&event).count(), 1, "{event} once in {raw}");
    }
    process.stop().await;
    pipeline.cleanup().await;
}

/// `fbsync pages list --json`'s line for `page_id`, if the Page is listed.
async fn listed(pipeline: &Pipeline, page_id: &str) -> Option<Value> {
    let (code, stdout, stderr) = pipeline.run(&["pages", "list", "--json"]).await;
    assert_eq!(code, 0, "pages list: {stderr}");
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|page| page["page_id"] == page_id)
}

/// Polls `metrics_url` until `series` reads `value` (panics after `limit`); the worker
/// refreshes its gauges every few seconds.
async fn wait_for_sample(metrics_url: &str, series: &str, value: f64, limit: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + limit;
    loop {
        let current = sample(&scrape(&client, metrics_url).await, series);
        if current == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {current:?}, not {value}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A conversation whose stored object is not a JSON array is set aside: its staged events are
/// kept (new ones too), the object is never overwritten, `pages list` and the
/// `fbsync_conversations_set_aside` gauge show it, and the Page's other conversations flush as
/// usual. Once the object is fixed, `fbsync pages requeue` makes it due again and every event
/// is stored.
#[tokio::test]
async fn a_conversation_whose_object_is_not_an_array_is_set_aside_until_requeued() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (aside, healthy) = ("4100000000000001", "4100000000000002");
    let key = crate::common::pipeline::conversation_key(PAGE_ID, aside);
    let path = pipeline.data_dir.join(&key);
    std::fs::create_dir_all(path.parent().expect("a folder")).expect("conversations folder");
    let garbage = b"{\"not\": \"an array\"} and some garbage".to_vec();
    std::fs::write(&path, &garbage).expect("write the broken object");

    let (mut process, ingest) = pipeline.up().await;
    let metrics_url = format!("{}/metrics", ingest.operator);
    let set_aside_gauge = fbsync_shared::telemetry::CONVERSATIONS_SET_ASIDE;
    let client = reqwest::Client::new();
    for n in 0..5 {
        for user in [aside, healthy] {
            let body = message_delivery(PAGE_ID, user, &format!("m_{user}_{n}"), 100 + n, false);
            assert_eq!(post_signed(&client, &ingest.webhook, &body).await, 200);
        }
    }
    // The other conversation of the Page is stored as usual (the Page never settles: the
    // set-aside conversation keeps its events staged).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = pipeline.conversation(PAGE_ID, healthy).await;
        if stored.as_ref().is_some_and(|events| events.len() == 5) {
            break;
        }
        assert!(Instant::now() < deadline, "{healthy}: {stored:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The broken one is set aside with its five events staged, and counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = listed(&pipeline, PAGE_ID)
            .await
            .expect("the Page is listed");
        if page["set_aside"] == 1 && page["staged"] == 5 {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "not set aside with its 5 events staged: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(page["status"], "active", "{page}");
    wait_for_sample(&metrics_url, set_aside_gauge, 1.0, Duration::from_secs(20)).await;
    let flushes = scrape(&client, &metrics_url).await;
    assert!(
        sample(&flushes, &format!("{FLUSHES}{{outcome=\"set_aside\"}}")) >= Some(1.0),
        "{flushes}"
    );

    // A later event is staged beside the others; the object is still never touched.
    let body = message_delivery(PAGE_ID, aside, &format!("m_{aside}_5"), 105, false);
    assert_eq!(post_signed(&client, &ingest.webhook, &body).await, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while listed(&pipeline, PAGE_ID).await.expect("listed")["staged"] != 6 {
        assert!(Instant::now() < deadline, "the sixth event was not staged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Many flush intervals (50 ms) later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        std::fs::read(&path).expect("the object is still there"),
        garbage,
        "a set-aside object was overwritten"
    );
    let page = listed(&pipeline, PAGE_ID).await.expect("listed");
    assert_eq!(
        (&page["set_aside"], &page["staged"]),
        (&1.into(), &6.into())
    );

    // The operator fixes the object and requeues that one conversation.
    std::fs::write(&path, b"[]").expect("fix the object");
    let (code, stdout, stderr) = pipeline
        .run(&[
            "pages",
            "requeue",
            "--page-id",
            PAGE_ID,
            "--user-psid",
            aside,
        ])
        .await;
    assert_eq!(code, 0, "pages requeue: {stderr}");
    assert!(
        stdout.contains(&format!("requeued {PAGE_ID} / {aside}"))
            && stdout.contains("1 conversation(s)"),
        "{stdout}"
    );
    let events = pipeline
        .wait_for_conversation(PAGE_ID, aside, 6, Duration::from_secs(30))
        .await;
    let mut stored = mids(&events);
    assert_eq!(stored.len(), 6, "{events:#?}");
    assert!(sorted_by_timestamp(&events));
    stored.sort();
    let expected: Vec<String> = (0..6).map(|n| format!("m_{aside}_{n}")).collect();
    assert_eq!(stored, expected);
    let page = listed(&pipeline, PAGE_ID).await.expect("listed");
    assert_eq!(
        (&page["set_aside"], &page["staged"]),
        (&0.into(), &0.into())
    );
    wait_for_sample(&metrics_url, set_aside_gauge, 0.0, Duration::from_secs(20)).await;
    process.stop().await;
    pipeline.cleanup().await;
}

/// The bytes of each object `expected` names (`None`: not stored yet).
async fn stored_objects(pipeline: &Pipeline, expected: &[(String, usize)]) -> Vec<Option<Vec<u8>>> {
    let mut all = Vec::new();
    for (key, _) in expected {
        all.push(pipeline.object(key).await);
    }
    all
}

/// The events that name no person by id, or arrive on other channels, are kept where the
/// README's layout says, each once, and none is dead-lettered: the Page's own events in its
/// `page_events.json`, a plugin's `user_ref` in `conversations/user_ref_<ref>.json`, handover,
/// standby and cart events in the person's conversation file. The same deliveries again change
/// no byte.
#[tokio::test]
async fn every_kind_of_event_facebook_sends_is_kept_once_and_none_is_dead_lettered() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let client = reqwest::Client::new();
    let names = [
        "policy_enforcement.json",
        "app_roles.json",
        "pass_thread_control.json",
        "take_thread_control.json",
        "standby.json",
        "optin_user_ref.json",
        "chat_plugin_referral.json",
        "send_cart.json",
    ];
    let page_events = format!("users/{USER_UUID}/facebook_messenger/{PAGE_ID}/page_events.json");
    let expected = [
        (page_events.clone(), 2),
        (conversation_key(PAGE_ID, FIXTURE_USER), 4),
        (conversation_key(PAGE_ID, "user_ref_cbx-8f3a2c"), 1),
        (conversation_key(PAGE_ID, "user_ref_guest-4b1e"), 1),
    ];
    for name in names {
        assert_eq!(
            post_signed(&client, &ingest.webhook, &fixture(name)).await,
            200,
            "{name}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let objects = stored_objects(&pipeline, &expected).await;
        let counts: Vec<usize> = objects
            .iter()
            .map(|bytes| {
                bytes.as_ref().map_or(0, |bytes| {
                    serde_json::from_slice::<Vec<Value>>(bytes).map_or(0, |events| events.len())
                })
            })
            .collect();
        if counts == expected.iter().map(|(_, n)| *n).collect::<Vec<_>>() {
            break objects;
        }
        assert!(
            Instant::now() < deadline,
            "stored so far: {counts:?} of {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let page_level: Vec<Value> =
        serde_json::from_slice(first[0].as_ref().expect("page events")).expect("an array");
    assert!(sorted_by_timestamp(&page_level));
    assert!(
        page_level[0]["policy_enforcement"]["action"] == "warning",
        "{page_level:?}"
    );
    let letters = pipeline.dlq_list(&[]).await.expect("dlq list");
    assert!(letters.is_empty(), "nothing dead-lettered: {letters:?}");

    // Again: the same bytes everywhere.
    for name in names {
        assert_eq!(
            post_signed(&client, &ingest.webhook, &fixture(name)).await,
            200,
            "{name}"
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stored_objects(&pipeline, &expected).await,
        first,
        "a second delivery changes nothing"
    );

    // Facebook's warning shows on the Page; a block marks it, an unblock lifts it, and a block
    // older than the unblock (arriving late) does not come back.
    let enforcement = |action: &str, timestamp: i64| {
        format!(
            r#"{{"object":"page","entry":[{{"id":"{PAGE_ID}","time":{timestamp},"messaging":[{{"recipient":{{"id":"{PAGE_ID}"}},"timestamp":{timestamp},"policy_enforcement":{{"action":"{action}","reason":"Spammy messages"}}}}]}}]}}"#
        )
    };
    let page_listed = || listed(&pipeline, PAGE_ID);
    assert_eq!(
        page_listed().await.expect("listed")["policy_enforcement"]["action"],
        "warning"
    );
    let (blocked_at, unblocked_at, late_at) =
        (1_468_152_800_000_i64, 1_468_152_900_000, 1_468_152_850_000);
    for (action, timestamp) in [
        ("block", blocked_at),
        ("unblock", unblocked_at),
        ("block", late_at),
    ] {
        let body = enforcement(action, timestamp);
        assert_eq!(
            post_signed(&client, &ingest.webhook, body.as_bytes()).await,
            200
        );
        // Once the event is stored, the Page's record has seen it too.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pipeline
            .object(&page_events)
            .await
            .is_some_and(|bytes| String::from_utf8_lossy(&bytes).contains(&timestamp.to_string()))
        {
            assert!(
                Instant::now() < deadline,
                "the {action} at {timestamp} is not stored"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let page = page_listed().await.expect("listed");
        let (blocked, recorded) = match timestamp {
            t if t == blocked_at => (true, blocked_at),
            t if t == unblocked_at => (false, unblocked_at),
            _ => (false, unblocked_at),
        };
        assert_eq!(
            page["messaging_blocked"], blocked,
            "after {action} at {timestamp}: {page}"
        );
        assert_eq!(page["policy_enforcement"]["at_ms"], recorded, "{page}");
    }
    let (_, table, _) = pipeline.run(&["pages", "list"]).await;
    assert!(!table.contains("messaging blocked"), "{table}");
    process.stop().await;
    pipeline.cleanup().await;
}
