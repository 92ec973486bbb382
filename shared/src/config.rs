//! Typed configuration, read from the environment and an optional `.env` file.
//!
//! Every setting has one home here. Values are parsed once, at start, and every problem is
//! reported at once, one clear line each. What only some roles require (ingest's webhook
//! secrets, the token key, the object store's coordinates) is checked by the role at start into
//! a value of its own with nothing optional left ([`WebhookSecrets`], [`TokenCipher`],
//! [`StoreLocation`]); [`all_of`] joins their problems so they too are reported at once. Secrets
//! are held in [`SecretString`] so they cannot end up in a `Debug` print or log.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono::Timelike;
use secrecy::{ExposeSecret, SecretString};

use crate::crypto::TokenCipher;

/// One variable fbsync reads: its name, its default, and who reads it. The one list of them:
/// parsing takes defaults from here, and tests check `.env.example` and the README's
/// configuration table against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variable {
    pub name: &'static str,
    /// The value used when the variable is unset or empty; `None`: no value (or one derived
    /// from another variable, as the text of `roles` says).
    pub default: Option<&'static str>,
    /// The roles and commands that read it, and whether they require it.
    pub roles: &'static str,
}

const fn var(name: &'static str, default: Option<&'static str>, roles: &'static str) -> Variable {
    Variable {
        name,
        default,
        roles,
    }
}

/// Every variable fbsync reads (besides `RUST_LOG`, the log filter, and `FBSYNC_PAGE_TOKEN`,
/// `pages add`'s token).
pub const VARIABLES: &[Variable] = &[
    var("FACEBOOK_APP_SECRET", None, "ingest, up, check (required)"),
    var(
        "FACEBOOK_VERIFY_TOKEN",
        None,
        "ingest, up, check (required)",
    ),
    var(
        "FACEBOOK_GRAPH_URL",
        Some("https://graph.facebook.com/v25.0"),
        "ingest, worker, up, check",
    ),
    var(
        "FACEBOOK_APP_ID",
        None,
        "ingest, worker, up (required for the owner routes)",
    ),
    var(
        "FACEBOOK_REDIRECT_URI",
        None,
        "ingest, up (required for the owner routes)",
    ),
    var(
        "FACEBOOK_DIALOG_URL",
        Some("https://www.facebook.com/v25.0/dialog/oauth"),
        "ingest, up",
    ),
    var(
        "SHOPIFY_API_KEY",
        None,
        "ingest, up (required for the owner routes)",
    ),
    var(
        "SHOPIFY_API_SECRET",
        None,
        "ingest, up (required for the owner routes)",
    ),
    var(
        "SHOPIFY_REDIRECT_URI",
        None,
        "ingest, up (required for the owner routes)",
    ),
    var("SHOPIFY_SCOPES", Some("read_products"), "ingest, up"),
    var(
        "SHOPIFY_ADMIN_URL",
        Some("https://{shop}/admin"),
        "ingest, up ({shop} is the shop's domain)",
    ),
    var(
        "STATE_TOKEN_SECRET",
        None,
        "ingest, up (required for the owner routes)",
    ),
    var(
        "AMQP_URL",
        Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
        "every role, dlq, check",
    ),
    var("QUEUE_PREFIX", Some("fbsync"), "every role, dlq, check"),
    var(
        "DATA_DIR",
        Some("./data"),
        "worker, up, check (the local store and the default database)",
    ),
    var(
        "DATABASE_URL",
        None,
        "ingest, worker, up, pages, check, backup (default sqlite://$DATA_DIR/fbsync.db)",
    ),
    var(
        "TOKEN_ENCRYPTION_KEY",
        None,
        "worker, up, pages add, check (required; ingest with the owner routes)",
    ),
    var(
        "SPACES_ENDPOINT",
        None,
        "worker, up, check (unset: the local directory store)",
    ),
    var(
        "SPACES_BUCKET",
        None,
        "worker, up, check (required with SPACES_ENDPOINT)",
    ),
    var("SPACES_REGION", Some("nyc3"), "worker, up, check"),
    var(
        "SPACES_API_KEY",
        None,
        "worker, up, check (required with SPACES_ENDPOINT)",
    ),
    var(
        "SPACES_API_SECRET",
        None,
        "worker, up, check (required with SPACES_ENDPOINT)",
    ),
    var("SPACES_OBJECT_PUTS_PER_5MIN", Some("5"), "worker, up"),
    var("SPACES_OBJECT_PUT_WINDOW_SECS", Some("300"), "worker, up"),
    var(
        "SPACES_CONDITIONAL_WRITES",
        Some("true"),
        "worker, up, check",
    ),
    var("SPACES_WRITES_PER_SEC", Some("150"), "worker, up"),
    var("SPACES_OPS_PER_SEC", Some("240"), "worker, up"),
    var("INGEST_ADDR", Some("0.0.0.0:5000"), "ingest, up"),
    var("INGEST_METRICS_ADDR", Some("127.0.0.1:5001"), "ingest, up"),
    var("INGEST_BODY_LIMIT_BYTES", Some("1048576"), "ingest, up"),
    var("INGEST_PUBLISH_TIMEOUT_MS", Some("3000"), "ingest, up"),
    var("INGEST_MAX_IN_FLIGHT", Some("1024"), "ingest, up"),
    var("INGEST_READ_TIMEOUT_MS", Some("10000"), "ingest, up"),
    var("WORKER_PREFETCH", Some("256"), "worker, up"),
    var("WORKER_MAX_ATTEMPTS", Some("8"), "worker, up"),
    var("WORKER_RETRY_BASE_MS", Some("200"), "worker, up"),
    var("WORKER_RETRY_MAX_MS", Some("30000"), "worker, up"),
    var("WORKER_PARK_AFTER_MS", Some("60000"), "worker, up"),
    var("WORKER_FLUSH_INTERVAL_MS", Some("200"), "worker, up"),
    var("WORKER_FLUSH_BATCH", Some("64"), "worker, up"),
    var("WORKER_OBJECT_WRITE_GAP_MS", Some("1000"), "worker, up"),
    var("WORKER_LEASE_MS", Some("60000"), "worker, up"),
    var("WORKER_METRICS_ADDR", None, "worker (unset: not served)"),
    var("WORKER_POLL_CONCURRENCY", Some("2"), "worker, up"),
    var(
        "POLL_SCHEDULE",
        Some("@daily"),
        "scheduler, up (cron, UTC; seconds optional)",
    ),
    var("POLL_SPREAD", Some("1h"), "scheduler, up"),
    var(
        "LOG_FORMAT",
        Some("text"),
        "every role (json for JSON lines)",
    ),
];

