//! Graph polling, end to end through the real binary and a fake Graph API: a backfill follows
//! `paging.next` at both levels and stores every message once (the Page's own as echoes), counts
//! the messages whose details are withheld, and never puts a token in a URL; a message that
//! came by webhook and by poll is stored once, the webhook copy; a daily poll after a backfill
//! reads only what changed; a throttled poll is parked and resumes where it stopped; a rejected
//! token flags the Page, dead-letters the job with its reason, and later rounds skip the Page;
//! two schedulers at once enqueue each Page once per period; a worker killed mid-backfill
//! resumes it and nothing is lost or doubled.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::Topology;
use serde_json::Value;

use crate::common::broker::{TcpProxy, queue_depth};
use crate::common::fake_graph::{Failure, FakeGraph, FakeMessage};
use crate::common::pipeline::{DbKind, PAGE_ID, PAGE_TOKEN, Pipeline, StoreKind, conversation_key};
use crate::common::process::FbsyncProcess;
use crate::common::spaces_limits::{SpacesLimits, s3_client, s3_endpoint};
use crate::common::webhook::post_signed;

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);

/// When the fake conversations' messages start: 2024-05-02T09:00:00Z.
const HISTORY_START_MS: i64 = 1_714_640_400_000;

/// A pipeline whose Graph API is `fake`, with the Page registered and known to the fake.
async fn polling_pipeline(db: DbKind, store: StoreKind, fake: &FakeGraph) -> Pipeline {
    let mut pipeline = Pipeline::new(db, store).await;
    pipeline.set("FACEBOOK_GRAPH_URL", &fake.url());
    fake.set_page(PAGE_ID, "Handmade Shop");
    pipeline.register_page(PAGE_ID).await;
    pipeline
}

/// `count` conversations with `psid-<i>` of `messages` messages each, an hour apart.
fn add_conversations(
    fake: &FakeGraph,
    count: usize,
    messages: usize,
) -> Vec<(String, Vec<FakeMessage>)> {
    (0..count)
        .map(|i| {
            let psid = format!("psid-{i}");
            let start = HISTORY_START_MS + i as i64 * 3_600_000;
            let added = fake.add_conversation(PAGE_ID, &psid, messages, start);
            (psid, added)
        })
        .collect()
}

