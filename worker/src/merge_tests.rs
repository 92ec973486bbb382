//! Unit tests of the merge: order, de-duplication, the webhook copy winning, the appended fast path.

use super::*;

const PAGE: &str = "p1";

fn message(mid: &str, ts: i64, text: &str) -> String {
    format!(
        r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"message":{{"mid":"{mid}","text":"{text}"}}}}"#
    )
}

fn webhook(body: &str) -> IncomingEvent<'_> {
    IncomingEvent {
        body,
        source: EventSource::Webhook,
    }
}

fn ids(merged: &Merged) -> Vec<String> {
    let events: Vec<Value> = serde_json::from_slice(&merged.body).expect("array");
    events
        .iter()
        .map(|e| EventFacts::of(PAGE, e).identity)
        .collect()
}

#[test]
fn duplicates_vanish_and_order_is_by_timestamp() {
    let (a, b, c) = (
        message("m_a", 30, "a"),
        message("m_b", 10, "b"),
        message("m_c", 20, "c"),
    );
    let merged = merge_events(
        PAGE,
        None,
        None,
        &[
            webhook(&a),
            webhook(&b),
            webhook(&a),
            webhook(&c),
            webhook(&b),
        ],
    )
    .expect("merges");
    assert_eq!(ids(&merged), ["mid:m_b", "mid:m_c", "mid:m_a"]);
    assert!(merged.changed);
}

#[test]
fn out_of_order_arrival_across_flushes_gives_the_same_file() {
    let (a, b) = (message("m_a", 1, "a"), message("m_b", 2, "b"));
    let first = merge_events(PAGE, None, None, &[webhook(&b)]).expect("merges");
    let second = merge_events(PAGE, Some(&first.body), None, &[webhook(&a)]).expect("merges");
    let at_once = merge_events(PAGE, None, None, &[webhook(&a), webhook(&b)]).expect("merges");
    assert_eq!(second.body, at_once.body);
}

#[test]
fn replaying_what_is_stored_changes_nothing() {
    let a = message("m_a", 1, "a");
    let stored = merge_events(PAGE, None, None, &[webhook(&a)]).expect("merges");
    let again = merge_events(PAGE, Some(&stored.body), None, &[webhook(&a)]).expect("merges");
    assert!(!again.changed);
    assert_eq!(again.body, stored.body);
}

#[test]
fn echoes_deliveries_and_reads_share_the_user_file() {
    let echo = r#"{"sender":{"id":"p1"},"recipient":{"id":"u1"},"timestamp":5,"message":{"mid":"m_e","is_echo":true,"text":"hi"}}"#;
    let delivery = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":0,"delivery":{"mids":["m_e"],"watermark":5}}"#;
    let read =
        r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":7,"read":{"watermark":5}}"#;
    let merged = merge_events(
        PAGE,
        None,
        None,
        &[
            webhook(read),
            webhook(echo),
            webhook(delivery),
            webhook(read),
        ],
    )
    .expect("merges");
    assert_eq!(ids(&merged), ["delivery:5", "mid:m_e", "read:5"]);
}

#[test]
fn a_webhook_copy_replaces_a_polled_one_but_not_the_reverse() {
    let polled = message("m_x", 100, "hello");
    let webhook_copy = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":100,"message":{"mid":"m_x","text":"hello","seq":3}}"#;
    let stored = merge_events(
        PAGE,
        None,
        None,
        &[IncomingEvent {
            body: &polled,
            source: EventSource::Poll,
        }],
    )
    .expect("merges");
    let upgraded =
        merge_events(PAGE, Some(&stored.body), None, &[webhook(webhook_copy)]).expect("merges");
    assert_eq!(upgraded.index.events, 1);
    assert!(String::from_utf8_lossy(&upgraded.body).contains("\"seq\":3"));
    let kept = merge_events(
        PAGE,
        Some(&upgraded.body),
        None,
        &[IncomingEvent {
            body: &polled,
            source: EventSource::Poll,
        }],
    )
    .expect("merges");
    assert!(!kept.changed);
}

#[test]
fn a_polled_echo_with_attachments_gives_way_to_the_webhook_echo() {
    let polled = r#"{"sender":{"id":"p1"},"recipient":{"id":"u1"},"timestamp":9,"message":{"mid":"m_i","text":"","is_echo":true,"attachments":[{"id":"a1","mime_type":"image/jpeg"}]}}"#;
    let webhook_echo = r#"{"sender":{"id":"p1"},"recipient":{"id":"u1"},"timestamp":9,"message":{"mid":"m_i","is_echo":true,"app_id":7,"attachments":[{"type":"image","payload":{"url":"https://x"}}]}}"#;
    let stored = merge_events(
        PAGE,
        None,
        None,
        &[IncomingEvent {
            body: polled,
            source: EventSource::Poll,
        }],
    )
    .expect("merges");
    let upgraded =
        merge_events(PAGE, Some(&stored.body), None, &[webhook(webhook_echo)]).expect("merges");
    assert_eq!(upgraded.index.events, 1);
    assert_eq!(upgraded.body, format!("[{webhook_echo}]").into_bytes());
}

#[test]
fn raw_text_is_kept_and_legacy_duplicates_are_healed() {
    let escaped = r#"{"sender":{"id":"u1"},"recipient":{"id":"p1"},"timestamp":1,"message":{"mid":"m_u","text":"abecad\u0142o"}}"#;
    let legacy = format!("[{escaped},{escaped}]");
    let merged = merge_events(PAGE, Some(legacy.as_bytes()), None, &[]).expect("merges");
    assert_eq!(merged.index.events, 1);
    assert!(merged.changed);
    assert!(String::from_utf8_lossy(&merged.body).contains(r"abecad\u0142o"));
}