/// Configuration problems, one human-readable line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

/// Everything fbsync reads from its environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Facebook app, webhook and Graph API settings.
    pub facebook: FacebookSettings,
    /// The Shopify app of the owner's connect flow.
    pub shopify: ShopifySettings,
    /// Signs the OAuth `state` of both connect flows; see [`Settings::owner_settings`].
    state_secret: Option<SecretString>,
    /// Where the broker is and how this deployment's names are prefixed.
    pub broker: BrokerSettings,
    /// The HTTP service's address and request limits.
    pub ingest: IngestSettings,
    /// The object store (Spaces/S3 or a local directory) and its rate limits.
    pub storage: StorageSettings,
    /// Where tokens, pages and staged events live.
    pub database_url: SecretString,
    /// Key for page tokens at rest (AES-256-GCM); see [`Settings::token_key`].
    token_encryption_key: Option<SecretString>,
    /// Retry policy for transient failures in workers.
    pub retry: RetrySettings,
    /// Worker tuning: prefetch, flush cadence, metrics address.
    pub worker: WorkerSettings,
    /// When the scheduler plans poll rounds, and over how long it spreads one.
    pub scheduler: SchedulerSettings,
    /// JSON log lines when true (LOG_FORMAT=json).
    pub json_logs: bool,
}

#[derive(Debug, Clone)]
pub struct FacebookSettings {
    /// Signs every webhook delivery; see [`Settings::webhook_secrets`].
    app_secret: Option<SecretString>,
    /// Echoed by Facebook in the subscription handshake; see [`Settings::webhook_secrets`].
    verify_token: Option<SecretString>,
    /// Base of every Graph API call, version included; tests point it at a fake server.
    pub graph_url: String,
    /// The app's id: Facebook Login's `client_id`, and how a worker recognises its own app
    /// among a Page's subscribed apps.
    pub app_id: Option<String>,
    /// Where Facebook's dialog sends the owner back (`/facebook/callback`); see
    /// [`Settings::owner_settings`].
    redirect_uri: Option<String>,
    /// Facebook Login's dialog, version included; tests point it at a fake dialog.
    dialog_url: String,
}

/// The Shopify app: the first step of the owner's connect flow.
#[derive(Debug, Clone)]
pub struct ShopifySettings {
    /// The app's API key (`client_id`).
    api_key: Option<String>,
    /// Signs Shopify's callbacks (`hmac`) and authenticates the code exchange.
    api_secret: Option<SecretString>,
    /// Where Shopify sends the owner back (`/shopify/callback`).
    redirect_uri: Option<String>,
    /// The access scopes asked of the shop.
    scopes: String,
    /// The shop's admin base URL, `{shop}` standing for the shop's domain; tests point it at a
    /// fake Shopify.
    admin_url: String,
}

#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// AMQP URL; holds the broker password, so it is a secret.
    pub amqp_url: SecretString,
    /// Prefix of every exchange and queue, so deployments and tests share one broker.
    pub queue_prefix: String,
}

