//! Conversation files read back and accounted for: their mids in file order, whether they are
//! sorted, and an exact tally of what the store holds against what was delivered (lost,
//! duplicated, unexpected, unsorted).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::pipeline::Pipeline;
use super::webhook::Delivery;

/// The mids of a stored conversation, in file order.
pub fn mids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["message"]["mid"].as_str().map(str::to_string))
        .collect()
}

/// True when the events are sorted by timestamp.
pub fn sorted_by_timestamp(events: &[Value]) -> bool {
    events
        .windows(2)
        // As numbers, whether written as integers or with a fraction.
        .all(|w| w[0]["timestamp"].as_f64() <= w[1]["timestamp"].as_f64())
}

/// A conversation: (page id, user psid).
pub type ConversationId = (String, String);

/// Which mids each conversation must hold.
pub fn expected_mids<'a>(
    deliveries: impl IntoIterator<Item = &'a Delivery>,
) -> BTreeMap<ConversationId, BTreeSet<String>> {
    let mut expected: BTreeMap<ConversationId, BTreeSet<String>> = BTreeMap::new();
    for delivery in deliveries {
        expected
            .entry((delivery.page_id.clone(), delivery.user.clone()))
            .or_default()
            .insert(delivery.mid.clone());
    }
    expected
}

/// What the store holds compared with what it must hold.
#[derive(Debug, Default, Clone)]
#[allow(dead_code)] // Used by the reliability target only, like the functions below.
pub struct Tally {
    /// Distinct messages that must be stored.
    pub expected: usize,
    /// Distinct expected messages found in the store.
    pub stored: usize,
    /// Expected messages missing from the store.
    pub lost: usize,
    /// Extra copies: events in the files beyond one per distinct mid.
    pub duplicated: usize,
    /// Messages in the store that were never delivered.
    pub unexpected: usize,
    /// Conversations whose file is not sorted by timestamp.
    pub unsorted: Vec<String>,
    /// A few missing mids, for the failure message.
    pub missing_examples: Vec<String>,
}

#[allow(dead_code)]
impl Tally {
    /// Nothing lost, duplicated, unexpected or out of order.
    pub fn is_exact(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0 && self.unsorted.is_empty()
    }
}

/// Counts what the store holds now.
#[allow(dead_code)]
pub async fn tally(
    pipeline: &Pipeline,
    expected: &BTreeMap<ConversationId, BTreeSet<String>>,
) -> Tally {
    let mut tally = Tally::default();
    for ((page_id, user), wanted) in expected {
        tally.expected += wanted.len();
        let events = pipeline
            .conversation(page_id, user)
            .await
            .unwrap_or_default();
        if !sorted_by_timestamp(&events) {
            tally.unsorted.push(format!("{page_id}/{user}"));
        }
        let ids = mids(&events);
        let distinct: BTreeSet<String> = ids.iter().cloned().collect();
        tally.duplicated += ids.len() - distinct.len();
        tally.unexpected += distinct.difference(wanted).count();
        let present = wanted.intersection(&distinct).count();
        tally.stored += present;
        tally.lost += wanted.len() - present;
        for missing in wanted.difference(&distinct).take(3) {
            if tally.missing_examples.len() < 10 {
                tally.missing_examples.push(missing.clone());
            }
        }
    }
    tally
}

/// Waits until every expected message is stored (or `limit` passes), then until the
/// conversations have settled ([`Pipeline::has_settled`]: no flush still to come could change
/// the files), and counts what the store holds.
#[allow(dead_code)]
pub async fn settle_and_tally(
    pipeline: &Pipeline,
    expected: &BTreeMap<ConversationId, BTreeSet<String>>,
    limit: Duration,
) -> Tally {
    let deadline = Instant::now() + limit;
    while tally(pipeline, expected).await.lost > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let conversations: Vec<ConversationId> = expected.keys().cloned().collect();
    while Instant::now() < deadline && !pipeline.has_settled(&conversations).await {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tally(pipeline, expected).await
}