/// Runs `fbsync poll ARGS --wait` and asserts it succeeded.
async fn poll_and_wait(pipeline: &Pipeline, args: &[&str]) -> String {
    let mut all = vec!["poll", "--page-id", PAGE_ID, "--wait"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = tokio::time::timeout(STEP, pipeline.run(&all))
        .await
        .expect("the poll finishes in time");
    assert_eq!(code, 0, "fbsync poll failed: {stdout}{stderr}");
    stderr
}

/// The stored conversation's message ids, in order.
fn mids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["message"]["mid"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The ids of the messages the Graph API gives details of (the 20 most recent).
fn detailed_ids(messages: &[FakeMessage]) -> Vec<String> {
    let skip = messages.len().saturating_sub(20);
    messages[skip..].iter().map(|m| m.id.clone()).collect()
}

/// The Page as `fbsync pages list --json` shows it.
async fn page_listing(pipeline: &Pipeline) -> Value {
    let (code, stdout, stderr) = pipeline.run(&["pages", "list", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("JSON line"))
        .find(|page| page["page_id"] == PAGE_ID)
        .expect("the Page is listed")
}

/// Graph calls for conversation pages (`after`: a page after the first) and message pages.
fn conversation_calls(fake: &FakeGraph) -> (usize, usize, usize) {
    let calls = fake.calls();
    let first = calls
        .iter()
        .filter(|c| c.path.ends_with("/conversations") && !c.query.contains("after="))
        .count();
    let later = calls
        .iter()
        .filter(|c| c.path.ends_with("/conversations") && c.query.contains("after="))
        .count();
    let messages = calls
        .iter()
        .filter(|c| c.path.ends_with("/messages"))
        .count();
    (first, later, messages)
}

#[tokio::test]
async fn a_backfill_follows_every_page_at_both_levels_and_stores_each_message_once() {
    let fake = FakeGraph::start().await;
    let pipeline =
        polling_pipeline(DbKind::Postgres, StoreKind::S3 { endpoint: None }, &fake).await;
    // 5 conversations, 2 per page of results; 3 messages per page of messages; one long
    // conversation whose 3 oldest messages have their details withheld.
    fake.set_paging(2, 3);
    let mut conversations = add_conversations(&fake, 4, 7);
    let long = fake.add_conversation(PAGE_ID, "psid-long", 23, HISTORY_START_MS + 86_400_000);
    conversations.push(("psid-long".into(), long));
    let mut worker = pipeline.spawn_worker().await;

    let progress = poll_and_wait(&pipeline, &["--backfill"]).await;
    assert!(progress.contains("polled 1/1 Pages"), "{progress}");

    for (psid, messages) in &conversations {
        let events = pipeline
            .wait_for_conversation(PAGE_ID, psid, detailed_ids(messages).len(), STEP)
            .await;
        assert_eq!(
            mids(&events),
            detailed_ids(messages),
            "conversation {psid}: each message once, in order"
        );
        for (event, message) in events
            .iter()
            .zip(&messages[messages.len().saturating_sub(20)..])
        {
            assert_eq!(event["message"]["text"], message.text.as_str());
            assert_eq!(
                event["message"]["is_echo"].as_bool().unwrap_or(false),
                message.from_page,
                "the Page's own messages are echoes"
            );
            assert_eq!(event["timestamp"], message.created_ms);
        }
    }
    let listing = page_listing(&pipeline).await;
    assert_eq!(listing["details_unavailable"], 3, "{listing}");
    assert!(listing["last_poll_ms"].is_i64(), "{listing}");
    assert!(
        pipeline
            .object(&format!(
                "users/{}/facebook_messenger/{PAGE_ID}/page_data.json",
                crate::common::pipeline::USER_UUID
            ))
            .await
            .is_some(),
        "the poll writes page_data.json"
    );
    let (first, later, message_pages) = conversation_calls(&fake);
    assert_eq!(
        (first, later),
        (1, 2),
        "three pages of conversations, each read once"
    );
    assert!(
        message_pages >= 5,
        "older messages come from their own pages: {message_pages}"
    );
    for call in fake.calls() {
        assert!(
            !call.query.contains("access_token"),
            "a token in a URL: {}",
            call.query
        );
        assert_eq!(
            call.token.as_deref(),
            Some(PAGE_TOKEN),
            "the token goes in the header"
        );
    }
    worker.stop().await;
    let logs = worker.take_lines().join("\n");
    assert!(!logs.contains(PAGE_TOKEN), "a token in the worker's log");
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_backfill_writes_new_conversations_unread_and_merges_into_objects_already_stored() {
    let fake = FakeGraph::start().await;
    let (mut pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    pipeline.set("FACEBOOK_GRAPH_URL", &fake.url());
    fake.set_page(PAGE_ID, "Handmade Shop");
    pipeline.register_page(PAGE_ID).await;
    let conversations = add_conversations(&fake, 3, 2);
    // The Python app stored psid-0's conversation before fbsync ever ran.
    let earlier = format!(
        r#"[{{"sender":{{"id":"psid-0"}},"recipient":{{"id":"{PAGE_ID}"}},"timestamp":1000,"message":{{"mid":"m_from_the_python_app","text":"hello"}}}}]"#
    );
    s3_client(&s3_endpoint())
        .put_object()
        .bucket(pipeline.bucket.as_deref().expect("S3"))
        .key(conversation_key(PAGE_ID, "psid-0"))
        .body(earlier.into_bytes().into())
        .send()
        .await
        .expect("put");
    let mut worker = pipeline.spawn_worker().await;
    poll_and_wait(&pipeline, &["--backfill"]).await;

    let kept = pipeline
        .wait_for_conversation(PAGE_ID, "psid-0", 3, STEP)
        .await;
    let mut expected = vec!["m_from_the_python_app".to_string()];
    expected.extend(detailed_ids(&conversations[0].1));
    assert_eq!(mids(&kept), expected, "what was stored before stays");
    assert!(
        layer.gets_for("psid-0.json") >= 1,
        "an object that exists is read first"
    );
    for (psid, messages) in &conversations[1..] {
        let events = pipeline.wait_for_conversation(PAGE_ID, psid, 2, STEP).await;
        assert_eq!(mids(&events), detailed_ids(messages));
        assert_eq!(
            layer.gets_for(&format!("{psid}.json")),
            0,
            "{psid}: listed absent, written with one request"
        );
    }
    assert_eq!(layer.throttled(), 0);
    worker.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_message_that_came_by_webhook_and_by_poll_is_stored_once_as_the_webhook_copy() {
    let fake = FakeGraph::start().await;
    let pipeline = polling_pipeline(DbKind::Sqlite, StoreKind::Local, &fake).await;
    let messages = fake.add_conversation(PAGE_ID, "psid-w", 2, HISTORY_START_MS);
    let (mut up, urls) = pipeline.up().await;
    // The webhook copy of the first message, with a field the poll cannot know.
    let webhook_event = format!(
        r#"{{"sender":{{"id":"psid-w"}},"recipient":{{"id":"{PAGE_ID}"}},"timestamp":{},"message":{{"mid":"{}","text":"{}","quick_reply":{{"payload":"BLUE_MUG"}}}}}}"#,
        messages[0].created_ms, messages[0].id, messages[0].text
    );
    let delivery = format!(
        r#"{{"object":"page","entry":[{{"id":"{PAGE_ID}","time":1,"messaging":[{webhook_event}]}}]}}"#
    );
    let client = reqwest::Client::new();
    assert_eq!(
        post_signed(&client, &urls.webhook, delivery.as_bytes()).await,
        200
    );
    pipeline
        .wait_for_conversation(PAGE_ID, "psid-w", 1, STEP)
        .await;

    poll_and_wait(&pipeline, &["--backfill"]).await;
    let events = pipeline
        .wait_for_conversation(PAGE_ID, "psid-w", 2, STEP)
        .await;
    assert_eq!(
        mids(&events),
        [messages[0].id.clone(), messages[1].id.clone()]
    );
    assert_eq!(
        events[0]["message"]["quick_reply"]["payload"], "BLUE_MUG",
        "the webhook copy stays: {}",
        events[0]
    );
    up.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_daily_poll_after_a_backfill_reads_only_what_changed() {
    let fake = FakeGraph::start().await;
    let pipeline = polling_pipeline(DbKind::Sqlite, StoreKind::Local, &fake).await;
    fake.set_paging(2, 3);
    add_conversations(&fake, 6, 5);
    let mut worker = pipeline.spawn_worker().await;
    poll_and_wait(&pipeline, &["--backfill"]).await;
    let after_backfill = fake.calls().len();

    // One new message in one conversation, after the backfill began.
    let created = (fbsync_shared::now_ms() / 1000 + 2) * 1000;
    let new = fake.add_message(PAGE_ID, "psid-2", created);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    poll_and_wait(&pipeline, &[]).await;
    let daily: Vec<_> = fake.calls()[after_backfill..].to_vec();
    let conversation_pages = daily
        .iter()
        .filter(|c| c.path.ends_with("/conversations"))
        .count();
    let message_pages = daily
        .iter()
        .filter(|c| c.path.ends_with("/messages"))
        .count();
    assert_eq!(
        (conversation_pages, message_pages),
        (1, 0),
        "the daily poll stops at the first conversation not updated since the backfill: {daily:?}"
    );
    let events = pipeline
        .wait_for_conversation(PAGE_ID, "psid-2", 6, STEP)
        .await;
    assert_eq!(mids(&events).last(), Some(&new.id));
    let listing = page_listing(&pipeline).await;
    assert_eq!(listing["details_unavailable"], 0, "{listing}");
    worker.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_throttled_poll_is_parked_and_resumes_where_it_stopped() {
    let fake = FakeGraph::start().await;
    let mut pipeline = polling_pipeline(DbKind::Sqlite, StoreKind::Local, &fake).await;
    // A rate limit's wait is longer than the park threshold: the job is parked, not held.
    pipeline.set("WORKER_PARK_AFTER_MS", "100");
    pipeline.set("WORKER_RETRY_BASE_MS", "400");
    fake.set_paging(2, 10);
    let conversations = add_conversations(&fake, 6, 4);
    // Metadata, conversations page 1, then page 2 is throttled.
    fake.fail_after(
        PAGE_ID,
        2,
        Failure::RateLimited {
            code: 613,
            regain_minutes: 0,
        },
    );
    let mut worker = pipeline.spawn_worker().await;
    poll_and_wait(&pipeline, &["--backfill"]).await;
    for (psid, messages) in &conversations {
        let events = pipeline.wait_for_conversation(PAGE_ID, psid, 4, STEP).await;
        assert_eq!(
            mids(&events),
            detailed_ids(messages),
            "{psid}: nothing lost or doubled"
        );
    }
    let (first, later, _) = conversation_calls(&fake);
    assert_eq!(first, 1, "the resumed poll does not start over");
    assert_eq!(
        later, 3,
        "page 2 twice (throttled, then resumed), page 3 once"
    );
    worker
        .wait_for_log("job parked until it may run again", STEP)
        .await;
    assert!(pipeline.dlq_list(&[]).await.expect("dlq").is_empty());
    worker.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_rejected_token_flags_the_page_dead_letters_the_job_and_later_rounds_skip_the_page() {
    let fake = FakeGraph::start().await;
    let pipeline = polling_pipeline(DbKind::Sqlite, StoreKind::Local, &fake).await;
    fake.set_page("111", "Another Shop");
    pipeline.register_page("111").await;
    fake.push_failure(PAGE_ID, Failure::TokenExpired);
    let mut worker = pipeline.spawn_worker().await;
    let (code, _, stderr) = tokio::time::timeout(
        STEP,
        pipeline.run(&["poll", "--page-id", PAGE_ID, "--wait"]),
    )
    .await
    .expect("in time");
    assert_eq!(code, 1, "a failed poll fails the wait: {stderr}");
    assert!(stderr.contains("token"), "{stderr}");
    let letters = pipeline.dead_letters(&["--kind", "poll"], 1, STEP).await;
    assert_eq!(letters[0]["reason"], "token_error");
    assert_eq!(letters[0]["page_id"], PAGE_ID);
    let listing = page_listing(&pipeline).await;
    assert_eq!(listing["status"], "needs_reauth", "{listing}");

    worker.stop().await;
    let (code, stdout, stderr) = pipeline.run(&["scheduler", "--once"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("enqueued 1 poll jobs"),
        "only the other Page: {stdout}"
    );
    let (_, table, _) = pipeline.run(&["pages", "list"]).await;
    assert!(
        table.contains("polls skip it until it is connected again"),
        "{table}"
    );
    pipeline.cleanup().await;
}

#[tokio::test]
async fn two_schedulers_at_once_enqueue_each_page_once_per_period() {
    let fake = FakeGraph::start().await;
    let mut pipeline = polling_pipeline(DbKind::Postgres, StoreKind::Local, &fake).await;
    for page in ["201", "202", "203", "204"] {
        pipeline.register_page(page).await;
    }
    let (a, b) = tokio::join!(
        pipeline.run(&["scheduler", "--once"]),
        pipeline.run(&["scheduler", "--once"])
    );
    assert_eq!((a.0, b.0), (0, 0), "{} {}", a.2, b.2);
    let queue = Topology::new(&pipeline.prefix).queue(JobKind::Poll);
    assert_eq!(
        queue_depth(&queue).await,
        5,
        "one job per Page: {}{}",
        a.1,
        b.1
    );
    let (_, again, _) = pipeline.run(&["scheduler", "--once"]).await;
    assert!(again.contains("enqueued 0 poll jobs"), "{again}");
    assert_eq!(queue_depth(&queue).await, 5);

    // The running scheduler plans each new period: every 2 seconds here, no spread.
    pipeline.set("POLL_SCHEDULE", "*/2 * * * * *");
    pipeline.set("POLL_SPREAD", "0");
    let mut scheduler = pipeline.spawn(&["scheduler"]);
    let deadline = Instant::now() + STEP;
    while queue_depth(&queue).await < 10 {
        assert!(
            Instant::now() < deadline,
            "the next period's jobs never came"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its log says what it did in fields an operator can read and filter, not a Debug dump.
    let planned = scheduler.wait_for_log("poll jobs enqueued", STEP).await;
    assert!(
        planned["fields"]["enqueued"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{planned}"
    );
    assert_eq!(planned["fields"]["failed"], 0, "{planned}");
    assert!(!planned.to_string().contains("RoundReport"), "{planned}");
    scheduler.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_mid_backfill_resumes_it_and_nothing_is_lost_or_doubled() {
    let fake = FakeGraph::start().await;
    let mut pipeline = polling_pipeline(DbKind::Sqlite, StoreKind::Local, &fake).await;
    pipeline.set("WORKER_LEASE_MS", "2000");
    fake.set_paging(2, 10);
    let conversations = add_conversations(&fake, 12, 6);
    // The Graph API's answers wait for the test: metadata and two pages of conversations
    // go through, the third page is in flight when the worker dies.
    let holds: Vec<_> = (0..5).map(|_| fake.hold_next(PAGE_ID)).collect();
    for hold in &holds[..3] {
        hold.release();
    }
    let mut worker = pipeline.spawn_worker().await;
    let (code, _, stderr) = pipeline
        .run(&["poll", "--page-id", PAGE_ID, "--backfill"])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let deadline = Instant::now() + STEP;
    while conversation_calls(&fake).1 < 2 {
        assert!(Instant::now() < deadline, "the backfill never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill_hard().await;
    holds[3].release();
    let mut restarted: FbsyncProcess = pipeline.spawn_worker().await;
    holds[4].release();
    let deadline = Instant::now() + STEP;
    while !page_listing(&pipeline).await["last_poll_ms"].is_i64() {
        assert!(Instant::now() < deadline, "the backfill never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (psid, messages) in &conversations {
        let events = pipeline.wait_for_conversation(PAGE_ID, psid, 6, STEP).await;
        let ids = mids(&events);
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            ids.len(),
            "{psid}: no duplicates"
        );
        assert_eq!(ids, detailed_ids(messages), "{psid}: nothing lost");
    }
    restarted.stop().await;
    pipeline.cleanup().await;
}

/// The broker away for longer than INGEST_RECONCILE_AFTER_MS (ingest answering 503, so Facebook
/// would retry and then give up): once ingest takes deliveries again, every active Page is
/// polled back to the window's start, and a message Facebook never delivered meanwhile is
/// stored from the Conversations API, without anyone asking.
#[tokio::test]
async fn an_ingest_outage_of_more_than_the_threshold_is_followed_by_a_poll_of_the_gap() {
    let fake = FakeGraph::start().await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut pipeline = polling_pipeline(DbKind::Sqlite, StoreKind::Local, &fake).await;
    pipeline.set("AMQP_URL", &proxy.amqp_url());
    pipeline.set("INGEST_RECONCILE_AFTER_MS", "1500");
    // No daily round during the test: only the reconciliation may read the gap.
    pipeline.set("POLL_SPREAD", "30d");
    // The person's conversation has history from long ago, which the gap's poll leaves alone.
    fake.add_conversation(PAGE_ID, "psid-0", 2, HISTORY_START_MS);
    let (mut process, urls) = pipeline.up().await;
    let client = reqwest::Client::new();
    let delivery = |mid: &str| {
        format!(
            r#"{{"object":"page","entry":[{{"id":"{PAGE_ID}","time":1,"messaging":[{{"sender":{{"id":"psid-0"}},"recipient":{{"id":"{PAGE_ID}"}},"timestamp":{},"message":{{"mid":"{mid}","text":"hi"}}}}]}}]}}"#,
            fbsync_shared::now_ms()
        )
    };
    assert_eq!(
        post_signed(&client, &urls.webhook, delivery("m_before").as_bytes()).await,
        200
    );

    proxy.cut();
    assert_eq!(
        post_signed(&client, &urls.webhook, delivery("m_refused").as_bytes()).await,
        503
    );
    // Meanwhile a person writes; Facebook's delivery of it never gets through.
    let missed = fake.add_message(PAGE_ID, "psid-0", fbsync_shared::now_ms());
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    proxy.restore();
    let deadline = Instant::now() + STEP;
    while post_signed(&client, &urls.webhook, delivery("m_after").as_bytes()).await != 200 {
        assert!(
            Instant::now() < deadline,
            "ingest did not take deliveries again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + STEP;
    loop {
        let stored = pipeline
            .conversation(PAGE_ID, "psid-0")
            .await
            .unwrap_or_default();
        let ids = mids(&stored);
        // The webhook copies and the polled one are flushed separately: wait for all three.
        let all = [missed.id.as_str(), "m_before", "m_after"]
            .iter()
            .all(|mid| ids.iter().any(|id| id == mid));
        if all {
            assert_eq!(ids.len(), 3, "the old history was not read again: {ids:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the missed message was not polled: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    process.stop().await;
    pipeline.cleanup().await;
}
