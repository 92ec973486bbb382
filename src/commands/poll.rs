//! `fbsync poll`: enqueue poll jobs now, for one Page or every active one, and with `--wait`
//! follow them to the end with a progress line.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use fbsync_shared::config::Settings;
use fbsync_shared::ids::PageId;
use fbsync_shared::jobs::{Job, PollRequest};
use fbsync_shared::now_ms;
use fbsync_shared::queue::{Publisher, Topology};
use fbsync_shared::storage::db::{Database, PageStatus};
use tokio_util::sync::CancellationToken;

use crate::refuse;

/// How a dead-lettered poll's error starts on its Page (see the worker's poll job).
const POLL_FAILED: &str = "poll failed:";

/// Jobs published per confirm round.
const PUBLISH_BATCH: usize = 500;

/// What `fbsync poll` was asked.
pub struct PollCommand {
    /// One Page, or every active one.
    pub page_id: Option<String>,
    /// Read the whole history.
    pub backfill: bool,
    /// Follow the jobs to the end.
    pub wait: bool,
}

pub async fn run(settings: Settings, command: PollCommand) -> anyhow::Result<ExitCode> {
    let page_id = match command.page_id.as_deref().map(PageId::parse).transpose() {
        Ok(page_id) => page_id,
        Err(e) => return Ok(refuse(&[format!("--page-id: {e}")])),
    };
    let db = Database::connect(&settings.database_url).await?;
    let pages = match &page_id {
        Some(page_id) => match db.registry().page(page_id).await? {
            None => {
                eprintln!("page {page_id} is not registered (see `fbsync pages list`)");
                return Ok(ExitCode::FAILURE);
            }
            Some(page) if page.status == PageStatus::NeedsReauth => {
                eprintln!(
                    "page {page_id} needs re-authorisation (its token was rejected): connect it again, then poll"
                );
                return Ok(ExitCode::FAILURE);
            }
            Some(_) => vec![page_id.clone()],
        },
        None => db.polls().active_pages().await?,
    };
    let skipped = if page_id.is_none() {
        db.polls().pages_needing_reauth().await?.len()
    } else {
        0
    };
    if pages.is_empty() {
        println!("no active Pages to poll ({skipped} need re-authorisation)");
        return Ok(ExitCode::SUCCESS);
    }

    let shutdown = CancellationToken::new();
    let topology = Topology::new(&settings.broker.queue_prefix);
    let publisher = Publisher::start(
        settings.broker.amqp_url.clone(),
        topology.clone(),
        "fbsync-poll".into(),
        shutdown.clone(),
    );
    if !publisher.wait_ready(Duration::from_secs(10)).await {
        shutdown.cancel();
        anyhow::bail!("the broker is not reachable (AMQP_URL)");
    }
    let requested_at_ms = now_ms();
    let jobs: Vec<_> = pages
        .iter()
        .map(|page_id| {
            topology.job(&Job::Poll(PollRequest {
                page_id: page_id.as_str().to_string(),
                backfill: command.backfill,
                requested_by: "operator".into(),
                requested_at_ms,
                since_ms: None,
            }))
        })
        .collect();
    for batch in jobs.chunks(PUBLISH_BATCH) {
        if let Err(e) = publisher.publish_all(batch, Duration::from_secs(10)).await {
            shutdown.cancel();
            anyhow::bail!("poll jobs not confirmed by the broker: {e}");
        }
    }
    shutdown.cancel();
    let what = if command.backfill { "backfill" } else { "poll" };
    println!(
        "enqueued {} {what} job{} ({skipped} Page{} skipped: need re-authorisation)",
        jobs.len(),
        plural(jobs.len()),
        plural(skipped),
    );
    if !command.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let failed = follow(&db, &pages, requested_at_ms).await?;
    db.close().await;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Follows the Pages' polls until each has completed or failed since `requested_at_ms`,
/// with a progress line; returns how many failed.
async fn follow(db: &Database, pages: &[PageId], requested_at_ms: i64) -> anyhow::Result<usize> {
    let wanted: HashSet<&str> = pages.iter().map(PageId::as_str).collect();
    let terminal = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let mut last_print = std::time::Instant::now();
    loop {
        let (mut done, mut failed, mut found, mut new) = (0, 0, 0, 0);
        let mut failures = Vec::new();
        for state in db.polls().poll_states().await? {
            if !wanted.contains(state.page_id.as_str()) {
                continue;
            }
            if state
                .last_complete_end_ms
                .is_some_and(|t| t >= requested_at_ms)
            {
                done += 1;
                found += state.messages_found;
                new += state.messages_new;
            } else if state.last_error_ms.is_some_and(|t| t >= requested_at_ms)
                && state
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with(POLL_FAILED))
            {
                failed += 1;
                failures.push(format!(
                    "page {}: {}",
                    state.page_id,
                    state.last_error.unwrap_or_default()
                ));
            } else if state.started_at_ms.is_some() {
                found += state.messages_found;
                new += state.messages_new;
            }
        }
        let line = format!(
            "polled {done}/{} Pages, {failed} failed; messages found {found}, new {new}",
            pages.len()
        );
        let finished = done + failed >= pages.len();
        if terminal {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if line != last_line && (finished || last_print.elapsed() > Duration::from_secs(5)) {
            eprintln!("{line}");
            last_print = std::time::Instant::now();
        }
        last_line = line;
        if finished {
            if terminal {
                eprintln!();
            }
            for failure in &failures {
                eprintln!("{failure}");
            }
            if failed > 0 {
                eprintln!("see `fbsync dlq list --kind poll` for the failed jobs");
            }
            return Ok(failed);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
