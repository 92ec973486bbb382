//! The one list of the variables fbsync reads, with their defaults and who reads them.
//! Parsing takes defaults from here, and tests hold `.env.example` and the README's
//! configuration table to it.

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

/// Every variable fbsync reads (besides `RUST_LOG`, the log filter, `NO_COLOR`, which turns the
/// text logs' colour off on a terminal, and `FBSYNC_PAGE_TOKEN`, `pages add`'s token).
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
        "FACEBOOK_WEBHOOK_FIELDS",
        Some(
            "messages,message_echoes,message_edits,message_reactions,message_deliveries,message_reads,messaging_postbacks,messaging_referrals,messaging_optins,messaging_handovers,standby,messaging_policy_enforcement,messaging_account_linking,messaging_feedback,send_cart,name,category",
        ),
        "worker, up (the fields a Page is subscribed to when it is connected)",
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
    var(
        "SPACES_OBJECT_PUTS_PER_5MIN",
        Some("0"),
        "worker, up, check",
    ),
    var(
        "SPACES_OBJECT_PUT_WINDOW_SECS",
        Some("300"),
        "worker, up, check",
    ),
    var(
        "SPACES_CONDITIONAL_WRITES",
        Some("auto"),
        "worker, up, check",
    ),
    var("SPACES_WRITES_PER_SEC", Some("300"), "worker, up, check"),
    var("SPACES_OPS_PER_SEC", Some("500"), "worker, up, check"),
    var(
        "SPACES_REQUESTS_PER_SEC_PER_IP",
        Some("1500"),
        "worker, up, check",
    ),
    var("INGEST_ADDR", Some("0.0.0.0:5000"), "ingest, up"),
    var("INGEST_METRICS_ADDR", Some("127.0.0.1:5001"), "ingest, up"),
    var("INGEST_BODY_LIMIT_BYTES", Some("1048576"), "ingest, up"),
    var("INGEST_PUBLISH_TIMEOUT_MS", Some("3000"), "ingest, up"),
    var("INGEST_MAX_IN_FLIGHT", Some("1024"), "ingest, up"),
    var("INGEST_BODY_BUDGET_BYTES", Some("67108864"), "ingest, up"),
    var("INGEST_MAX_CONNECTIONS", Some("10000"), "ingest, up"),
    var("INGEST_READ_TIMEOUT_MS", Some("10000"), "ingest, up"),
    var(
        "INGEST_RECONCILE_AFTER_MS",
        Some("60000"),
        "ingest, up (a window of refused deliveries this long is polled back)",
    ),
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
        "SUBSCRIPTION_CHECK_INTERVAL",
        Some("15m"),
        "scheduler, up (each Page's webhook subscription checked this often)",
    ),
    var(
        "LOG_FORMAT",
        Some("text"),
        "every role (json for JSON lines)",
    ),
];
