//! The database: the Page registry, staged events, conversation claims and the request budgets
//! shared by every worker.
//!
//! One code path serves SQLite (default; WAL and a busy timeout so several processes share the
//! file) and PostgreSQL (when hosts share it) through sqlx's `Any` driver. Every query is
//! portable SQL with `$N` parameters; times are milliseconds since the epoch (`i64`); rows are
//! read by column name into structs.
//!
//! One file per concern: [`pages`] (the registry), [`staging`] (events waiting for a write),
//! [`claims`] (a conversation's lease and the lifecycle of one flush, fenced by generation),
//! [`put_budget`] (per-object PUT times), [`bucket_windows`] (the bucket's request rate),
//! [`page_polls`] (each Page's Graph polls: progress, lease, last complete one),
//! [`poll_claims`] (the scheduler's one claim per Page and period), [`backlog`] (figures
//! for the gauges), [`outbox`] (jobs that follow a database change), and the owners' side:
//! [`users`] (one per shop), [`page_connections`] (who connected each Page), [`sessions`]
//! (owner sessions, used OAuth nonces and signed requests), [`data_deletions`] (Meta's
//! requests).
//!
//! The statements are reached through seven narrow handles, thin types over the same pools
//! ([`Registry`], [`Owners`], [`Staging`], [`Conversations`], [`Budgets`], [`Polls`],
//! [`Outbox`]), taken
//! with [`Database::registry`] and its siblings. `Database` itself only connects, migrates,
//! backs up and closes. A role holds the handles it needs and no others, so the compiler
//! keeps it to what it touches: the owner routes hold `Owners`, `Registry` and `Outbox` and
//! cannot reach a claim, the stage or a budget; the outbox relay holds `Outbox`; the store holds `Budgets`; a poll holds `Registry`,
//! `Polls`, `Staging` and `Conversations`.

pub mod backlog;
pub mod bucket_rate;
pub mod bucket_windows;
pub mod claims;
pub mod data_deletions;
pub mod outbox;
pub mod page_connections;
pub mod page_polls;
pub mod pages;
pub mod poll_claims;
pub mod put_budget;
pub mod sessions;
pub mod staging;
pub mod users;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};

use crate::ids::PageId;
use crate::retry::RetryClass;

pub use backlog::Backlog;
pub use claims::{ClaimError, ConversationClaim, SetAsideConversation};
pub use data_deletions::{DataDeletion, NewDataDeletion};
pub use page_connections::{Forgotten, GrantedPage};
pub use page_polls::{PagePollState, PollCounts, PollLease, PollStart, PollSummary};
pub use pages::{OnboardStep, PageRecord, PageStatus, PageSummary, SubscriptionRecord};
pub use poll_claims::Round;
pub use put_budget::{PutReservation, RecentPuts};
pub use staging::{NewStagedEvent, StagedEvent};

/// Errors of the database layer. `Query` errors are worth retrying (the database may be
/// restarting or busy); the others are bad configuration and are reported as they are.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not usable: {0}")]
    BadUrl(String),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

impl RetryClass for DbError {
    fn is_transient(&self) -> bool {
        match self {
            DbError::BadUrl(_) | DbError::Migration(_) => false,
            // A row that does not decode is a bug or a hand-edited row: retrying cannot help.
            DbError::Query(sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)) => false,
            DbError::Query(_) => true,
        }
    }
}