#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Where the HTTP service listens.
    pub addr: SocketAddr,
    /// Largest webhook body accepted (413 beyond).
    pub body_limit_bytes: usize,
    /// How long a delivery may wait for its publisher confirms before answering 503. Facebook
    /// gives up after about 5 s, so this stays well below that.
    pub publish_timeout: Duration,
    /// Requests handled at once; beyond it ingest answers 503 at once, so unauthenticated
    /// clients cannot make it hold unbounded memory (each may hold a body of up to the limit).
    pub max_in_flight: usize,
    /// Longest time a client may take to send a request's headers, and then its body: slow
    /// clients are cut off instead of holding connections and memory.
    pub read_timeout: Duration,
    /// Where ingest serves `/metrics` (and `/healthz`, `/readyz`): not on the public webhook
    /// listener.
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct StorageSettings {
    /// S3-compatible endpoint; without it objects go under `data_dir`. See
    /// [`Settings::store_location`] for the rest of an S3 store's coordinates.
    endpoint: Option<String>,
    bucket: Option<String>,
    region: String,
    access_key: Option<SecretString>,
    secret_key: Option<SecretString>,
    /// Root of the local object store (and of the default SQLite file).
    pub data_dir: PathBuf,
    /// PUTs allowed to one object per window (0 = unlimited).
    pub object_puts_per_5min: u32,
    /// The per-object window in seconds (300 on Spaces; shorter only for tests).
    pub object_put_window_secs: u32,
    /// Send If-Match / If-None-Match on writes, so overlapping writers can never lose an update.
    /// Turn off only for a store that rejects conditional writes.
    pub conditional_writes: bool,
    /// Writes (PUT/POST/COPY/DELETE/LIST) per second to the bucket, shared by this process.
    pub writes_per_sec: u32,
    /// Operations of any kind per second to the bucket, shared by this process.
    pub ops_per_sec: u32,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Attempts of a transient operation before the job is dead-lettered.
    pub max_attempts: u32,
    /// First backoff delay; later ones double, with jitter.
    pub base_delay: Duration,
    /// Longest single backoff delay.
    pub max_delay: Duration,
    /// A job that must wait longer than this (a Graph rate limit, an object's PUT budget) is
    /// parked in a delay queue and acked, not held: RabbitMQ closes a channel that holds a
    /// message past its consumer timeout (30 minutes by default).
    pub park_after: Duration,
}

/// The longest WORKER_OBJECT_WRITE_GAP_MS accepted: a message waits up to the gap to be
/// stored, and past half of the 120 s for which a worker merges into what it wrote without
/// reading it, the gap would cost every flush a read.
pub const MAX_OBJECT_WRITE_GAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Unacked messages a worker holds at once per queue.
    pub prefetch: u16,
    /// How often the flusher looks for due conversations when it has nothing to do.
    pub flush_interval: Duration,
    /// Conversations one flusher claims at once.
    pub flush_batch: u32,
    /// The least time between two writes of one conversation object. Each write copies the
    /// whole object, so a busy conversation rewritten as fast as the flusher can go costs
    /// CPU and requests in proportion to its size times its write rate; with a gap, events
    /// that arrive meanwhile go into the next write together. It binds only where the
    /// object's PUT budget does not (no budget, or its first PUTs in a window).
    pub object_write_gap: Duration,
    /// How long a claim on a conversation lasts before another worker may take it over.
    pub lease: Duration,
    /// Where the worker serves /metrics and /healthz (none when unset).
    pub metrics_addr: Option<SocketAddr>,
    /// Poll jobs a worker runs at once; each walks one Page's conversations.
    pub poll_concurrency: u16,
}

#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// When a poll round starts; each round is one period, and a Page is polled once a period.
    pub schedule: PollSchedule,
    /// A round's jobs are enqueued over this long, each Page at its own offset, so thousands
    /// of Pages do not call the Graph API in the same minute.
    pub spread: Duration,
}

/// A validated cron schedule (five fields, or six with seconds first; `@daily` and the other
/// nicknames), evaluated in UTC.
#[derive(Debug, Clone)]
pub struct PollSchedule {
    /// The text as configured, for messages.
    pub text: String,
    /// The parsed pattern.
    cron: croner::Cron,
}

impl PollSchedule {
    /// The start of the period `now` falls in: the last time the schedule fired, `now`
    /// included.
    pub fn period_start(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        // Whole seconds: every scheduler must name a period alike, whenever it looks.
        let now = now.with_nanosecond(0)?;
        self.cron
            .find_previous_occurrence(&now, true)
            .ok()?
            .with_nanosecond(0)
    }

    /// The next time the schedule fires after `now`.
    pub fn next_start(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let now = now.with_nanosecond(0)?;
        self.cron
            .find_next_occurrence(&now, false)
            .ok()?
            .with_nanosecond(0)
    }
}

impl FromStr for PollSchedule {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(text)
            .map_err(|e| e.to_string())?;
        // A pattern that never fires (30 February) parses, but has no period.
        cron.find_next_occurrence(&chrono::Utc::now(), false)
            .map_err(|_| "it never fires".to_string())?;
        Ok(Self {
            text: text.to_string(),
            cron,
        })
    }
}

/// A span of time: `30s`, `10m`, `2h`, `1d`, or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (number, unit) = text.split_at(
            text.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len()),
        );
        let refused = || format!("{text:?} is not a duration like 30s, 10m, 2h or 1d");
        let value: u64 = number.parse().map_err(|_| refused())?;
        let seconds = match unit {
            "" | "s" => value,
            "m" => value * 60,
            "h" => value * 3600,
            "d" => value * 86_400,
            _ => return Err(refused()),
        };
        Ok(Span(Duration::from_secs(seconds)))
    }
}

