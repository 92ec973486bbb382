//! Staged events: accepted from the queue, not yet in the store. One row per event identity
//! and conversation, so duplicates vanish on insert, except that a webhook copy replaces a
//! polled reconstruction staged before it (the webhook copy is what Facebook sent, and is what
//! the file keeps); each conversation's staging generation says that events are waiting.

use super::{DbError, Staging};
use crate::facebook::event::EventSource;
use crate::ids::ConversationKey;

/// An event to stage.
#[derive(Debug, Clone)]
pub struct NewStagedEvent {
    pub key: ConversationKey,
    /// The event's identity: equal for every copy of the same event.
    pub event_id: String,
    /// A webhook copy wins over a polled reconstruction of the same event.
    pub source: EventSource,
    /// Sort key inside the conversation.
    pub timestamp_ms: i64,
    /// When ingest accepted it, for the visibility figures.
    pub received_at_ms: i64,
    /// The event JSON as received.
    pub body: String,
}

/// A staged event read back for a flush.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StagedEvent {
    /// Row id; the flush deletes exactly the rows it wrote.
    pub seq: i64,
    pub event_id: String,
    #[sqlx(try_from = "String")]
    pub source: EventSource,
    /// Sort key inside the conversation.
    pub timestamp_ms: i64,
    pub received_at_ms: i64,
    pub body: String,
}

/// Columns bound per staged row.
const STAGED_COLUMNS: usize = 8;

