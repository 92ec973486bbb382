//! `fbsync check`: the configuration and every dependency the roles need, one line per check
//! with what to fix. Exit status 0 when every check passes, 1 when one fails, 2 for bad
//! configuration. It writes nothing but probe objects under `_fbsync/probe/`, which it
//! deletes again, and changes no schema. It prints the store's budgets in force and whether
//! the store honours conditional writes (a store that ignores them fails the check).

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use fbsync_shared::config::{Problems, Settings};
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::facebook::graph::{GraphClient, GraphError};
use fbsync_shared::queue::{Topology, connect};
use fbsync_shared::storage::budget::StoreBudgets;
use fbsync_shared::storage::budgeted_store::{BudgetedError, BudgetedStore};
use fbsync_shared::storage::db::{Database, PageStatus, PageSummary};
use fbsync_shared::storage::object_store::{ObjectKey, PROBE_PREFIX, WriteCondition, open_store};
use fbsync_shared::storage::write_conditions::{self, Verdict};
use secrecy::ExposeSecret;

use crate::refuse;

/// Longest wait for one dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of one check.
struct Outcome {
    passed: bool,
    line: String,
}

fn pass(line: impl Into<String>) -> Outcome {
    Outcome {
        passed: true,
        line: line.into(),
    }
}

fn fail(line: impl Into<String>) -> Outcome {
    Outcome {
        passed: false,
        line: line.into(),
    }
}

pub async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    let mut problems = Problems::default();
    let secrets = problems.take(settings.webhook_secrets());
    let owner = problems.take(settings.owner_settings());
    let cipher = problems.take(settings.token_cipher());
    let store = problems.take(settings.store_location());
    let (Some(_), Some(owner), Some(cipher), Some(store)) = (secrets, owner, cipher, store) else {
        return Ok(refuse(&problems.into_lines()));
    };
    println!("ok   configuration: every required setting is present and valid");
    if owner.is_none() {
        println!("ok   owner routes: not configured (ingest serves the webhook alone)");
    } else {
        println!("ok   owner routes: Shopify OAuth and Facebook Login configured");
    }
    let mut outcomes = vec![check_broker(&settings).await];
    let database = match Database::open(&settings.database_url).await {
        Ok(database) => Some(database),
        Err(e) => {
            outcomes.push(fail(format!(
                "database: cannot connect ({e}); check DATABASE_URL and that the server runs"
            )));
            None
        }
    };
    let migrated = match &database {
        Some(database) => {
            let migrations =
                check_migrations(database, settings.database_url.expose_secret()).await;
            let passed = migrations.passed;
            outcomes.push(migrations);
            passed.then_some(database)
        }
        None => None,
    };
    // The probe's requests take the bucket's budget like every other request, and the budget
    // is kept in the database.
    let limits = StoreBudgets::for_store(&store, &settings.storage);
    outcomes.push(pass(format!("object store budgets: {}", limits.describe())));
    match migrated {
        Some(database) => {
            let store = BudgetedStore::new(open_store(&store), database.budgets(), limits);
            let round_trip = check_store(&store).await;
            let passed = round_trip.passed;
            outcomes.push(round_trip);
            if passed {
                outcomes.push(
                    check_conditional_writes(&store, settings.storage.conditional_writes).await,
                );
            }
        }
        None => outcomes.push(fail(
            "object store: not checked: the bucket's request budget is kept in the database, which is not ready",
        )),
    }
    if let Some(database) = &database {
        outcomes.extend(check_tokens(database, &cipher, &settings).await);
        database.close().await;
    }
    for outcome in &outcomes {
        let mark = if outcome.passed { "ok  " } else { "FAIL" };
        println!("{mark} {}", outcome.line);
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    if failed > 0 {
        println!("{failed} check(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn check_broker(settings: &Settings) -> Outcome {
    let topology = Topology::new(&settings.broker.queue_prefix);
    let attempt = async {
        let connection = connect(&settings.broker.amqp_url, "fbsync-check").await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        let _ = connection.close(200, "checked".into()).await;
        Ok::<_, lapin::Error>(())
    };
    match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(Ok(())) => pass(format!(
            "broker: connected and declared the topology ({}.*)",
            topology.prefix
        )),
        Ok(Err(e)) => fail(format!(
            "broker: {e}; check AMQP_URL (host, port, user, password) and that RabbitMQ runs"
        )),
        Err(_) => fail(format!(
            "broker: no answer within {CHECK_TIMEOUT:?}; check AMQP_URL and the network"
        )),
    }
}

async fn check_migrations(database: &Database, url: &str) -> Outcome {
    let shown = without_password(url);
    match database.pending_migrations().await {
        Ok(pending) if pending.is_empty() => pass(format!(
            "database: connected to {shown}, migrations current"
        )),
        Ok(pending) => fail(format!(
            "database: migrations not applied: {}; start a worker (or `fbsync pages list`) once to apply them",
            pending.join(", ")
        )),
        Err(e) => fail(format!("database: {e}")),
    }
}

/// A database URL fit to print: a password in it is replaced by `***`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_string(),
    }
}