impl Settings {
    /// Reads `.env` (when present, without overriding the real environment), then the
    /// environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is worth a warning, not a refusal.
        if let Err(e) = dotenvy::dotenv()
            && !e.not_found()
        {
            eprintln!("warning: .env could not be read: {e}");
        }
        Self::from_map(&std::env::vars().collect())
    }

    /// Parses settings from a map of variables (the environment, or a test's own).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::parse(vars).0
    }

    /// The settings, and the names of every variable read for them.
    fn parse(vars: &HashMap<String, String>) -> (Result<Self, ConfigError>, Vec<&'static str>) {
        let mut reader = VarReader {
            vars,
            problems: Vec::new(),
            read: Vec::new(),
        };
        let data_dir = PathBuf::from(reader.text("DATA_DIR"));
        let default_db = format!("sqlite://{}/fbsync.db", data_dir.display());
        let settings = Settings {
            facebook: FacebookSettings {
                app_secret: reader.secret("FACEBOOK_APP_SECRET"),
                verify_token: reader.secret("FACEBOOK_VERIFY_TOKEN"),
                graph_url: reader
                    .text("FACEBOOK_GRAPH_URL")
                    .trim_end_matches('/')
                    .to_string(),
                app_id: reader.optional("FACEBOOK_APP_ID"),
                redirect_uri: reader.optional("FACEBOOK_REDIRECT_URI"),
                dialog_url: reader.text("FACEBOOK_DIALOG_URL"),
            },
            shopify: ShopifySettings {
                api_key: reader.optional("SHOPIFY_API_KEY"),
                api_secret: reader.secret("SHOPIFY_API_SECRET"),
                redirect_uri: reader.optional("SHOPIFY_REDIRECT_URI"),
                scopes: reader.text("SHOPIFY_SCOPES"),
                admin_url: reader
                    .text("SHOPIFY_ADMIN_URL")
                    .trim_end_matches('/')
                    .to_string(),
            },
            state_secret: reader.secret("STATE_TOKEN_SECRET"),
            broker: BrokerSettings {
                amqp_url: reader.text("AMQP_URL").into(),
                queue_prefix: reader.text("QUEUE_PREFIX"),
            },
            ingest: IngestSettings {
                addr: reader.parsed("INGEST_ADDR"),
                body_limit_bytes: reader.parsed("INGEST_BODY_LIMIT_BYTES"),
                publish_timeout: Duration::from_millis(reader.parsed("INGEST_PUBLISH_TIMEOUT_MS")),
                max_in_flight: reader.parsed("INGEST_MAX_IN_FLIGHT"),
                read_timeout: Duration::from_millis(reader.parsed("INGEST_READ_TIMEOUT_MS")),
                metrics_addr: reader.parsed("INGEST_METRICS_ADDR"),
            },
            storage: StorageSettings {
                endpoint: reader.optional("SPACES_ENDPOINT"),
                bucket: reader.optional("SPACES_BUCKET"),
                region: reader.text("SPACES_REGION"),
                access_key: reader.secret("SPACES_API_KEY"),
                secret_key: reader.secret("SPACES_API_SECRET"),
                data_dir,
                object_puts_per_5min: reader.parsed("SPACES_OBJECT_PUTS_PER_5MIN"),
                object_put_window_secs: reader.parsed("SPACES_OBJECT_PUT_WINDOW_SECS"),
                conditional_writes: reader.parsed("SPACES_CONDITIONAL_WRITES"),
                writes_per_sec: reader.parsed("SPACES_WRITES_PER_SEC"),
                ops_per_sec: reader.parsed("SPACES_OPS_PER_SEC"),
            },
            database_url: reader
                .secret("DATABASE_URL")
                .unwrap_or_else(|| default_db.into()),
            token_encryption_key: reader.secret("TOKEN_ENCRYPTION_KEY"),
            retry: RetrySettings {
                max_attempts: reader.parsed("WORKER_MAX_ATTEMPTS"),
                base_delay: Duration::from_millis(reader.parsed("WORKER_RETRY_BASE_MS")),
                max_delay: Duration::from_millis(reader.parsed("WORKER_RETRY_MAX_MS")),
                park_after: Duration::from_millis(reader.parsed("WORKER_PARK_AFTER_MS")),
            },
            worker: WorkerSettings {
                prefetch: reader.parsed("WORKER_PREFETCH"),
                flush_interval: Duration::from_millis(reader.parsed("WORKER_FLUSH_INTERVAL_MS")),
                flush_batch: reader.parsed("WORKER_FLUSH_BATCH"),
                object_write_gap: Duration::from_millis(
                    reader.parsed("WORKER_OBJECT_WRITE_GAP_MS"),
                ),
                lease: Duration::from_millis(reader.parsed("WORKER_LEASE_MS")),
                metrics_addr: reader.optional_parsed("WORKER_METRICS_ADDR"),
                poll_concurrency: reader.parsed("WORKER_POLL_CONCURRENCY"),
            },
            scheduler: SchedulerSettings {
                schedule: reader.parsed("POLL_SCHEDULE"),
                spread: reader.parsed::<Span>("POLL_SPREAD").0,
            },
            json_logs: reader.text("LOG_FORMAT") == "json",
        };
        if settings.retry.max_attempts == 0 {
            reader
                .problems
                .push("WORKER_MAX_ATTEMPTS must be at least 1".into());
        }
        if settings.worker.poll_concurrency == 0 {
            reader
                .problems
                .push("WORKER_POLL_CONCURRENCY must be at least 1".into());
        }
        if settings.worker.object_write_gap > MAX_OBJECT_WRITE_GAP {
            reader.problems.push(format!(
                "WORKER_OBJECT_WRITE_GAP_MS must be at most {}: a busy conversation's messages wait up to the gap to be stored",
                MAX_OBJECT_WRITE_GAP.as_millis()
            ));
        }
        if settings.ingest.max_in_flight == 0 {
            reader
                .problems
                .push("INGEST_MAX_IN_FLIGHT must be at least 1".into());
        }
        if settings.ingest.read_timeout.is_zero() {
            reader
                .problems
                .push("INGEST_READ_TIMEOUT_MS must be more than 0".into());
        }
        if !settings.shopify.admin_url.contains("{shop}") {
            reader
                .problems
                .push("SHOPIFY_ADMIN_URL must contain {shop}, the shop's domain".into());
        }
        let database_url = settings.database_url.expose_secret();
        if !(database_url.starts_with("sqlite:") || database_url.starts_with("postgres")) {
            reader
                .problems
                .push("DATABASE_URL must start with sqlite: or postgres://".into());
        }
        if !settings.broker.amqp_url.expose_secret().starts_with("amqp") {
            reader
                .problems
                .push("AMQP_URL must start with amqp:// or amqps://".into());
        }
        let settings = if reader.problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError(reader.problems))
        };
        (settings, reader.read)
    }

    /// Ingest's secrets, or why they are missing.
    pub fn webhook_secrets(&self) -> Result<WebhookSecrets, Vec<String>> {
        let app_secret = required(
            &self.facebook.app_secret,
            "FACEBOOK_APP_SECRET",
            "ingest needs it to verify webhook signatures",
        );
        let verify_token = required(
            &self.facebook.verify_token,
            "FACEBOOK_VERIFY_TOKEN",
            "ingest needs it for the subscription handshake",
        );
        let (app_secret, verify_token) = all_of(app_secret, verify_token)?;
        Ok(WebhookSecrets {
            app_secret,
            verify_token,
        })
    }

    /// The cipher that seals Page tokens, from TOKEN_ENCRYPTION_KEY (32 bytes, base64).
    pub fn token_cipher(&self) -> Result<TokenCipher, Vec<String>> {
        let key = required(
            &self.token_encryption_key,
            "TOKEN_ENCRYPTION_KEY",
            "page tokens are encrypted at rest (32 bytes, base64; `openssl rand -base64 32`)",
        )?;
        match TokenCipher::from_base64(&key) {
            Ok(cipher) => Ok(cipher),
            Err(e) => Err(vec![format!("TOKEN_ENCRYPTION_KEY is malformed: {e}")]),
        }
    }

    /// Where objects go: the S3-compatible store when SPACES_ENDPOINT is set (its bucket and
    /// keys then required), else the local directory.
    pub fn store_location(&self) -> Result<StoreLocation, Vec<String>> {
        let storage = &self.storage;
        let Some(endpoint) = &storage.endpoint else {
            return Ok(StoreLocation::Local(storage.data_dir.clone()));
        };
        let bucket = required(&storage.bucket, "SPACES_BUCKET", "SPACES_ENDPOINT is set");
        let access_key = required(
            &storage.access_key,
            "SPACES_API_KEY",
            "SPACES_ENDPOINT is set",
        );
        let secret_key = required(
            &storage.secret_key,
            "SPACES_API_SECRET",
            "SPACES_ENDPOINT is set",
        );
        let ((bucket, access_key), secret_key) = all_of(all_of(bucket, access_key), secret_key)?;
        Ok(StoreLocation::S3(S3Target {
            endpoint: endpoint.clone(),
            bucket,
            region: storage.region.clone(),
            access_key,
            secret_key,
            conditional_writes: storage.conditional_writes,
        }))
    }
}

