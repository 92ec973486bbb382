//! Unit tests of the configuration: defaults, every problem at once, and the variable list
//! held to `.env.example` and the README.

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
    // DigitalOcean's limits page as last edited 13 January 2026 (read 2026-12-04).
    assert_eq!(settings.storage.object_puts_per_5min, 0);
    assert_eq!(settings.storage.writes_per_sec, 300);
    assert_eq!(settings.storage.ops_per_sec, 500);
    assert_eq!(settings.storage.requests_per_sec_per_ip, 1500);
    assert_eq!(settings.storage.conditional_writes, ConditionalWrites::Auto);
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
fn conditional_writes_are_auto_required_or_off_and_anything_else_is_refused() {
    for (text, mode) in [
        ("auto", ConditionalWrites::Auto),
        ("Required", ConditionalWrites::Required),
        ("off", ConditionalWrites::Off),
        ("true", ConditionalWrites::Auto),
        ("false", ConditionalWrites::Off),
    ] {
        let settings =
            Settings::from_map(&vars(&[("SPACES_CONDITIONAL_WRITES", text)])).expect("parses");
        assert_eq!(settings.storage.conditional_writes, mode, "{text}");
    }
    let err = Settings::from_map(&vars(&[("SPACES_CONDITIONAL_WRITES", "sometimes")]))
        .expect_err("refused");
    assert!(
        err.0[0].contains("SPACES_CONDITIONAL_WRITES") && err.0[0].contains("auto, required, off"),
        "{err:?}"
    );
}

#[test]
fn an_unknown_log_format_is_refused() {
    let err = Settings::from_map(&vars(&[("LOG_FORMAT", "xml")])).expect_err("refused");
    assert_eq!(err.0, ["LOG_FORMAT must be text or json"]);
    for format in ["text", "json"] {
        Settings::from_map(&vars(&[("LOG_FORMAT", format)])).expect(format);
    }
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
fn a_body_budget_that_cannot_hold_two_of_the_largest_bodies_is_refused() {
    let err = Settings::from_map(&vars(&[
        ("INGEST_BODY_LIMIT_BYTES", "1048576"),
        ("INGEST_BODY_BUDGET_BYTES", "2097151"),
    ]))
    .expect_err("too small a budget");
    assert_eq!(err.0.len(), 1, "{err}");
    assert!(err.0[0].starts_with("INGEST_BODY_BUDGET_BYTES must be at least twice"));
    let settings = Settings::from_map(&vars(&[("INGEST_BODY_BUDGET_BYTES", "2097152")]))
        .expect("twice the limit is enough");
    assert_eq!(settings.ingest.body_budget_bytes, 2 * 1048576);
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
    let (_, problems, read) = Settings::parse(&vars(&[]));
    assert!(
        problems.is_empty(),
        "every declared default parses: {problems:?}"
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
    // The shape this setting takes, not the parser's "5 to 7 fields".
    let problems = Settings::from_map(&vars(&[("POLL_SCHEDULE", "0 0 * * * * * *")]))
        .expect_err("refused")
        .0;
    assert!(
        problems[0].contains("5 fields") && problems[0].contains("6 with seconds first"),
        "{problems:?}"
    );
    assert!(!problems[0].contains("7"), "{problems:?}");
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
    let settings =
        Settings::from_map(&vars(&[("SPACES_ENDPOINT", "http://127.0.0.1:1")])).expect("parses");
    let problems = settings.store_location().expect_err("incomplete");
    assert_eq!(problems.len(), 3, "{problems:?}");
    let local = Settings::from_map(&vars(&[])).expect("parses");
    assert!(matches!(
        local.store_location(),
        Ok(StoreLocation::Local(_))
    ));
}

#[test]
fn the_webhook_fields_default_to_the_one_list_and_a_bad_name_is_refused() {
    let settings = Settings::from_map(&vars(&[])).expect("defaults");
    assert_eq!(
        settings.facebook.webhook_fields,
        crate::facebook::login::SUBSCRIBED_FIELDS.map(String::from),
        "FACEBOOK_WEBHOOK_FIELDS' default is the list onboarding subscribes"
    );
    let custom = Settings::from_map(&vars(&[(
        "FACEBOOK_WEBHOOK_FIELDS",
        "messages, message_echoes",
    )]))
    .expect("a custom list");
    assert_eq!(
        custom.facebook.webhook_fields,
        ["messages", "message_echoes"]
    );
    let bad = Settings::from_map(&vars(&[("FACEBOOK_WEBHOOK_FIELDS", "messages,Bad Field")]));
    let problems = bad.expect_err("refused").to_string();
    assert!(problems.contains("\"Bad Field\""), "{problems}");
}
