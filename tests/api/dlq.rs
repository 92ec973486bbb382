//! The dead-letter queue tools: list with filters, replay after the cause is fixed, purge, and
//! dry runs that change nothing; events staged for a Page that was removed come here
//! (`page_removed`) and replay once it is back; replay streams 100,000 letters and never leaves
//! two copies of one, and skips and reports a letter whose queue does not exist.

use std::time::Duration;

use fbsync_shared::facebook::event::{EventMessage, describe_messaging_event};
use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::{Outgoing, Topology, connect, publish_confirmed};
use fbsync_worker::dead_letter::{DeadLetterInfo, DeadReason};
use lapin::options::ConfirmSelectOptions;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::common::broker::{AMQP_URL, drain_queue, queue_depth};
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::fbsync_command;
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
    pipeline
        .dead_letters(&[], count, Duration::from_secs(30))
        .await;
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
    let (code, stdout, stderr) = pipeline.run(&["dlq", "purge", "--page-id", "777"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("purged 3"), "{stdout}");
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("WARN"),
        "a purge that succeeds prints no error: {stderr}"
    );
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

/// Events staged for a Page that is then removed are not retried forever: the flusher moves
/// them to the DLQ as `page_removed` and deletes their staged rows; the Page is gone from
/// `pages list`; once it is added again, `dlq replay --reason page_removed` stores every one of
/// them exactly once.
#[tokio::test]
async fn events_staged_for_a_removed_page_are_dead_lettered_and_replayed_once_it_is_back() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;

    // A first worker stages the events but never flushes them: its flusher looks at the stage
    // once at start (long before its consumer says it consumes) and then rests for an hour.
    pipeline.set("WORKER_FLUSH_INTERVAL_MS", "3600000");
    let mut first = pipeline.spawn_worker().await;
    let (mut ingest_process, ingest) = pipeline.spawn_ingest().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let users = ["u1", "u2"];
    for n in 0..5 {
        for user in users {
            let body = message_delivery(PAGE_ID, user, &format!("m_{user}_{n}"), 100 + n, false);
            assert_eq!(post_signed(&client, &ingest.webhook, &body).await, 200);
        }
    }
    // Facebook retries one delivery: still ten events.
    let retried = message_delivery(PAGE_ID, "u1", "m_u1_2", 102, false);
    assert_eq!(post_signed(&client, &ingest.webhook, &retried).await, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pipeline.staged_events(&[PAGE_ID]).await < 10 {
        assert!(Instant::now() < deadline, "the events were not staged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pipeline.staged_events(&[PAGE_ID]).await, 10);
    first.stop().await;
    for user in users {
        assert!(
            pipeline.conversation(PAGE_ID, user).await.is_none(),
            "{user} was flushed before the Page was removed"
        );
    }

    let (code, stdout, stderr) = pipeline
        .run(&["pages", "remove", "--page-id", PAGE_ID])
        .await;
    assert_eq!(code, 0, "pages remove: {stderr}");
    assert!(stdout.contains("removed"), "{stdout}");
    let (code, listing, _) = pipeline.run(&["pages", "list", "--json"]).await;
    assert_eq!(code, 0);
    assert!(!listing.contains(PAGE_ID), "still listed: {listing}");

    // A worker that flushes: the ten events go to the DLQ as page_removed.
    pipeline.set("WORKER_FLUSH_INTERVAL_MS", "50");
    let mut worker = pipeline.spawn_worker().await;
    wait_for_dead_letters(&pipeline, 10).await;
    let letters = list(&pipeline, &[]).await;
    assert!(
        letters.iter().all(|l| l["reason"] == "page_removed"
            && l["kind"] == "conversation"
            && l["routing_key"] == "conversation"
            && l["page_id"] == PAGE_ID),
        "{letters:#?}"
    );
    let mut ids: Vec<&str> = letters
        .iter()
        .filter_map(|l| l["event_id"].as_str())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "one letter per event: {letters:#?}");
    assert!(
        letters[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("removed")),
        "{letters:#?}"
    );
    assert_eq!(
        list(&pipeline, &["--reason", "page_removed"]).await.len(),
        10
    );
    // Their staged rows are gone: nothing is flushed or dead-lettered again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(list(&pipeline, &[]).await.len(), 10);

    // The Page comes back: nothing of it is staged any more; the replay stores every event once.
    pipeline.register_page(PAGE_ID).await;
    assert_eq!(pipeline.staged_events(&[PAGE_ID]).await, 0);
    assert_eq!(
        pipeline.dlq_replay(&["--reason", "page_removed"]).await,
        Ok(10)
    );
    for user in users {
        let events = pipeline
            .wait_for_conversation(PAGE_ID, user, 5, Duration::from_secs(30))
            .await;
        let mut stored = mids(&events);
        stored.sort();
        let expected: Vec<String> = (0..5).map(|n| format!("m_{user}_{n}")).collect();
        assert_eq!(stored, expected, "{user}: each event exactly once");
    }
    assert!(list(&pipeline, &[]).await.is_empty());
    worker.stop().await;
    ingest_process.stop().await;
    pipeline.cleanup().await;
}

/// Dead letters published with confirms to `<prefix>.dead` as the worker publishes them
/// (the letter's own format, [`DeadLetterInfo::to_outgoing`]): `count` conversation events of
/// [`PAGE_ID`], dead-lettered as `unknown_page`, sent `BATCH` at a time so the test's memory
/// stays bounded; letter `n` goes back to the queue `routing_key(n)`.
async fn publish_dead_letters(
    prefix: &str,
    count: usize,
    routing_key: impl Fn(usize) -> &'static str,
) {
    const BATCH: usize = 2_000;
    let topology = Topology::new(prefix);
    let connection = connect(&AMQP_URL.into(), "fbsync-test-dead-letters")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    topology.declare(&channel).await.expect("topology");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let now = fbsync_shared::now_ms();
    for start in (0..count).step_by(BATCH) {
        let letters: Vec<Outgoing> = (start..count.min(start + BATCH))
            .map(|n| {
                let event = dead_event(n);
                let body = serde_json::to_vec(&event).expect("an event message");
                DeadLetterInfo::new(
                    DeadReason::UnknownPage,
                    format!("page {PAGE_ID} is not registered"),
                    1,
                    routing_key(n),
                    now,
                    now,
                )
                .to_outgoing(&topology, &body, &event.event_id, None)
            })
            .collect();
        publish_confirmed(&channel, &letters)
            .await
            .unwrap_or_else(|e| panic!("dead letters {start}..: {e}"));
    }
    let _ = connection.close(200, "done".into()).await;
}

/// The event of dead letter `n`: message `m_n` from one of 100 people.
fn dead_event(n: usize) -> EventMessage {
    let text = format!(
        r#"{{"sender":{{"id":"{user}"}},"recipient":{{"id":"{PAGE_ID}"}},"timestamp":{ts},"message":{{"mid":"m_{n}","text":"text {n}"}}}}"#,
        user = 5_000_000 + n % 100,
        ts = 1_000 + n,
    );
    let raw = RawValue::from_string(text).expect("JSON");
    describe_messaging_event(PAGE_ID, raw, fbsync_shared::now_ms())
}

/// The peak resident set of a process in kB, read from `/proc/PID/status` (VmHWM), while it
/// still runs.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// 100,000 dead letters: `dlq replay` republishes every one and removes it from the DLQ only
/// once its copy is confirmed, so afterwards the DLQ is empty and the conversation queue holds
/// each exactly once. It streams: the peak RSS of the replay process is printed.
#[tokio::test]
async fn replaying_100_000_dead_letters_moves_each_exactly_once_with_bounded_memory() {
    const LETTERS: usize = 100_000;
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let topology = Topology::new(&pipeline.prefix);
    let started = Instant::now();
    publish_dead_letters(&pipeline.prefix, LETTERS, |_| "conversation").await;
    println!(
        "published {LETTERS} dead letters in {:?}",
        started.elapsed()
    );
    assert_eq!(queue_depth(&topology.dead()).await, LETTERS as u32);

    // `fbsync dlq replay`, with nothing consuming the conversation queue; its VmHWM is read
    // while it runs (the last reading is its peak, give or take its final moments).
    let env: Vec<(&str, &str)> = pipeline
        .vars
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let started = Instant::now();
    let mut replay = fbsync_command(&["dlq", "replay"], &env)
        .spawn()
        .expect("fbsync runs");
    let pid = replay.id().expect("a pid");
    let mut stdout = replay.stdout.take().expect("stdout");
    let mut stderr = replay.stderr.take().expect("stderr");
    let output = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut out, mut err) = (String::new(), String::new());
        let _ = stdout.read_to_string(&mut out).await;
        let _ = stderr.read_to_string(&mut err).await;
        (out, err)
    });
    let mut peak_kb = 0;
    let status = loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak_kb = peak_kb.max(kb);
        }
        match tokio::time::timeout(Duration::from_millis(20), replay.wait()).await {
            Ok(status) => break status.expect("exit status"),
            Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(600),
                    "replay still running after 10 minutes"
                );
            }
        }
    };
    let took = started.elapsed();
    let (stdout, stderr) = output.await.expect("output");
    println!(
        "dlq replay of {LETTERS} letters: {took:?}, peak RSS {peak_kb} kB ({:.1} MB)",
        peak_kb as f64 / 1024.0
    );
    assert!(status.success(), "dlq replay: {status}: {stdout} {stderr}");
    assert_eq!(
        stdout.lines().last().map(str::trim),
        Some("replayed 100000"),
        "{stdout}"
    );
    assert_eq!(
        queue_depth(&topology.dead()).await,
        0,
        "letters left behind"
    );
    assert_eq!(
        queue_depth(&topology.queue(JobKind::Conversation)).await,
        LETTERS as u32,
        "not exactly one copy of each letter"
    );
    pipeline.cleanup().await;
}

