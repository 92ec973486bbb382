//! The monitoring files in `deploy/`: every metric the alert rules and the Grafana dashboard
//! name is one fbsync exports (`shared/src/telemetry.rs`), the dashboard shows every one of
//! them, and `promtool` accepts the rules.

use std::collections::BTreeSet;
use std::process::Command;

/// A file of the repository, read when the test runs.
fn read(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {full}: {e}"))
}

/// The metric names `shared/src/telemetry.rs` declares: the literal of every
/// `pub const NAME: &str = "fbsync_...";`.
fn exported_metrics() -> BTreeSet<String> {
    read("shared/src/telemetry.rs")
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("pub const ") && line.contains(": &str = \"fbsync_"))
        .map(|line| {
            let literal = line.split('"').nth(1).expect("a string literal");
            literal.to_owned()
        })
        .collect()
}

/// Every `fbsync_[a-z_]+` identifier in `text`, with a histogram's `_bucket`, `_sum` or `_count`
/// suffix removed.
fn metrics_named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("fbsync_") {
        // Part of a longer word (`xfbsync_…`) is not a metric name.
        let preceded_by_word = rest[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[start..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            let name = &tail[..len];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(name.to_owned());
        }
        rest = &tail[len..];
    }
    names
}

#[test]
fn every_metric_the_alerts_and_dashboard_use_is_one_fbsync_exports() {
    let exported = exported_metrics();
    let alerts = read("deploy/prometheus/alerts.yml");
    let dashboard = read("deploy/grafana/fbsync.json");
    // The file's every metric: a broken parse must not pass for "nothing to check".
    assert!(
        exported.len() >= 15,
        "expected telemetry.rs's metric names, found {exported:?}"
    );

    for (file, text) in [
        ("deploy/prometheus/alerts.yml", &alerts),
        ("deploy/grafana/fbsync.json", &dashboard),
    ] {
        let named = metrics_named_in(text);
        assert!(!named.is_empty(), "{file} names no fbsync metric");
        let unknown: Vec<_> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics fbsync does not export (shared/src/telemetry.rs): {unknown:?}"
        );
    }

    let on_dashboard = metrics_named_in(&dashboard);
    let missing: Vec<_> = exported.difference(&on_dashboard).collect();
    assert!(
        missing.is_empty(),
        "deploy/grafana/fbsync.json shows no panel for these metrics: {missing:?}"
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let output = match Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is not installed (CI is set): .ci/run installs it (Debian's prometheus)"
            );
            eprintln!("note: promtool is not on PATH, the alert rules are not checked");
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    assert!(
        output.status.success(),
        "promtool check rules {rules} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