async fn check_store(store: &BudgetedStore) -> Outcome {
    let key = ObjectKey::probe();
    let body = Bytes::from_static(b"{\"probe\":true}");
    let describe = store.describe();
    let attempt = async {
        store
            .put(&key, body.clone(), &WriteCondition::Absent)
            .await?;
        let read = store.get(&key).await?;
        store.delete(&key).await?;
        Ok::<_, BudgetedError>(read)
    };
    match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(Ok(Some(read))) if read.body == body => pass(format!(
            "object store: wrote, read and deleted a probe under {PROBE_PREFIX} ({describe})"
        )),
        Ok(Ok(_)) => fail(format!(
            "object store: the probe read back differs ({describe}); check the bucket and the endpoint"
        )),
        Ok(Err(e)) => fail(format!(
            "object store: {e} ({describe}); check SPACES_ENDPOINT, SPACES_BUCKET and the keys"
        )),
        Err(_) => fail(format!(
            "object store: no answer within {CHECK_TIMEOUT:?} ({describe})"
        )),
    }
}

/// Whether the store refuses the writes its conditions forbid: a store that accepts them fails.
async fn check_conditional_writes(
    store: &BudgetedStore,
    mode: fbsync_shared::config::ConditionalWrites,
) -> Outcome {
    let describe = store.describe();
    match tokio::time::timeout(CHECK_TIMEOUT, write_conditions::probe(store, mode)).await {
        Ok(Ok(verdict @ (Verdict::Honoured | Verdict::NotSent))) => {
            pass(format!("object store: {}", verdict.describe()))
        }
        Ok(Ok(verdict @ Verdict::Ignored(_))) => {
            fail(format!("object store: {} ({describe})", verdict.describe()))
        }
        Ok(Err(e)) => fail(format!(
            "object store: the conditional-write probe failed: {e} ({describe})"
        )),
        Err(_) => fail(format!(
            "object store: the conditional-write probe got no answer within {CHECK_TIMEOUT:?} ({describe})"
        )),
    }
}