/// A letter whose routing key names no queue is skipped and reported (exit status 1, its id
/// named); every other letter is replayed once; the DLQ keeps that one letter and no copy of
/// the others, and a second replay changes nothing.
#[tokio::test]
async fn a_letter_without_a_queue_is_skipped_and_reported_and_the_others_replay_once() {
    const LETTERS: usize = 10;
    const STRAY: usize = 4;
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let topology = Topology::new(&pipeline.prefix);
    publish_dead_letters(&pipeline.prefix, LETTERS, |n| {
        if n == STRAY { "nope" } else { "conversation" }
    })
    .await;
    assert_eq!(list(&pipeline, &[]).await.len(), LETTERS);
    let stray_id = dead_event(STRAY).event_id;
    let conversation = topology.queue(JobKind::Conversation);

    for round in 0..2 {
        let (code, stdout, stderr) = pipeline.run(&["dlq", "replay"]).await;
        assert_eq!(code, 1, "round {round}: {stdout} {stderr}");
        let replayed = if round == 0 { LETTERS - 1 } else { 0 };
        assert!(
            stdout.contains(&format!("replayed {replayed}\n")),
            "round {round}: {stdout}"
        );
        assert!(
            stdout.contains("1 left in the dead-letter queue: their queue does not exist")
                && stdout.contains(&stray_id),
            "round {round}: the stray letter is not reported: {stdout}"
        );
        let left = list(&pipeline, &[]).await;
        assert_eq!(left.len(), 1, "round {round}: {left:#?}");
        assert_eq!(left[0]["routing_key"], "nope");
        assert_eq!(left[0]["event_id"], stray_id.as_str());
        assert_eq!(
            queue_depth(&conversation).await,
            (LETTERS - 1) as u32,
            "round {round}"
        );
    }
    let mut replayed: Vec<String> = drain_queue(&conversation)
        .await
        .into_iter()
        .map(|event| event.event_id)
        .collect();
    replayed.sort();
    let mut expected: Vec<String> = (0..LETTERS)
        .filter(|n| *n != STRAY)
        .map(|n| dead_event(n).event_id)
        .collect();
    expected.sort();
    assert_eq!(
        replayed, expected,
        "each other letter replayed exactly once"
    );
    pipeline.cleanup().await;
}
