//! The database: the Page registry, staged events and per-conversation flush state.
//!
//! One code path serves SQLite (default; WAL and a busy timeout so several processes share the
//! file) and PostgreSQL (when hosts share it) through sqlx's `Any` driver. Every query is
//! portable SQL with `$N` parameters; times are milliseconds since the epoch (`i64`).
//!
//! Exclusivity of a conversation's read-modify-write across workers and hosts comes from a
//! lease row: [`Database::claim_conversation`] is one conditional `UPDATE` that only one worker
//! can win until the lease expires.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

/// Errors of the database layer. Callers retry `Unavailable`; the rest are bugs or bad
/// configuration and are reported as they are.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not usable: {0}")]
    BadUrl(String),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// Which SQL dialect is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A pool plus its dialect.
#[derive(Debug, Clone)]
pub struct Database {
    /// The connection pool.
    pool: AnyPool,
    /// Chosen from the URL; decides the migrations.
    pub backend: Backend,
}

/// One conversation: a Page and the person it talks to. Names one object in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationKey {
    pub page_id: String,
    pub user_psid: String,
}

/// A registered Page (never holds the plain token).
#[derive(Debug, Clone)]
pub struct PageRow {
    pub page_id: String,
    pub user_uuid: String,
    /// `active`, or `needs_reauth` after a token error.
    pub status: String,
    pub last_event_ms: Option<i64>,
    pub last_flush_ms: Option<i64>,
    pub last_error_ms: Option<i64>,
    pub last_error: Option<String>,
    /// Events staged for this Page and not yet stored.
    pub staged: i64,
}

/// An event to stage.
#[derive(Debug, Clone)]
pub struct NewStagedEvent {
    pub key: ConversationKey,
    pub event_id: String,
    /// `webhook` or `poll`.
    pub source: String,
    pub timestamp_ms: i64,
    pub received_at_ms: i64,
    /// The event JSON as received.
    pub body: String,
}

/// A staged event read back for a flush.
#[derive(Debug, Clone)]
pub struct StagedEvent {
    /// Row id; the flush deletes exactly the rows it wrote.
    pub seq: i64,
    pub event_id: String,
    pub source: String,
    pub received_at_ms: i64,
    pub body: String,
}

/// A won claim on a conversation.
#[derive(Debug, Clone)]
pub struct Claim {
    pub key: ConversationKey,
    /// The staging generation seen when claiming; finishing marks it flushed.
    pub staged_gen: i64,
    /// Times (ms) of recent PUT attempts to the object, oldest first.
    pub recent_puts: Vec<i64>,
    /// Consecutive failed flushes so far.
    pub failures: i64,
}

/// Staged backlog figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub events: i64,
    pub oldest_received_ms: Option<i64>,
}

