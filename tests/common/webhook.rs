//! Facebook's side of the webhook: deliveries signed with the test app secret, one message a
//! delivery, bursts of them from concurrent senders that record every answer, and the retries
//! of refused deliveries (Facebook re-sends a delivery that did not get a 200).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fbsync_shared::facebook::signature::sign_sha256;
use tokio::time::Instant;

pub const APP_SECRET: &str = "test-app-secret";
pub const VERIFY_TOKEN: &str = "test-verify-token";

/// POSTs `body` to `url` signed with [`APP_SECRET`]; returns the status, 0 when the request
/// itself failed.
pub async fn post_signed(client: &reqwest::Client, url: &str, body: &[u8]) -> u16 {
    client
        .post(url)
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign_sha256(APP_SECRET, body))
        .body(body.to_vec())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// A client that gives up on a request after 10 s (Facebook waits about 5 s).
pub fn webhook_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A delivery of one text message from `user` to `page` (or, with `echo`, from the page).
pub fn message_delivery(
    page_id: &str,
    user_psid: &str,
    mid: &str,
    timestamp: i64,
    echo: bool,
) -> Vec<u8> {
    let (sender, recipient, echo_field) = if echo {
        (page_id, user_psid, r#""is_echo":true,"#)
    } else {
        (user_psid, page_id, "")
    };
    format!(
        r#"{{"object":"page","entry":[{{"id":"{page_id}","time":{timestamp},"messaging":[{{"sender":{{"id":"{sender}"}},"recipient":{{"id":"{recipient}"}},"timestamp":{timestamp},"message":{{{echo_field}"mid":"{mid}","text":"text {mid}"}}}}]}}]}}"#
    )
    .into_bytes()
}

/// One webhook delivery of one message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub page_id: String,
    pub user: String,
    pub mid: String,
    pub body: Vec<u8>,
}

/// `per_conversation` messages to each of `conversations` users (`{tag}user{c}`) of `page_id`,
/// interleaved across conversations; timestamps run backwards in odd conversations (arrival
/// order is not file order) and every 7th message is a Page echo.
pub fn conversation_burst(
    page_id: &str,
    tag: &str,
    conversations: usize,
    per_conversation: usize,
) -> Vec<Delivery> {
    let mut deliveries = Vec::with_capacity(conversations * per_conversation);
    for n in 0..per_conversation {
        for c in 0..conversations {
            let user = format!("{tag}user{c}");
            let mid = format!("m_{tag}_{c}_{n}");
            let timestamp = if c % 2 == 0 {
                1_000 + n as i64
            } else {
                1_000_000 - n as i64
            };
            deliveries.push(Delivery {
                body: message_delivery(page_id, &user, &mid, timestamp, n % 7 == 0),
                page_id: page_id.to_string(),
                user,
                mid,
            });
        }
    }
    deliveries
}

/// One answer of ingest to one POST.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // The api target reads statuses only; the reliability target, timings too.
pub struct Answer {
    /// Index of the delivery in the burst.
    pub index: usize,
    /// HTTP status; 0 when the request itself failed.
    pub status: u16,
    /// When the answer came.
    pub at: Instant,
    /// How long ingest took to answer.
    pub took: Duration,
}

/// How many of `answers` were 200.
pub fn accepted(answers: &[Answer]) -> usize {
    answers.iter().filter(|a| a.status == 200).count()
}

/// Posts delivery number `index` signed, and times its answer.
async fn post_timed(
    client: &reqwest::Client,
    url: &str,
    delivery: &Delivery,
    index: usize,
) -> Answer {
    let sent = Instant::now();
    let status = post_signed(client, url, &delivery.body).await;
    let at = Instant::now();
    Answer {
        index,
        status,
        at,
        took: at - sent,
    }
}

/// Posts every delivery once from `posters` concurrent senders, each resting `pace` after a
/// post (so a burst lasts long enough for the faults injected into it) and 500 ms after a
/// refusal (a sender backing off); `answered` counts answers as they come (fault injectors
/// watch it). Returns every answer.
pub async fn post_burst(
    client: &reqwest::Client,
    url: &str,
    deliveries: &Arc<Vec<Delivery>>,
    posters: usize,
    pace: Duration,
    answered: &Arc<AtomicUsize>,
) -> Vec<Answer> {
    let next = Arc::new(AtomicUsize::new(0));
    let senders = (0..posters).map(|_| {
        let (client, url) = (client.clone(), url.to_string());
        let (deliveries, next, answered) = (deliveries.clone(), next.clone(), answered.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some(delivery) = deliveries.get(index) else {
                    return answers;
                };
                let answer = post_timed(&client, &url, delivery, index).await;
                let status = answer.status;
                answers.push(answer);
                answered.fetch_add(1, Ordering::SeqCst);
                let rest = if status == 200 {
                    pace
                } else {
                    Duration::from_millis(500)
                };
                if !rest.is_zero() {
                    tokio::time::sleep(rest).await;
                }
            }
        })
    });
    let mut answers = Vec::new();
    for sender in futures::future::join_all(senders).await {
        answers.extend(sender.expect("sender task"));
    }
    answers
}

/// Posts every delivery once on an open-loop schedule: delivery `i` is sent at
/// `start + i / rate` (or as soon after as one of `posters` concurrent senders is free).
/// Returns every answer.
#[allow(dead_code)] // Only the reliability target's benchmarks keep a rate.
pub async fn post_at_rate(
    client: &reqwest::Client,
    url: &str,
    deliveries: &Arc<Vec<Delivery>>,
    rate: f64,
    posters: usize,
) -> Vec<Answer> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let senders = (0..posters).map(|_| {
        let (client, url) = (client.clone(), url.to_string());
        let (deliveries, next) = (deliveries.clone(), next.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some(delivery) = deliveries.get(index) else {
                    return answers;
                };
                tokio::time::sleep_until(start + Duration::from_secs_f64(index as f64 / rate))
                    .await;
                answers.push(post_timed(&client, &url, delivery, index).await);
            }
        })
    });
    let mut answers = Vec::new();
    for sender in futures::future::join_all(senders).await {
        answers.extend(sender.expect("sender task"));
    }
    answers
}

/// Posts each refused delivery again until it is accepted, as Facebook retries a delivery
/// that did not get a 200; returns the answers of the retries.
#[allow(dead_code)] // The api target's bursts are never refused.
pub async fn retry_refused(
    client: &reqwest::Client,
    url: &str,
    deliveries: &[Delivery],
    answers: &[Answer],
    limit: Duration,
) -> Vec<Answer> {
    let accepted: BTreeSet<usize> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.index)
        .collect();
    let mut pending: Vec<usize> = answers
        .iter()
        .map(|a| a.index)
        .filter(|index| !accepted.contains(index))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let deadline = Instant::now() + limit;
    let mut retries = Vec::new();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} deliveries still refused after {limit:?}",
            pending.len()
        );
        let mut still = Vec::new();
        for index in pending {
            let sent = Instant::now();
            let status = post_signed(client, url, &deliveries[index].body).await;
            let at = Instant::now();
            retries.push(Answer {
                index,
                status,
                at,
                took: at - sent,
            });
            if status != 200 {
                still.push(index);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    retries
}