impl Settings {
    /// The owner routes' settings (Shopify OAuth, Facebook Login, the Meta callbacks): `None`
    /// when none of their required variables is set (ingest then serves the webhook only);
    /// every missing one when only some are.
    pub fn owner_settings(&self) -> Result<Option<OwnerSettings>, Vec<String>> {
        const WHY: &str = "the owner routes need it (the other owner settings are set)";
        let facebook = &self.facebook;
        let shopify = &self.shopify;
        let any_set = facebook.app_id.is_some()
            || facebook.redirect_uri.is_some()
            || shopify.api_key.is_some()
            || shopify.api_secret.is_some()
            || shopify.redirect_uri.is_some()
            || self.state_secret.is_some();
        if !any_set {
            return Ok(None);
        }
        let app_id = required(&facebook.app_id, "FACEBOOK_APP_ID", WHY).and_then(|id| {
            if !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_digit()) {
                Ok(id)
            } else {
                Err(vec![format!(
                    "FACEBOOK_APP_ID={id:?} is not an app id (digits)"
                )])
            }
        });
        let app_secret = required(&facebook.app_secret, "FACEBOOK_APP_SECRET", WHY);
        let facebook_redirect = required(&facebook.redirect_uri, "FACEBOOK_REDIRECT_URI", WHY)
            .and_then(|uri| http_url("FACEBOOK_REDIRECT_URI", uri));
        let api_key = required(&shopify.api_key, "SHOPIFY_API_KEY", WHY);
        let api_secret = required(&shopify.api_secret, "SHOPIFY_API_SECRET", WHY);
        let shopify_redirect = required(&shopify.redirect_uri, "SHOPIFY_REDIRECT_URI", WHY)
            .and_then(|uri| http_url("SHOPIFY_REDIRECT_URI", uri));
        let state_secret =
            required(&self.state_secret, "STATE_TOKEN_SECRET", WHY).and_then(|secret| {
                if secret.expose_secret().len() >= 16 {
                    Ok(secret)
                } else {
                    Err(vec![
                        "STATE_TOKEN_SECRET must be at least 16 characters".to_string(),
                    ])
                }
            });
        let facebook_app = all_of(all_of(app_id, app_secret), facebook_redirect);
        let shopify_app = all_of(all_of(api_key, api_secret), shopify_redirect);
        let ((((app_id, app_secret), facebook_redirect), shopify_app), state_secret) =
            all_of(all_of(facebook_app, shopify_app), state_secret)?;
        let ((api_key, api_secret), shopify_redirect) = shopify_app;
        Ok(Some(OwnerSettings {
            facebook_app_id: app_id,
            facebook_app_secret: app_secret,
            facebook_redirect_uri: facebook_redirect,
            dialog_url: facebook.dialog_url.clone(),
            graph_url: facebook.graph_url.clone(),
            shopify_api_key: api_key,
            shopify_api_secret: api_secret,
            shopify_redirect_uri: shopify_redirect,
            shopify_scopes: shopify.scopes.clone(),
            shopify_admin_url: shopify.admin_url.clone(),
            state_secret,
        }))
    }
}