/// One line per registered Page: its token still works (a cheap Graph API call).
async fn check_tokens(
    database: &Database,
    cipher: &TokenCipher,
    settings: &Settings,
) -> Vec<Outcome> {
    let pages = match database.registry().list_pages().await {
        Ok(pages) => pages,
        Err(e) => return vec![fail(format!("database: cannot list Pages ({e})"))],
    };
    if pages.is_empty() {
        return vec![pass("graph: no Page registered yet (nothing to check)")];
    }
    let graph = GraphClient::new(&settings.facebook.graph_url);
    let mut outcomes = Vec::with_capacity(pages.len());
    for summary in pages {
        let page_id = &summary.page_id;
        if summary.status == PageStatus::NeedsReauth {
            outcomes.push(fail(format!(
                "graph: page {page_id} needs re-authorisation (its token was rejected); connect it again"
            )));
            continue;
        }
        let token = match database.registry().page(page_id).await {
            Ok(Some(record)) => cipher.open(page_id.as_str(), &record.token_sealed),
            Ok(None) => continue,
            Err(e) => {
                outcomes.push(fail(format!("database: page {page_id}: {e}")));
                continue;
            }
        };
        let Ok(token) = token else {
            outcomes.push(fail(format!(
                "graph: page {page_id}: its stored token cannot be decrypted; is TOKEN_ENCRYPTION_KEY the one it was stored with?"
            )));
            continue;
        };
        let answer =
            tokio::time::timeout(CHECK_TIMEOUT, graph.page_metadata(page_id.as_str(), &token))
                .await;
        if let Ok(Ok(_)) = &answer {
            outcomes.push(check_subscription(&graph, &summary, &token, settings).await);
            continue;
        }
        outcomes.push(match answer {
            Ok(Ok(_)) => pass(format!("graph: page {page_id}: token valid")),
            Ok(Err(GraphError::TokenInvalid { .. })) => fail(format!(
                "graph: page {page_id}: token rejected (code 190); connect the Page again or `fbsync pages add` a new token"
            )),
            Ok(Err(e)) => fail(format!("graph: page {page_id}: {e}; check FACEBOOK_GRAPH_URL and the network")),
            Err(_) => fail(format!("graph: page {page_id}: no answer within {CHECK_TIMEOUT:?}")),
        });
    }
    outcomes
}

/// A Page whose token works: whether its webhook subscription has every field. A Page
/// connected through the owner flow must have it (the scheduler's check restores it within
/// SUBSCRIPTION_CHECK_INTERVAL); a Page an operator added is subscribed by the operator, in the
/// app's dashboard, so only its token is checked.
async fn check_subscription(
    graph: &GraphClient,
    summary: &PageSummary,
    token: &secrecy::SecretString,
    settings: &Settings,
) -> Outcome {
    let page_id = &summary.page_id;
    if summary.onboard_subscribe.is_none() {
        // Added with `pages add`: its subscription is the operator's, in the app's dashboard.
        return pass(format!("graph: page {page_id}: token valid"));
    }
    let fields = &settings.facebook.webhook_fields;
    let answer = tokio::time::timeout(
        CHECK_TIMEOUT,
        graph.is_app_subscribed(page_id, token, settings.facebook.app_id.as_deref(), fields),
    )
    .await;
    match answer {
        Ok(Ok(true)) => pass(format!(
            "graph: page {page_id}: token valid; webhooks subscribed with every field"
        )),
        Ok(Ok(false)) => fail(format!(
            "graph: page {page_id}: token valid, but its webhook subscription is lost or lacks a field of FACEBOOK_WEBHOOK_FIELDS; the scheduler subscribes it again within SUBSCRIPTION_CHECK_INTERVAL ({:?})",
            settings.scheduler.subscription_check_interval
        )),
        Ok(Err(e)) => fail(format!(
            "graph: page {page_id}: token valid; its subscription could not be read: {e}"
        )),
        Err(_) => fail(format!(
            "graph: page {page_id}: no answer within {CHECK_TIMEOUT:?} about its subscription"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn a_database_url_is_printed_without_its_password() {
        assert_eq!(
            without_password("postgres://fbsync:s3cret@db:5432/fbsync"),
            "postgres://fbsync:***@db:5432/fbsync"
        );
        assert_eq!(
            without_password("postgres://fbsync@db/fbsync"),
            "postgres://fbsync@db/fbsync"
        );
        assert_eq!(
            without_password("sqlite://./data/fbsync.db"),
            "sqlite://./data/fbsync.db"
        );
        assert_eq!(
            without_password("postgres://u:p@ss@h/d"),
            "postgres://u:***@h/d"
        );
    }
}
