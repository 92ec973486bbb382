//! Typed configuration, read from the environment and an optional `.env` file.
//!
//! Every setting has one home here. Values are parsed once, at start, and every problem is
//! reported at once, one clear line each. What only some roles require (ingest's webhook
//! secrets, the token key, the object store's coordinates) is checked by the role at start into
//! a value of its own with nothing optional left ([`WebhookSecrets`], [`TokenCipher`](crate::crypto::TokenCipher),
//! [`StoreLocation`]); a [`Problems`] gathers what every check finds, so those too are reported
//! at once. Secrets
//! are held in [`SecretString`] so they cannot end up in a `Debug` print or log.

mod problems;
mod requirements;
mod values;
mod variables;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

pub use problems::Problems;
pub use requirements::{
    FACEBOOK_CALLBACK_PATH, OwnerSettings, S3Target, SHOPIFY_CALLBACK_PATH, StoreLocation,
    WebhookSecrets,
};
use values::VarReader;
pub use values::{ConditionalWrites, PollSchedule, Span};
pub use variables::{VARIABLES, Variable};

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
    /// The webhook fields every Page is subscribed to (onboarding): FACEBOOK_WEBHOOK_FIELDS,
    /// by default [`crate::facebook::login::SUBSCRIBED_FIELDS`].
    pub webhook_fields: Vec<String>,
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
    /// Body bytes all requests in flight may hold together (503 beyond, at once): the bound on
    /// ingest's memory under unauthenticated clients, which the in-flight count alone would let
    /// reach `max_in_flight` bodies of the largest size.
    pub body_budget_bytes: usize,
    /// Connections open at once on each of ingest's listeners; one beyond is closed at once,
    /// so idle clients cannot use up the file descriptors (keep the descriptor limit above it).
    pub max_connections: usize,
    /// Longest time a client may take to send a request's headers, and then its body: slow
    /// clients are cut off instead of holding connections and memory.
    pub read_timeout: Duration,
    /// A window of refused deliveries (503) lasting this long is reconciled when it ends: every
    /// active Page is polled back to its start (`INGEST_RECONCILE_AFTER_MS`).
    pub reconcile_after: Duration,
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
    /// Send If-Match / If-None-Match on writes, so overlapping writers can never lose an update;
    /// whether the store honours them is probed (see [`ConditionalWrites`]).
    pub conditional_writes: ConditionalWrites,
    /// Writes (PUT/POST/COPY/DELETE/LIST) per second to the bucket, shared by every worker: a
    /// ceiling, lowered for a while after the store answers SlowDown.
    pub writes_per_sec: u32,
    /// Operations of any kind per second to the bucket, shared by every worker; a ceiling too.
    pub ops_per_sec: u32,
    /// Requests per second Spaces accepts from one IP address to all of an account's buckets
    /// (0 = no such limit): the bucket's operations are held below it too.
    pub requests_per_sec_per_ip: u32,
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
    /// How often each active Page's webhook subscription is checked (spread over the interval
    /// the same way): Facebook unsubscribes an app after an hour of failed deliveries.
    pub subscription_check_interval: Duration,
}

impl Settings {
    /// Reads `.env` (when present, without overriding the real environment), then the
    /// environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let (settings, problems) = Self::from_env_with_problems();
        Self::refused_on(settings, problems)
    }

    /// Parses settings from a map of variables (the environment, or a test's own).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let (settings, problems, _) = Self::parse(vars);
        Self::refused_on(settings, problems)
    }

    /// The settings, unless a problem was found.
    fn refused_on(settings: Self, problems: Vec<String>) -> Result<Self, ConfigError> {
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError(problems))
        }
    }

    /// As [`Settings::from_env`], but the settings come back even when some values did not
    /// parse (placeholders stand in for them), with every problem found: so a command can add
    /// what its role requires and report every mistake in one run.
    pub fn from_env_with_problems() -> (Self, Vec<String>) {
        // A missing .env is normal; a malformed one is worth a warning, not a refusal.
        if let Err(e) = dotenvy::dotenv()
            && !e.not_found()
        {
            eprintln!("warning: .env could not be read: {e}");
        }
        let (settings, problems, _) = Self::parse(&std::env::vars().collect());
        (settings, problems)
    }

    /// The settings (with placeholders where a value did not parse), every problem found, and
    /// the names of every variable read for them.
    fn parse(vars: &HashMap<String, String>) -> (Self, Vec<String>, Vec<&'static str>) {
        let mut reader = VarReader {
            vars,
            problems: Problems::default(),
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
                webhook_fields: reader
                    .text("FACEBOOK_WEBHOOK_FIELDS")
                    .split(',')
                    .map(|field| field.trim().to_string())
                    .filter(|field| !field.is_empty())
                    .collect(),
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
                body_budget_bytes: reader.parsed("INGEST_BODY_BUDGET_BYTES"),
                max_connections: reader.parsed("INGEST_MAX_CONNECTIONS"),
                read_timeout: Duration::from_millis(reader.parsed("INGEST_READ_TIMEOUT_MS")),
                reconcile_after: Duration::from_millis(reader.parsed("INGEST_RECONCILE_AFTER_MS")),
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
                requests_per_sec_per_ip: reader.parsed("SPACES_REQUESTS_PER_SEC_PER_IP"),
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
                subscription_check_interval: reader.parsed::<Span>("SUBSCRIPTION_CHECK_INTERVAL").0,
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
        let fields = &settings.facebook.webhook_fields;
        if fields.is_empty() {
            reader
                .problems
                .push("FACEBOOK_WEBHOOK_FIELDS must name at least one field (`messages`)".into());
        }
        for field in fields {
            if !field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                reader.problems.push(format!(
                    "FACEBOOK_WEBHOOK_FIELDS: {field:?} is not a webhook field name (lower-case letters and `_`, comma separated)"
                ));
            }
        }
        if settings.scheduler.subscription_check_interval.is_zero() {
            reader
                .problems
                .push("SUBSCRIPTION_CHECK_INTERVAL must be at least 1s".into());
        }
        if settings.ingest.max_in_flight == 0 {
            reader
                .problems
                .push("INGEST_MAX_IN_FLIGHT must be at least 1".into());
        }
        if settings.ingest.max_connections == 0 {
            reader
                .problems
                .push("INGEST_MAX_CONNECTIONS must be at least 1".into());
        }
        if settings.ingest.body_budget_bytes < 2 * settings.ingest.body_limit_bytes {
            reader.problems.push(
                "INGEST_BODY_BUDGET_BYTES must be at least twice INGEST_BODY_LIMIT_BYTES: bodies larger than 64 KiB share half the budget, and the largest must fit".into(),
            );
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
        if !matches!(reader.text("LOG_FORMAT").as_str(), "text" | "json") {
            reader
                .problems
                .push("LOG_FORMAT must be text or json".into());
        }
        (settings, reader.problems.into_lines(), reader.read)
    }
}

#[cfg(test)]
mod tests;