/// An absolute http(s) URL, or the line that says it is not.
fn http_url(name: &str, uri: String) -> Result<String, Vec<String>> {
    if uri.starts_with("https://") || uri.starts_with("http://") {
        Ok(uri)
    } else {
        Err(vec![format!(
            "{name}={uri:?} must be an absolute http:// or https:// URL"
        )])
    }
}

/// Everything the owner routes need, all present.
#[derive(Debug, Clone)]
pub struct OwnerSettings {
    /// Facebook Login's `client_id`.
    pub facebook_app_id: String,
    /// Authenticates the code exchanges and checks Meta's `signed_request`s.
    pub facebook_app_secret: SecretString,
    /// `/facebook/callback` as Facebook reaches it; its origin is also where the data-deletion
    /// status pages are linked from.
    pub facebook_redirect_uri: String,
    /// Facebook Login's dialog.
    pub dialog_url: String,
    /// The Graph API's base URL.
    pub graph_url: String,
    /// The Shopify app's `client_id`.
    pub shopify_api_key: String,
    /// Checks Shopify's `hmac` and authenticates the code exchange.
    pub shopify_api_secret: SecretString,
    /// `/shopify/callback` as Shopify reaches it.
    pub shopify_redirect_uri: String,
    /// The scopes asked of a shop.
    pub shopify_scopes: String,
    /// The shop's admin base URL with `{shop}` in it.
    pub shopify_admin_url: String,
    /// Signs OAuth `state`s.
    pub state_secret: SecretString,
}

impl OwnerSettings {
    /// Cookies are `Secure` when the owner reaches us over https.
    pub fn secure_cookies(&self) -> bool {
        self.facebook_redirect_uri.starts_with("https://")
            && self.shopify_redirect_uri.starts_with("https://")
    }
}

/// Ingest's secrets, both present.
#[derive(Debug, Clone)]
pub struct WebhookSecrets {
    /// Signs every webhook delivery; ingest cannot accept anything without it.
    pub app_secret: SecretString,
    /// Echoed by Facebook in the subscription handshake.
    pub verify_token: SecretString,
}

/// Where the object store is, with everything it needs present.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// A local directory with the bucket's layout (no SPACES_ENDPOINT).
    Local(PathBuf),
    /// Spaces or another S3-compatible store.
    S3(S3Target),
}

/// An S3-compatible store's coordinates.
#[derive(Debug, Clone)]
pub struct S3Target {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: SecretString,
    pub secret_key: SecretString,
    /// Send If-Match / If-None-Match on writes (off only for a store that rejects them).
    pub conditional_writes: bool,
}

/// A required value, or the line that says it is missing and why.
fn required<T: Clone>(value: &Option<T>, name: &str, why: &str) -> Result<T, Vec<String>> {
    value
        .clone()
        .ok_or_else(|| vec![format!("{name} is not set: {why}")])
}

/// Both values, or the problems of both (so every problem is reported at once).
pub fn all_of<A, B>(
    a: Result<A, Vec<String>>,
    b: Result<B, Vec<String>>,
) -> Result<(A, B), Vec<String>> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (a, b) => Err(a.err().into_iter().chain(b.err()).flatten().collect()),
    }
}

/// Reads variables and collects every parse problem instead of stopping at the first; every
/// name it reads is one of [`VARIABLES`], whose defaults it applies.
struct VarReader<'a> {
    vars: &'a HashMap<String, String>,
    problems: Vec<String>,
    /// Every name read, so a test can hold the code and [`VARIABLES`] to each other.
    read: Vec<&'static str>,
}