impl Database {
    /// Connects (creating the SQLite file and its folder when missing) and runs migrations.
    pub async fn connect(url: &SecretString) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let url = url.expose_secret();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::BadUrl(
                "it must start with sqlite: or postgres://".into(),
            ));
        };
        let mut url = url.to_string();
        if backend == Backend::Sqlite {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or_default().to_string();
            if path != ":memory:"
                && let Some(parent) = Path::new(&path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| {
                    DbError::BadUrl(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
        }
        let options =
            AnyConnectOptions::from_str(&url).map_err(|e| DbError::BadUrl(e.to_string()))?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers and one writer work at once; the busy timeout makes
                        // other processes wait for the write lock instead of failing.
                        sqlx::query("PRAGMA journal_mode=WAL")
                            .execute(&mut *connection)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout=10000")
                            .execute(&mut *connection)
                            .await?;
                        sqlx::query("PRAGMA synchronous=NORMAL")
                            .execute(&mut *connection)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let database = Self { pool, backend };
        database.migrate().await?;
        Ok(database)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        match self.backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite").run(&self.pool).await?,
            Backend::Postgres => {
                sqlx::migrate!("migrations/postgres")
                    .run(&self.pool)
                    .await?
            }
        }
        Ok(())
    }

    /// Closes the pool (waits for connections to return).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // --- Page registry -------------------------------------------------------------------

    /// Registers a Page, or replaces its owner and token (and clears a re-auth flag).
    pub async fn upsert_page(
        &self,
        page_id: &str,
        user_uuid: &str,
        token_sealed: Vec<u8>,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO pages (page_id, user_uuid, token_sealed, status, created_at_ms)
             VALUES ($1, $2, $3, 'active', $4)
             ON CONFLICT (page_id) DO UPDATE SET user_uuid = excluded.user_uuid,
                 token_sealed = excluded.token_sealed, status = 'active',
                 last_error = NULL, last_error_ms = NULL",
        )
        .bind(page_id)
        .bind(user_uuid)
        .bind(token_sealed)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a Page; true when it was registered.
    pub async fn remove_page(&self, page_id: &str) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM pages WHERE page_id = $1")
            .bind(page_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Owner and sealed token of a Page.
    pub async fn page_owner(
        &self,
        page_id: &str,
    ) -> Result<Option<(String, Vec<u8>, String)>, DbError> {
        let row =
            sqlx::query("SELECT user_uuid, token_sealed, status FROM pages WHERE page_id = $1")
                .bind(page_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|row| (row.get(0), row.get(1), row.get(2))))
    }

    /// Every registered Page with its staged backlog, ordered by id.
    pub async fn list_pages(&self) -> Result<Vec<PageRow>, DbError> {
        let rows = sqlx::query(
            "SELECT p.page_id, p.user_uuid, p.status, p.last_event_ms, p.last_flush_ms, p.last_error_ms,
                    p.last_error, (SELECT COUNT(*) FROM staged_events s WHERE s.page_id = p.page_id)
             FROM pages p ORDER BY p.page_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| PageRow {
                page_id: row.get(0),
                user_uuid: row.get(1),
                status: row.get(2),
                last_event_ms: row.get(3),
                last_flush_ms: row.get(4),
                last_error_ms: row.get(5),
                last_error: row.get(6),
                staged: row.get(7),
            })
            .collect())
    }

    /// Records an error on a Page; `status` becomes e.g. `needs_reauth`.
    pub async fn mark_page_error(
        &self,
        page_id: &str,
        status: Option<&str>,
        error: &str,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE pages SET last_error = $2, last_error_ms = $3, status = COALESCE($4, status)
             WHERE page_id = $1",
        )
        .bind(page_id)
        .bind(error)
        .bind(now)
        .bind(status)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a successful write for a Page.
    pub async fn mark_page_flushed(&self, page_id: &str, now: i64) -> Result<(), DbError> {
        // At most one write a second per Page: the row is shared by all its conversations.
        sqlx::query("UPDATE pages SET last_flush_ms = $2 WHERE page_id = $1 AND COALESCE(last_flush_ms, 0) < $2 - 1000")
            .bind(page_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // --- Staging ---------------------------------------------------------------------------

    /// Stages events in one transaction: inserts each (an identity already staged is skipped)
    /// and bumps the staging generation of each conversation touched. Returns how many rows
    /// were new.
    pub async fn stage_events(&self, events: &[NewStagedEvent], now: i64) -> Result<u64, DbError> {
        // Every transaction takes its row locks in one order (conversation, then event id), so
        // two workers staging overlapping batches (duplicates included) wait for each other
        // instead of deadlocking.
        let mut ordered: Vec<&NewStagedEvent> = events.iter().collect();
        ordered.sort_by(|a, b| (&a.key, &a.event_id).cmp(&(&b.key, &b.event_id)));
        ordered.dedup_by(|a, b| a.key == b.key && a.event_id == b.event_id);
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        // Many rows per statement: one round trip per 100 events, not one per event.
        for chunk in ordered.chunks(100) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=8).map(|k| format!("${}", i * 8 + k)).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO staged_events
                   (page_id, user_psid, event_id, source, timestamp_ms, received_at_ms, staged_at_ms, body)
                 VALUES {}
                 ON CONFLICT (page_id, user_psid, event_id) DO NOTHING",
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for event in chunk {
                query = query
                    .bind(&event.key.page_id)
                    .bind(&event.key.user_psid)
                    .bind(&event.event_id)
                    .bind(&event.source)
                    .bind(event.timestamp_ms)
                    .bind(event.received_at_ms)
                    .bind(now)
                    .bind(&event.body);
            }
            inserted += query.execute(&mut *tx).await?.rows_affected();
        }
        let mut touched: Vec<&ConversationKey> = ordered.iter().map(|event| &event.key).collect();
        touched.dedup();
        for key in &touched {
            sqlx::query(
                "INSERT INTO conversations (page_id, user_psid, staged_gen) VALUES ($1, $2, 1)
                 ON CONFLICT (page_id, user_psid) DO UPDATE SET staged_gen = conversations.staged_gen + 1",
            )
            .bind(&key.page_id)
            .bind(&key.user_psid)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        // Outside the transaction: a Page's row is hot, and holding it for a whole batch would
        // serialise every worker staging for that Page.
        let mut pages: Vec<&str> = touched.iter().map(|key| key.page_id.as_str()).collect();
        pages.dedup();
        for page_id in pages {
            sqlx::query("UPDATE pages SET last_event_ms = $2 WHERE page_id = $1 AND COALESCE(last_event_ms, 0) < $2 - 1000")
                .bind(page_id)
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        Ok(inserted)
    }

    /// Conversations with events waiting whose budget allows a write now and that nobody holds.
    pub async fn due_conversations(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<ConversationKey>, DbError> {
        let rows = sqlx::query(
            "SELECT page_id, user_psid FROM conversations
             WHERE staged_gen > flushed_gen AND due_at_ms <= $1 AND lease_until_ms < $1
             ORDER BY due_at_ms LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| ConversationKey {
                page_id: row.get(0),
                user_psid: row.get(1),
            })
            .collect())
    }

    /// Takes the lease on a conversation; `None` when another worker holds it or it is not due.
    pub async fn claim_conversation(
        &self,
        key: &ConversationKey,
        owner: &str,
        now: i64,
        lease: Duration,
    ) -> Result<Option<Claim>, DbError> {
        let until = now + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let row = sqlx::query(
            "UPDATE conversations SET lease_owner = $3, lease_until_ms = $4
             WHERE page_id = $1 AND user_psid = $2 AND lease_until_ms < $5 AND due_at_ms <= $5
               AND staged_gen > flushed_gen
             RETURNING staged_gen, recent_puts, failures",
        )
        .bind(&key.page_id)
        .bind(&key.user_psid)
        .bind(owner)
        .bind(until)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| {
            let recent: String = row.get(1);
            Claim {
                key: key.clone(),
                staged_gen: row.get(0),
                recent_puts: recent.split(',').filter_map(|t| t.parse().ok()).collect(),
                failures: row.get(2),
            }
        }))
    }

    /// Every staged event of a conversation, oldest row first.
    pub async fn staged_events(&self, key: &ConversationKey) -> Result<Vec<StagedEvent>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, event_id, source, received_at_ms, body FROM staged_events
             WHERE page_id = $1 AND user_psid = $2 ORDER BY seq",
        )
        .bind(&key.page_id)
        .bind(&key.user_psid)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| StagedEvent {
                seq: row.get(0),
                event_id: row.get(1),
                source: row.get(2),
                received_at_ms: row.get(3),
                body: row.get(4),
            })
            .collect())
    }

    /// Records a PUT about to be sent, so the object's budget counts it even if the worker dies
    /// right after. Only the holder of the lease can record.
    pub async fn record_put_attempt(
        &self,
        claim: &mut Claim,
        owner: &str,
        at: i64,
        keep: usize,
    ) -> Result<(), DbError> {
        claim.recent_puts.push(at);
        let skip = claim.recent_puts.len().saturating_sub(keep.max(1));
        claim.recent_puts.drain(..skip);
        let text = claim
            .recent_puts
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query(
            "UPDATE conversations SET recent_puts = $3 WHERE page_id = $1 AND user_psid = $2 AND lease_owner = $4",
        )
        .bind(&claim.key.page_id)
        .bind(&claim.key.user_psid)
        .bind(text)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a successful flush: deletes exactly the rows that are now stored, marks the claimed
    /// generation flushed, sets the next allowed write time and releases the lease.
    pub async fn finish_flush(
        &self,
        claim: &Claim,
        owner: &str,
        stored_seqs: &[i64],
        due_at: i64,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        for chunk in stored_seqs.chunks(500) {
            let placeholders: Vec<String> =
                (0..chunk.len()).map(|i| format!("${}", i + 1)).collect();
            let sql = format!(
                "DELETE FROM staged_events WHERE seq IN ({})",
                placeholders.join(",")
            );
            let mut query = sqlx::query(&sql);
            for seq in chunk {
                query = query.bind(*seq);
            }
            query.execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE conversations SET flushed_gen = $3, due_at_ms = $4, lease_owner = NULL,
                 lease_until_ms = 0, failures = 0, last_error = NULL
             WHERE page_id = $1 AND user_psid = $2 AND lease_owner = $5",
        )
        .bind(&claim.key.page_id)
        .bind(&claim.key.user_psid)
        .bind(claim.staged_gen)
        .bind(due_at)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.mark_page_flushed(&claim.key.page_id, now).await
    }

    /// Ends a failed flush: staged rows stay, the conversation is retried at `retry_at`.
    pub async fn fail_flush(
        &self,
        claim: &Claim,
        owner: &str,
        error: &str,
        retry_at: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE conversations SET due_at_ms = $3, lease_owner = NULL, lease_until_ms = 0,
                 failures = failures + 1, last_error = $4
             WHERE page_id = $1 AND user_psid = $2 AND lease_owner = $5",
        )
        .bind(&claim.key.page_id)
        .bind(&claim.key.user_psid)
        .bind(retry_at)
        .bind(error)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Gives a claim back without counting a failure: the conversation waits for its budget.
    pub async fn defer_flush(
        &self,
        claim: &Claim,
        owner: &str,
        due_at: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE conversations SET due_at_ms = $3, lease_owner = NULL, lease_until_ms = 0
             WHERE page_id = $1 AND user_psid = $2 AND lease_owner = $4",
        )
        .bind(&claim.key.page_id)
        .bind(&claim.key.user_psid)
        .bind(due_at)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Reserves one PUT of `object_key` under its per-object budget, shared by every worker:
    /// `Ok(None)` when reserved (and recorded), `Ok(Some(at))` when the budget allows the next
    /// PUT only at `at`. A compare-and-swap on the recorded times, so two workers cannot both
    /// take the last slot.
    pub async fn reserve_object_put(
        &self,
        object_key: &str,
        budget: &crate::budget::PutBudget,
        now: i64,
    ) -> Result<Option<i64>, DbError> {
        sqlx::query(
            "INSERT INTO object_puts (object_key) VALUES ($1) ON CONFLICT (object_key) DO NOTHING",
        )
        .bind(object_key)
        .execute(&self.pool)
        .await?;
        loop {
            let current: String =
                sqlx::query("SELECT recent_puts FROM object_puts WHERE object_key = $1")
                    .bind(object_key)
                    .fetch_one(&self.pool)
                    .await?
                    .get(0);
            let mut recent: Vec<i64> = current.split(',').filter_map(|t| t.parse().ok()).collect();
            let next = budget.next_put_at(&recent, now);
            if next > now {
                return Ok(Some(next));
            }
            recent.push(now);
            let keep = recent
                .len()
                .saturating_sub(budget.puts_per_window.max(1) as usize);
            let updated = recent[keep..]
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let done = sqlx::query("UPDATE object_puts SET recent_puts = $2 WHERE object_key = $1 AND recent_puts = $3")
                .bind(object_key)
                .bind(updated)
                .bind(&current)
                .execute(&self.pool)
                .await?;
            if done.rows_affected() == 1 {
                return Ok(None);
            }
        }
    }

    /// Takes `writes` writes and `ops` operations from the bucket's budget window that holds
    /// `now`; false (nothing taken) when that window is full.
    pub async fn take_bucket_budget(
        &self,
        now: i64,
        writes: i64,
        ops: i64,
        budget: &crate::budget::BucketBudget,
    ) -> Result<bool, DbError> {
        let window = now - now.rem_euclid(budget.window_ms);
        let row = sqlx::query(
            "INSERT INTO bucket_budget (window_ms, writes, ops) VALUES ($1, $2, $3)
             ON CONFLICT (window_ms) DO UPDATE SET writes = bucket_budget.writes + excluded.writes,
                 ops = bucket_budget.ops + excluded.ops
             WHERE bucket_budget.writes + excluded.writes <= $4 AND bucket_budget.ops + excluded.ops <= $5
             RETURNING window_ms",
        )
        .bind(window)
        .bind(writes)
        .bind(ops)
        .bind(if budget.writes_per_window == 0 { i64::MAX / 2 } else { budget.writes_per_window })
        .bind(if budget.ops_per_window == 0 { i64::MAX / 2 } else { budget.ops_per_window })
        .fetch_optional(&self.pool)
        .await?;
        if window % (budget.window_ms * 100) == 0 {
            // Old windows are useless; trimming now and then keeps the table tiny.
            sqlx::query("DELETE FROM bucket_budget WHERE window_ms < $1")
                .bind(window - 10_000)
                .execute(&self.pool)
                .await?;
        }
        Ok(row.is_some())
    }

    /// Staged events not yet stored, and the oldest one's receive time.
    pub async fn backlog(&self) -> Result<Backlog, DbError> {
        let row = sqlx::query("SELECT COUNT(*), MIN(received_at_ms) FROM staged_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(Backlog {
            events: row.get(0),
            oldest_received_ms: row.get(1),
        })
    }
}
