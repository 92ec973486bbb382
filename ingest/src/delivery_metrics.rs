//! How each delivery was answered, counted: `fbsync_webhook_deliveries_total` by outcome,
//! `fbsync_events_published_total` by event kind, `fbsync_publish_confirm_seconds`. Each
//! series is registered on its first use and kept.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fbsync_shared::facebook::event::EventKind;
use fbsync_shared::telemetry::{DELIVERIES, EVENTS_PUBLISHED, PUBLISH_CONFIRM_SECONDS};
use metrics::{Counter, Histogram};

/// How a delivery was answered: the `outcome` label of `fbsync_webhook_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Outcome {
    /// Every event confirmed by the broker: 200.
    Accepted,
    /// The signature did not verify: 401.
    BadSignature,
    /// The body could not be read, or is not a Page delivery: 400.
    BadRequest,
    /// The body is over the limit: 413.
    TooLarge,
    /// The body was not sent within the read timeout: 408.
    TooSlow,
    /// Too many requests in flight: 503 at once.
    Overloaded,
    /// Too many body bytes in flight (`INGEST_BODY_BUDGET_BYTES`): 503 at once.
    OverBudget,
    /// The broker did not confirm in time: 503, and Facebook retries.
    Unavailable,
}

impl Outcome {
    /// Every outcome, in declaration order (`outcome as usize` indexes this).
    const ALL: &'static [Outcome] = <Outcome as strum::VariantArray>::VARIANTS;

    /// The outcome's label.
    fn as_str(self) -> &'static str {
        self.into()
    }
}

/// labelled metric looked up by name and labels on every delivery cost ingest more than the
/// count itself. (Registered on first use, not at start, so a series appears once it counts
/// something, as it did when looked up each time.)
#[derive(Default)]
pub(crate) struct DeliveryMetrics {
    /// `fbsync_webhook_deliveries_total`, indexed by [`Outcome`].
    deliveries: [OnceLock<Counter>; Outcome::ALL.len()],
    /// `fbsync_events_published_total`, indexed by [`EventKind`].
    events_published: [OnceLock<Counter>; EventKind::ALL.len()],
    /// `fbsync_publish_confirm_seconds`.
    confirm_seconds: OnceLock<Histogram>,
}

impl DeliveryMetrics {
    /// Counts the delivery's outcome and answers it with `text` (plain text; a `&'static str`
    /// is sent without a copy).
    pub(crate) fn answer(
        &self,
        outcome: Outcome,
        status: StatusCode,
        text: Cow<'static, str>,
    ) -> Response {
        count(
            &self.deliveries,
            outcome as usize,
            || metrics::counter!(DELIVERIES, "outcome" => outcome.as_str()),
        );
        (status, text).into_response()
    }

    /// An event of `kind` was confirmed by the broker.
    pub(crate) fn published(&self, kind: EventKind) {
        count(
            &self.events_published,
            kind as usize,
            || metrics::counter!(EVENTS_PUBLISHED, "kind" => kind.as_str()),
        );
    }

    /// A delivery's confirms all came, `elapsed` after its first publish.
    pub(crate) fn confirmed(&self, elapsed: Duration) {
        self.confirm_seconds
            .get_or_init(|| metrics::histogram!(PUBLISH_CONFIRM_SECONDS))
            .record(elapsed.as_secs_f64());
    }
}

/// Adds one to the counter kept in `cells[index]`, registering it with `register` on first use.
/// An index beyond the cells (a kind added to its enum but not to its `ALL`) is registered
/// each time instead: still counted, never a panic.
fn count(cells: &[OnceLock<Counter>], index: usize, register: impl FnOnce() -> Counter) {
    match cells.get(index) {
        Some(cell) => cell.get_or_init(register).increment(1),
        None => register().increment(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_as_a_number_is_its_place_in_the_list_of_all_outcomes() {
        for (place, &outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome as usize, place, "{outcome:?}");
        }
        assert_eq!(Outcome::BadSignature.as_str(), "bad_signature");
    }
}