impl VarReader<'_> {
    /// The variable's entry in [`VARIABLES`].
    fn declared(&mut self, name: &'static str) -> Option<&'static Variable> {
        self.read.push(name);
        let declared = VARIABLES.iter().find(|v| v.name == name);
        if declared.is_none() {
            self.problems
                .push(format!("{name} is read but not declared (a bug in fbsync)"));
        }
        declared
    }

    /// A non-empty value, trimmed; the default is not applied.
    fn optional(&mut self, name: &'static str) -> Option<String> {
        self.declared(name);
        self.vars
            .get(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn secret(&mut self, name: &'static str) -> Option<SecretString> {
        self.optional(name).map(SecretString::from)
    }

    /// The value, or the declared default (empty when there is none).
    fn text(&mut self, name: &'static str) -> String {
        let default = self
            .declared(name)
            .and_then(|v| v.default)
            .unwrap_or_default();
        self.optional(name).unwrap_or_else(|| default.to_string())
    }

    fn optional_parsed<T: FromStr>(&mut self, name: &'static str) -> Option<T>
    where
        T::Err: fmt::Display,
    {
        let raw = self.optional(name)?;
        match raw.parse() {
            Ok(value) => Some(value),
            Err(e) => {
                self.problems
                    .push(format!("{name}={raw:?} is not a valid value: {e}"));
                None
            }
        }
    }

    /// The value parsed, or the declared default parsed.
    fn parsed<T: FromStr + Placeholder>(&mut self, name: &'static str) -> T
    where
        T::Err: fmt::Display,
    {
        if let Some(value) = self.optional_parsed(name) {
            return value;
        }
        let default = self
            .declared(name)
            .and_then(|v| v.default)
            .unwrap_or_default();
        default.parse().unwrap_or_else(|_| {
            self.problems.push(format!(
                "{name}: its default {default:?} does not parse (a bug in fbsync)"
            ));
            T::placeholder()
        })
    }
}

/// A value to carry on parsing with once a problem is reported: the settings are refused
/// anyway, so it is never used.
trait Placeholder {
    fn placeholder() -> Self;
}

macro_rules! placeholder_default {
    ($($t:ty),*) => {$(
        impl Placeholder for $t {
            fn placeholder() -> Self {
                <$t>::default()
            }
        }
    )*};
}

placeholder_default!(u16, u32, u64, usize, bool, Span);

impl Placeholder for PollSchedule {
    fn placeholder() -> Self {
        "@daily".parse().expect("@daily is a schedule")
    }
}

impl Placeholder for SocketAddr {
    fn placeholder() -> Self {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_design() {
        let settings = Settings::from_map(&vars(&[])).expect("defaults parse");
        assert_eq!(settings.broker.queue_prefix, "fbsync");
        assert_eq!(settings.ingest.addr.port(), 5000);
        assert_eq!(settings.storage.object_puts_per_5min, 5);
        assert_eq!(
            settings.database_url.expose_secret(),
            "sqlite://./data/fbsync.db"
        );
        assert_eq!(
            settings.facebook.graph_url,
            "https://graph.facebook.com/v25.0"
        );
    }

    #[test]
    fn a_write_gap_over_a_minute_is_refused() {
        let err = Settings::from_map(&vars(&[("WORKER_OBJECT_WRITE_GAP_MS", "60001")]))
            .expect_err("too long a gap");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].contains("WORKER_OBJECT_WRITE_GAP_MS must be at most 60000"));
        let settings = Settings::from_map(&vars(&[("WORKER_OBJECT_WRITE_GAP_MS", "60000")]))
            .expect("a minute is allowed");
        assert_eq!(settings.worker.object_write_gap, MAX_OBJECT_WRITE_GAP);
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = Settings::from_map(&vars(&[
            ("INGEST_ADDR", "nowhere"),
            ("WORKER_PREFETCH", "-1"),
        ]))
        .expect_err("bad values");
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.0[0].contains("INGEST_ADDR"));
    }

    #[test]
    fn every_variable_read_is_declared_and_every_declared_one_is_read() {
        let (settings, read) = Settings::parse(&vars(&[]));
        assert!(
            settings.is_ok(),
            "every declared default parses: {settings:?}"
        );
        for name in &read {
            assert!(
                VARIABLES.iter().any(|v| v.name == *name),
                "{name} is read but not in VARIABLES"
            );
        }
        for variable in VARIABLES {
            assert!(
                read.contains(&variable.name),
                "{} is declared but never read",
                variable.name
            );
        }
    }

    /// `.env.example` and the README's configuration table, as they are in the repository.
    fn repository_file(name: &str) -> String {
        let path = format!("{}/../{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn env_example_documents_every_variable_with_its_default_and_nothing_else() {
        let example = repository_file(".env.example");
        let read_part = example
            .split("# --- Not read yet")
            .next()
            .expect("the part fbsync reads");
        let mut documented = Vec::new();
        for line in read_part.lines() {
            let active = !line.starts_with('#');
            let assignment = line.trim_start_matches('#').trim();
            let Some((name, value)) = assignment.split_once('=') else {
                continue;
            };
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                continue;
            }
            let variable = VARIABLES
                .iter()
                .find(|v| v.name == name)
                .unwrap_or_else(|| panic!(".env.example sets {name}, which fbsync does not read"));
            if active && let Some(default) = variable.default {
                assert_eq!(
                    value.trim_matches('"'),
                    default,
                    ".env.example's {name} differs from its default"
                );
            }
            documented.push(name.to_string());
        }
        for variable in VARIABLES {
            assert!(
                documented.iter().any(|name| name == variable.name),
                "{} is missing from .env.example",
                variable.name
            );
        }
    }

    #[test]
    fn the_readme_configuration_table_matches_the_variables() {
        let readme = repository_file("README.md");
        for variable in VARIABLES {
            let default = variable
                .default
                .map_or(String::new(), |default| format!("`{default}`"));
            let row = format!("| `{}` | {default} | {} |", variable.name, variable.roles);
            assert!(readme.contains(&row), "README lacks the row {row}");
        }
        let rows = readme
            .lines()
            .filter(|line| line.starts_with("| `") && line.matches(" | ").count() == 2)
            .filter(|line| {
                let name = line
                    .trim_start_matches("| `")
                    .split('`')
                    .next()
                    .unwrap_or_default();
                name.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            })
            .count();
        assert_eq!(
            rows,
            VARIABLES.len(),
            "one README row per variable, no more"
        );
    }

    #[test]
    fn spans_parse() {
        let span = |text: &str| text.parse::<Span>().map(|s| s.0);
        assert_eq!(span("90"), Ok(Duration::from_secs(90)));
        assert_eq!(span("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(span("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(span("1d"), Ok(Duration::from_secs(86_400)));
        assert!(span("soon").is_err());
        assert!(span("5w").is_err());
    }

    #[test]
    fn a_poll_schedule_is_cron_and_its_period_is_the_last_firing() {
        let schedule: PollSchedule = "@daily".parse().expect("daily");
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-27T14:30:00Z")
            .expect("time")
            .to_utc();
        let start = schedule.period_start(now).expect("fired");
        assert_eq!(start.to_rfc3339(), "2026-11-27T00:00:00+00:00");
        assert_eq!(
            schedule.next_start(now).expect("fires").to_rfc3339(),
            "2026-11-28T00:00:00+00:00"
        );
        assert_eq!(
            schedule.period_start(start),
            Some(start),
            "a firing starts its period"
        );
        let later_in_the_second = now + Duration::from_millis(957);
        assert_eq!(
            schedule.period_start(later_in_the_second),
            Some(start),
            "whole seconds, whenever a scheduler looks"
        );
        let every_ten_seconds: PollSchedule = "*/10 * * * * *".parse().expect("seconds");
        assert_eq!(
            every_ten_seconds.period_start(now + Duration::from_secs(15)),
            Some(now + Duration::from_secs(10))
        );
        let problems = Settings::from_map(&vars(&[
            ("POLL_SCHEDULE", "every day"),
            ("POLL_SPREAD", "an hour"),
        ]))
        .expect_err("refused")
        .0;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("POLL_SCHEDULE=\"every day\""),
            "{problems:?}"
        );
    }

    #[test]
    fn limits_of_zero_are_refused() {
        let err = Settings::from_map(&vars(&[
            ("INGEST_MAX_IN_FLIGHT", "0"),
            ("INGEST_READ_TIMEOUT_MS", "0"),
        ]))
        .expect_err("zero limits");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn ingest_needs_its_secrets() {
        let settings = Settings::from_map(&vars(&[])).expect("defaults parse");
        let problems = settings.webhook_secrets().expect_err("no secrets");
        assert_eq!(problems.len(), 2);
        assert!(problems[0].starts_with("FACEBOOK_APP_SECRET"));
    }

    #[test]
    fn owner_routes_are_off_when_unset_and_every_missing_setting_is_reported_at_once() {
        let none = Settings::from_map(&vars(&[])).expect("defaults parse");
        assert!(matches!(none.owner_settings(), Ok(None)));
        let some = Settings::from_map(&vars(&[("SHOPIFY_API_KEY", "key")])).expect("parses");
        let problems = some.owner_settings().expect_err("incomplete");
        assert_eq!(problems.len(), 6, "{problems:?}");
        let all = Settings::from_map(&vars(&[
            ("FACEBOOK_APP_ID", "123456789012345"),
            ("FACEBOOK_APP_SECRET", "secret"),
            (
                "FACEBOOK_REDIRECT_URI",
                "https://x.example/facebook/callback",
            ),
            ("SHOPIFY_API_KEY", "key"),
            ("SHOPIFY_API_SECRET", "secret"),
            ("SHOPIFY_REDIRECT_URI", "https://x.example/shopify/callback"),
            ("STATE_TOKEN_SECRET", "a-long-enough-state-secret"),
        ]))
        .expect("parses");
        let owner = all.owner_settings().expect("complete").expect("configured");
        assert!(owner.secure_cookies());
        assert_eq!(owner.shopify_admin_url, "https://{shop}/admin");
    }

    #[test]
    fn worker_rejects_a_malformed_key() {
        let settings =
            Settings::from_map(&vars(&[("TOKEN_ENCRYPTION_KEY", "c2hvcnQ=")])).expect("parses");
        let problems = settings.token_cipher().expect_err("malformed");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("TOKEN_ENCRYPTION_KEY is malformed")),
            "{problems:?}"
        );
    }

    #[test]
    fn an_s3_store_needs_its_bucket_and_both_keys_reported_at_once() {
        let settings = Settings::from_map(&vars(&[("SPACES_ENDPOINT", "http://127.0.0.1:1")]))
            .expect("parses");
        let problems = settings.store_location().expect_err("incomplete");
        assert_eq!(problems.len(), 3, "{problems:?}");
        let local = Settings::from_map(&vars(&[])).expect("parses");
        assert!(matches!(
            local.store_location(),
            Ok(StoreLocation::Local(_))
        ));
    }
}