impl Staging {
    /// Stages events in one transaction: inserts each (an identity already staged is skipped,
    /// unless a webhook copy meets a polled one) and bumps the staging generation of each
    /// conversation touched. Returns how many rows were new or replaced.
    pub async fn stage_events(&self, events: &[NewStagedEvent], now: i64) -> Result<u64, DbError> {
        // Every transaction takes its row locks in one order (conversation, then event id), so
        // two workers staging overlapping batches (duplicates included) wait for each other
        // instead of deadlocking.
        let mut ordered: Vec<&NewStagedEvent> = events.iter().collect();
        ordered.sort_by(|a, b| (&a.key, &a.event_id).cmp(&(&b.key, &b.event_id)));
        ordered.dedup_by(|a, b| a.key == b.key && a.event_id == b.event_id);
        let mut tx = self.db.pool.begin().await?;
        let mut inserted = 0;
        // Many rows per statement: one round trip per 100 events, not one per event.
        for chunk in ordered.chunks(100) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    format!(
                        "({})",
                        self.db
                            .backend
                            .placeholders(i * STAGED_COLUMNS + 1, STAGED_COLUMNS)
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO staged_events
                   (page_id, user_psid, event_id, source, timestamp_ms, received_at_ms, staged_at_ms, body)
                 VALUES {}
                 ON CONFLICT (page_id, user_psid, event_id) DO UPDATE
                   SET source = excluded.source, body = excluded.body,
                       timestamp_ms = excluded.timestamp_ms
                   WHERE staged_events.source = 'poll' AND excluded.source = 'webhook'",
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for event in chunk {
                query = query
                    .bind(event.key.page_id.as_str())
                    .bind(event.key.user_psid.as_str())
                    .bind(&event.event_id)
                    .bind(event.source.as_str())
                    .bind(event.timestamp_ms)
                    .bind(event.received_at_ms)
                    .bind(now)
                    .bind(&event.body);
            }
            inserted += query.execute(&mut *tx).await?.rows_affected();
        }
        // Each conversation touched, with the oldest receipt among its events in this batch.
        let mut touched: Vec<(&ConversationKey, i64)> = Vec::new();
        for event in &ordered {
            match touched.last_mut() {
                Some((key, oldest)) if *key == &event.key => {
                    *oldest = (*oldest).min(event.received_at_ms);
                }
                _ => touched.push((&event.key, event.received_at_ms)),
            }
        }
        // One statement for every conversation touched, not one each. Nothing was waiting
        // (staged = flushed): the wait starts with this batch.
        for chunk in touched.chunks(100) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("({}, 1)", self.db.backend.placeholders(i * 3 + 1, 3)))
                .collect();
            let sql = format!(
                "INSERT INTO conversations (page_id, user_psid, waiting_since_ms, staged_gen)
                 VALUES {}
                 ON CONFLICT (page_id, user_psid) DO UPDATE SET
                   staged_gen = conversations.staged_gen + 1,
                   waiting_since_ms = CASE
                     WHEN conversations.staged_gen = conversations.flushed_gen
                       OR excluded.waiting_since_ms < conversations.waiting_since_ms
                     THEN excluded.waiting_since_ms ELSE conversations.waiting_since_ms END",
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for (key, oldest) in chunk {
                query = query
                    .bind(key.page_id.as_str())
                    .bind(key.user_psid.as_str())
                    .bind(*oldest);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        // Outside the transaction: a Page's row is hot, and holding it for a whole batch would
        // serialise every worker staging for that Page.
        let mut pages: Vec<_> = touched.iter().map(|(key, _)| &key.page_id).collect();
        pages.dedup();
        for page_id in pages {
            self.db.registry().mark_page_event(page_id, now).await?;
        }
        Ok(inserted)
    }

    /// Every staged event of a conversation, oldest row first.
    pub async fn staged_events(&self, key: &ConversationKey) -> Result<Vec<StagedEvent>, DbError> {
        let events = sqlx::query_as::<_, StagedEvent>(
            "SELECT seq, event_id, source, timestamp_ms, received_at_ms, body FROM staged_events
             WHERE page_id = $1 AND user_psid = $2 ORDER BY seq",
        )
        .bind(key.page_id.as_str())
        .bind(key.user_psid.as_str())
        .fetch_all(&self.db.pool)
        .await?;
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{PageId, Psid};
    use crate::storage::db::test_support::backends;

    fn copy(source: EventSource, body: &str) -> NewStagedEvent {
        NewStagedEvent {
            key: ConversationKey {
                page_id: PageId::parse("1").expect("page"),
                user_psid: Psid::parse("u1").expect("psid"),
            },
            event_id: "mid:m_1".into(),
            source,
            timestamp_ms: 1,
            received_at_ms: 1,
            body: body.into(),
        }
    }

    #[tokio::test]
    async fn a_webhook_copy_replaces_a_polled_copy_staged_before_it_and_never_the_reverse() {
        for (backend, db) in backends().await {
            let key = copy(EventSource::Poll, "").key;
            db.staging()
                .stage_events(&[copy(EventSource::Poll, "polled")], 1)
                .await
                .expect("stage");
            db.staging()
                .stage_events(&[copy(EventSource::Webhook, "webhook")], 2)
                .await
                .expect("stage");
            db.staging()
                .stage_events(&[copy(EventSource::Poll, "polled again")], 3)
                .await
                .expect("stage");
            db.staging()
                .stage_events(&[copy(EventSource::Webhook, "webhook retry")], 4)
                .await
                .expect("stage");
            let staged = db.staging().staged_events(&key).await.expect("staged");
            assert_eq!(staged.len(), 1, "{backend}: one row per identity");
            assert_eq!(staged[0].source, EventSource::Webhook, "{backend}");
            assert_eq!(
                staged[0].body, "webhook",
                "{backend}: the first webhook copy stays"
            );
        }
    }

    /// Hundreds of events take several multi-row statements (100 rows each, 8 values a row,
    /// anonymous `?` on SQLite): every value lands in its own row and column.
    #[tokio::test]
    async fn a_batch_of_hundreds_stages_every_event_with_its_own_values() {
        for (backend, db) in backends().await {
            let keys: Vec<ConversationKey> = (0..3)
                .map(|c| ConversationKey {
                    page_id: PageId::parse("1").expect("page"),
                    user_psid: Psid::parse(&format!("u{c}")).expect("psid"),
                })
                .collect();
            let events: Vec<NewStagedEvent> = (0..250_i64)
                .map(|n| NewStagedEvent {
                    key: keys[n as usize % 3].clone(),
                    event_id: format!("mid:m_{n}"),
                    source: EventSource::Webhook,
                    timestamp_ms: 1_000 + n,
                    received_at_ms: 2_000 + n,
                    body: format!("{{\"n\":{n}}}"),
                })
                .collect();
            let staged = db.staging().stage_events(&events, 5).await.expect("stage");
            assert_eq!(staged, 250, "{backend}");
            for (c, key) in keys.iter().enumerate() {
                let rows = db.staging().staged_events(key).await.expect("staged");
                let expected = events.iter().filter(|e| &e.key == key).count();
                assert_eq!(rows.len(), expected, "{backend}: conversation {c}");
                for row in rows {
                    let n: i64 = row.event_id["mid:m_".len()..].parse().expect("n");
                    assert_eq!(n as usize % 3, c, "{backend}: {row:?}");
                    assert_eq!(row.timestamp_ms, 1_000 + n, "{backend}: {row:?}");
                    assert_eq!(row.received_at_ms, 2_000 + n, "{backend}: {row:?}");
                    assert_eq!(row.body, format!("{{\"n\":{n}}}"), "{backend}: {row:?}");
                    assert_eq!(row.source, EventSource::Webhook, "{backend}");
                }
            }
        }
    }
}