/// Which SQL dialect is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The placeholders of `count` values numbered from `first`, for a multi-row statement:
    /// `$first, $first+1, ...` on PostgreSQL, bare `?` on SQLite. SQLite keeps named
    /// parameters (`$N`) in a list it searches from the start for each name, and sqlx asks for
    /// every parameter's name when it binds, so a statement of hundreds of `$N` cost time
    /// quadratic in their number (4% of `fbsync up`'s CPU under load); bare `?` have no names.
    ///
    /// Only for a statement whose placeholders all come from here, bound in order: on SQLite
    /// `first` is ignored and bare `?` are numbered 1, 2, ... whatever `$N` stand beside them,
    /// so `WHERE page_id = $1 AND seq IN (<placeholders(2, n)>)` would bind the wrong values.
    fn placeholders(self, first: usize, count: usize) -> String {
        match self {
            Backend::Sqlite => vec!["?"; count].join(", "),
            Backend::Postgres => (first..first + count)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Whether a pool's commits wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Full,
    Relaxed,
}

/// A pool plus its dialect.
#[derive(Debug, Clone)]
pub struct Database {
    /// The connection pool.
    pool: AnyPool,
    /// Connections whose commits do not wait for the disk (SQLite `synchronous=NORMAL` in WAL
    /// mode, PostgreSQL `synchronous_commit=off`), for the flush's own bookkeeping, whose last
    /// commits a crash of the database may lose without losing or doubling anything: the
    /// bucket's budget windows (a lost count costs at most a refused request, retried), a
    /// claim's PUT records and renewals (the lease generation that fences a claim is never
    /// written here), and a flush's end (lost, the stored rows come back and merge into the
    /// object as no change). Four synced commits per flush held SQLite's flush rate to about
    /// 90 a second while it staged 2,000 messages a second; the stage and the claims stay
    /// synced.
    relaxed_pool: AnyPool,
    /// When this process last set each Page's time columns (last event, last flush), which are
    /// set at most once a second: one entry per Page and column.
    page_times_set: Arc<Mutex<HashMap<(PageId, &'static str), i64>>>,
    /// What this process has seen of the bucket's budget windows (a window found full), so
    /// a saturated bucket's refusals cost few statements.
    windows_seen: Arc<Mutex<bucket_windows::WindowsSeen>>,
    /// Chosen from the URL; decides the migrations.
    pub backend: Backend,
}

/// The Page registry: Pages, their owners and sealed tokens, their onboarding steps and figures.
#[derive(Clone)]
pub struct Registry {
    /// The pools it runs its statements on, shared with the other handles.
    db: Database,
}

/// The owners: users and their shops, sessions and used OAuth nonces, Meta's data-deletion requests.
#[derive(Clone)]
pub struct Owners {
    /// The pools it runs its statements on, shared with the other handles.
    db: Database,
}

/// The stage: events staged per conversation until a flush stores them, and the backlog's figures.
#[derive(Clone)]
pub struct Staging {
    /// The pools it runs its statements on, shared with the other handles.
    db: Database,
}

/// Conversation claims: which worker may flush a conversation now, and the set-aside ones.
#[derive(Clone)]
pub struct Conversations {
    /// The pools it runs its statements on, shared with the other handles.
    db: Database,
}

/// Spaces' request budgets: each object's recent PUTs and the bucket's shared windows.
#[derive(Clone)]
pub struct Budgets {
    /// The pools it runs its statements on, shared with the other handles.
    db: Database,
}

/// The outbox: jobs written with the database change they follow, until the broker has them.
#[derive(Clone)]
pub struct Outbox {
    /// The pools it runs its statements on, shared with the other handles.
    db: Database,
}

/// Polls: each Page's poll progress and lease, and the scheduler's claim per Page and period.
#[derive(Clone)]
pub struct Polls {
    /// The pools it runs its statements on, shared with the other handles.
    db: Database,
}

impl Database {
    /// The Page registry.
    pub fn registry(&self) -> Registry {
        Registry { db: self.clone() }
    }

    /// The owners.
    pub fn owners(&self) -> Owners {
        Owners { db: self.clone() }
    }

    /// The outbox.
    pub fn outbox(&self) -> Outbox {
        Outbox { db: self.clone() }
    }

    /// The stage.
    pub fn staging(&self) -> Staging {
        Staging { db: self.clone() }
    }

    /// Conversation claims.
    pub fn conversations(&self) -> Conversations {
        Conversations { db: self.clone() }
    }

    /// Spaces' request budgets.
    pub fn budgets(&self) -> Budgets {
        Budgets { db: self.clone() }
    }

    /// Polls.
    pub fn polls(&self) -> Polls {
        Polls { db: self.clone() }
    }
}

impl Database {
    /// Connects (creating the SQLite file and its folder when missing) and runs migrations.
    pub async fn connect(url: &SecretString) -> Result<Self, DbError> {
        let database = Self::open(url).await?;
        database.migrate().await?;
        Ok(database)
    }

    /// Connects without touching the schema (`fbsync check`, `fbsync backup`).
    pub async fn open(url: &SecretString) -> Result<Self, DbError> {
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
                crate::private_files::create_dir_all(parent).map_err(|e| {
                    DbError::BadUrl(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            // Created 0600 before SQLite opens it (an empty file is a new database), so its
            // journal files, which SQLite gives the database's mode, are private too.
            if path != ":memory:" && !Path::new(&path).exists() {
                crate::private_files::open_for_writing(Path::new(&path))
                    .map_err(|e| DbError::BadUrl(format!("cannot create {path}: {e}")))?;
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
        }
        let options =
            AnyConnectOptions::from_str(&url).map_err(|e| DbError::BadUrl(e.to_string()))?;
        // FULL: a commit is on disk when it returns, so a message acked after its staging
        // commit survives a power cut (WAL's NORMAL may lose the last commits).
        let pool = Self::pool(
            backend,
            &options,
            if backend == Backend::Sqlite { 4 } else { 8 },
            Durability::Full,
        )
        .await?;
        let relaxed_pool = Self::pool(backend, &options, 2, Durability::Relaxed).await?;
        Ok(Self {
            pool,
            relaxed_pool,
            page_times_set: Arc::default(),
            windows_seen: Arc::default(),
            backend,
        })
    }

    async fn pool(
        backend: Backend,
        options: &AnyConnectOptions,
        connections: u32,
        durability: Durability,
    ) -> Result<AnyPool, DbError> {
        let pool = AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    let settings: &[&str] = match (backend, durability) {
                        // WAL lets readers and one writer work at once; the busy timeout makes
                        // other processes wait for the write lock instead of failing.
                        (Backend::Sqlite, Durability::Full) => &[
                            "PRAGMA journal_mode=WAL",
                            "PRAGMA busy_timeout=10000",
                            "PRAGMA synchronous=FULL",
                        ],
                        // NORMAL in WAL mode: commits are not synced one by one, and the
                        // database is never corrupted.
                        (Backend::Sqlite, Durability::Relaxed) => &[
                            "PRAGMA journal_mode=WAL",
                            "PRAGMA busy_timeout=10000",
                            "PRAGMA synchronous=NORMAL",
                        ],
                        (Backend::Postgres, Durability::Full) => &[],
                        (Backend::Postgres, Durability::Relaxed) => {
                            &["SET synchronous_commit = off"]
                        }
                    };
                    for setting in settings {
                        sqlx::query(setting).execute(&mut *connection).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await?;
        Ok(pool)
    }

    /// Migrations this build knows that the database has not applied (empty when current).
    pub async fn pending_migrations(&self) -> Result<Vec<String>, DbError> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("migrations/postgres"),
        };
        // No table yet: nothing is applied.
        let applied: Vec<(i64,)> =
            sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        Ok(migrator
            .iter()
            .filter(|m| !applied.iter().any(|(version,)| *version == m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect())
    }

    /// Writes a consistent snapshot of an SQLite database to `path` while others keep using
    /// it (`VACUUM INTO`); tokens stay sealed in it. Refused for PostgreSQL (use `pg_dump`).
    pub async fn backup_to(&self, path: &Path) -> Result<(), DbError> {
        if self.backend != Backend::Sqlite {
            return Err(DbError::BadUrl(
                "backups of PostgreSQL are pg_dump's job (see the README)".into(),
            ));
        }
        // Created empty and 0600 first (VACUUM INTO writes into an empty file): a backup holds
        // what the database holds.
        crate::private_files::create(path)
            .map_err(|e| DbError::BadUrl(format!("cannot create {}: {e}", path.display())))?;
        let written = sqlx::query("VACUUM INTO $1")
            .bind(path.display().to_string())
            .execute(&self.pool)
            .await;
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            return Err(e.into());
        }
        Ok(())
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

    /// Closes the pools (waits for connections to return).
    pub async fn close(&self) {
        self.pool.close().await;
        self.relaxed_pool.close().await;
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Databases for the layer's own tests: an in-memory SQLite one, and a fresh PostgreSQL
    //! schema when `FBSYNC_TEST_POSTGRES_URL` (or the local server) is there.

    use super::*;

    /// A private in-memory SQLite database (one connection, so every query sees the same one).
    pub async fn sqlite() -> Database {
        sqlx::any::install_default_drivers();
        let options = AnyConnectOptions::from_str("sqlite::memory:").expect("url");
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("in-memory SQLite");
        let database = Database {
            // One in-memory database: both share its only connection.
            relaxed_pool: pool.clone(),
            pool,
            page_times_set: Arc::default(),
            windows_seen: Arc::default(),
            backend: Backend::Sqlite,
        };
        database.migrate().await.expect("migrations");
        database
    }

    /// A fresh database on the local PostgreSQL server (named `fbsync_unit_<time>_*` and
    /// dropped by a run an hour later); `None` when no server answers. Any other failure is a
    /// failure of the test, with its reason.
    pub async fn postgres() -> Option<Database> {
        sqlx::any::install_default_drivers();
        let admin_url = std::env::var("FBSYNC_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let options = AnyConnectOptions::from_str(&admin_url).expect("a PostgreSQL URL");
        let admin = match AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
        {
            Ok(admin) => admin,
            Err(e) => {
                eprintln!("PostgreSQL at {admin_url} is not reachable: {e}");
                return None;
            }
        };
        // Databases of earlier runs (named by their creation time) older than an hour go.
        let now_secs = crate::now_ms() / 1000;
        let old: Vec<(String,)> = sqlx::query_as(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'fbsync_unit_%'",
        )
        .fetch_all(&admin)
        .await
        .expect("list databases");
        for (stale,) in old {
            let created: i64 = stale
                .split('_')
                .nth(2)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            if created < now_secs - 3600 {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {stale} WITH (FORCE)"))
                    .execute(&admin)
                    .await;
            }
        }
        let name = format!("fbsync_unit_{now_secs}_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').expect("a URL with a database");
        let url = SecretString::from(format!("{base}/{name}"));
        Some(
            Database::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connect to {name}: {e}")),
        )
    }

    /// Both backends (PostgreSQL only when reachable), each with its name for messages.
    pub async fn backends() -> Vec<(&'static str, Database)> {
        let mut all = vec![("sqlite", sqlite().await)];
        match postgres().await {
            Some(db) => all.push(("postgres", db)),
            None if std::env::var_os("CI").is_some() => {
                panic!("PostgreSQL is not reachable, and CI must test it")
            }
            None => eprintln!("PostgreSQL not reachable: testing SQLite only"),
        }
        all
    }
}