#[test]
fn a_corrupt_object_is_refused_not_overwritten() {
    let a = message("m_a", 1, "a");
    assert!(matches!(
        merge_events(PAGE, Some(b"{oops"), None, &[webhook(&a)]),
        Err(MergeError::CorruptObject(_))
    ));
}

#[test]
fn an_event_after_the_last_is_appended_without_parsing_the_stored_file() {
    let (a, b, c) = (
        message("m_a", 1, "a"),
        message("m_b", 2, "b"),
        message("m_c", 3, "c"),
    );
    let stored = merge_events(PAGE, None, None, &[webhook(&a), webhook(&b)]).expect("merges");
    let appended = merge_events(
        PAGE,
        Some(&stored.body),
        Some(stored.index.clone()),
        &[webhook(&c)],
    )
    .expect("merges");
    assert!(appended.appended && appended.changed);
    let full = merge_events(PAGE, Some(&stored.body), None, &[webhook(&c)]).expect("merges");
    assert_eq!((&appended.body, &appended.index), (&full.body, &full.index));
    // The stored events are not parsed: bytes a full merge would refuse are copied as
    // they are (an index is only ever used with the very bytes it describes).
    let unreadable = String::from_utf8(stored.body.clone())
        .expect("utf-8")
        .replacen("\"text\":\"a\"", "\"text\":a", 1);
    let copied = merge_events(
        PAGE,
        Some(unreadable.as_bytes()),
        Some(stored.index),
        &[webhook(&c)],
    )
    .expect("appends");
    assert!(
        copied
            .body
            .starts_with(&unreadable.as_bytes()[..unreadable.len() - 1])
    );
}

#[test]
fn a_copy_of_a_stored_event_or_an_older_event_takes_the_full_merge() {
    let (a, b) = (message("m_a", 1, "a"), message("m_b", 5, "b"));
    let stored = merge_events(PAGE, None, None, &[webhook(&b)]).expect("merges");
    let older = merge_events(
        PAGE,
        Some(&stored.body),
        Some(stored.index.clone()),
        &[webhook(&a)],
    )
    .expect("merges");
    assert!(!older.appended);
    assert_eq!(ids(&older), ["mid:m_a", "mid:m_b"]);
    // A read with the same watermark, later: same identity, so it is not a new event.
    let read = |ts: i64| {
        format!(
            r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"read":{{"watermark":5}}}}"#
        )
    };
    let (first_read, later_read) = (read(6), read(9));
    let with_read = merge_events(
        PAGE,
        Some(&stored.body),
        Some(stored.index),
        &[webhook(&first_read)],
    )
    .expect("merges");
    assert!(with_read.appended);
    let again = merge_events(
        PAGE,
        Some(&with_read.body),
        Some(with_read.index),
        &[webhook(&later_read)],
    )
    .expect("merges");
    assert!(!again.appended && !again.changed);
}

/// Flushes of random batches (out of order, duplicated, polled and webhook copies of the
/// same message with different timestamps, reads sharing a watermark), each merged twice:
/// with the index of the previous file (appending when it can) and without (the full
/// merge). The files must be byte-for-byte the same after every flush.
#[test]
fn appending_writes_byte_for_byte_what_the_full_merge_writes() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let mut appends = 0;
    let mut flushes = 0;
    for seed in 0..300_u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut clock = 1_000_i64;
        let mut full: Option<Vec<u8>> = None;
        let mut carried: Option<(Vec<u8>, FileIndex)> = None;
        for _ in 0..rng.random_range(1..12) {
            let mut batch = Vec::new();
            for _ in 0..rng.random_range(0..6) {
                // Mostly forward in time, sometimes back (late or re-delivered events).
                clock += rng.random_range(0..5);
                let ts = if rng.random_bool(0.2) {
                    clock - rng.random_range(0..40)
                } else {
                    clock
                };
                let mid = rng.random_range(0..25);
                let body = match rng.random_range(0..5) {
                    0 => format!(
                        r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"read":{{"watermark":{}}}}}"#,
                        ts / 10
                    ),
                    // A polled reconstruction: the timestamp in whole seconds.
                    1 => message(&format!("m_{mid}"), ts - ts % 1000, "x"),
                    2 => format!(
                        r#"{{"sender":{{"id":"u1"}},"recipient":{{"id":"p1"}},"timestamp":{ts},"message":{{"mid":"m_{mid}","text":"x","seq":1}}}}"#
                    ),
                    _ => message(&format!("m_{mid}_{ts}"), ts, "y"),
                };
                let source = if rng.random_bool(0.3) {
                    EventSource::Poll
                } else {
                    EventSource::Webhook
                };
                batch.push((body, source));
            }
            let incoming: Vec<IncomingEvent<'_>> = batch
                .iter()
                .map(|(body, source)| IncomingEvent {
                    body,
                    source: *source,
                })
                .collect();
            let expected =
                merge_events(PAGE, full.as_deref(), None, &incoming).expect("full merge");
            let (stored, index) = carried.take().unzip();
            let got = merge_events(PAGE, stored.as_deref(), index, &incoming).expect("merges");
            assert_eq!(
                String::from_utf8_lossy(&got.body),
                String::from_utf8_lossy(&expected.body),
                "seed {seed}"
            );
            assert_eq!(got.changed, expected.changed, "seed {seed}");
            assert_eq!(got.index, expected.index, "seed {seed}");
            appends += usize::from(got.appended);
            flushes += 1;
            full = Some(expected.body);
            carried = Some((got.body, got.index));
        }
    }
    // Both ways were exercised.
    assert!(
        appends > flushes / 10,
        "{appends} appends in {flushes} flushes"
    );
    assert!(
        appends < flushes * 9 / 10,
        "{appends} appends in {flushes} flushes"
    );
}
