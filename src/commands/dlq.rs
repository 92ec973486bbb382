//! `fbsync dlq list | replay | purge`: inspect the dead-letter queue and act on it.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use fbsync_shared::config::{Settings, Span};
use fbsync_shared::ids::PageId;
use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::Topology;
use fbsync_worker::dead_letter::DeadReason;
use fbsync_worker::dead_letter::operator_session::{DeadLetter, DlqFilter, DlqSession};

use crate::refuse;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead letters: kind, page, reason, attempts, age.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to the queue they came from (once the cause is fixed).
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Say what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Say what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
pub struct FilterArgs {
    /// Only this job kind: conversation, page_change, poll or onboard.
    #[arg(long)]
    kind: Option<String>,
    /// Only this Page.
    #[arg(long)]
    page_id: Option<String>,
    /// Only this reason: malformed, unknown_page, token_error, attempts_exhausted, graph_error,
    /// delivery_limit, page_removed.
    #[arg(long)]
    reason: Option<String>,
    /// Only letters that failed at most this long ago (30s, 10m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// At most this many letters.
    #[arg(long)]
    limit: Option<usize>,
}

impl FilterArgs {
    fn parse(self) -> Result<DlqFilter, Vec<String>> {
        let mut problems = Vec::new();
        let kind = self.kind.as_deref().and_then(|name| {
            let kind = JobKind::parse(name);
            if kind.is_none() {
                problems.push(format!(
                    "--kind {name:?} is not a job kind (conversation, page_change, poll, onboard)"
                ));
            }
            kind
        });
        let reason = self.reason.as_deref().and_then(|text| {
            let reason = DeadReason::parse(text);
            if reason.is_none() {
                let known: Vec<&str> = DeadReason::all().map(DeadReason::as_str).collect();
                problems.push(format!(
                    "--reason {text:?} is not a reason ({})",
                    known.join(", ")
                ));
            }
            reason
        });
        let page_id = self
            .page_id
            .as_deref()
            .and_then(|text| match PageId::parse(text) {
                Ok(page_id) => Some(page_id),
                Err(e) => {
                    problems.push(format!("--page-id: {e}"));
                    None
                }
            });
        let since = self
            .since
            .as_deref()
            .and_then(|text| match text.parse::<Span>() {
                Ok(Span(age)) => Some(age),
                Err(e) => {
                    problems.push(format!("--since {e}"));
                    None
                }
            });
        if problems.is_empty() {
            Ok(DlqFilter {
                kind,
                page_id,
                reason,
                since,
                limit: self.limit,
            })
        } else {
            Err(problems)
        }
    }
}

pub async fn run(settings: Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(&settings.broker.queue_prefix);
    let url = &settings.broker.amqp_url;
    let (filter, action) = match command {
        DlqCommand::List { filter, json } => (filter, Action::List { json }),
        DlqCommand::Replay { filter, dry_run } => (filter, Action::Replay { dry_run }),
        DlqCommand::Purge { filter, dry_run } => (filter, Action::Purge { dry_run }),
    };
    let filter = match filter.parse() {
        Ok(filter) => filter,
        Err(problems) => return Ok(refuse(&problems)),
    };
    let session = DlqSession::open(url, &topology, filter)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot read the dead-letter queue {}: {e}", topology.dead())
        })?;
    let total = session.total();
    let now = session.now();
    match action {
        Action::List { json: true } => {
            session
                .walk(|letter| println!("{}", letter.to_json(now)))
                .await?;
        }
        Action::List { json: false } => {
            let mut table = LetterTable::default();
            let matched = session.walk(|letter| table.row(letter, now)).await?;
            table.finish(matched, total);
        }
        Action::Replay { dry_run: true } => {
            let matched = session.walk(|_| {}).await?;
            println!("would replay {matched} of {total} dead letters");
        }
        Action::Replay { dry_run: false } => {
            let interactive = std::io::stderr().is_terminal();
            let report = session
                .replay(|done, _| {
                    if interactive {
                        eprint!("\rreplaying {done}/{total}");
                        let _ = std::io::stderr().flush();
                    }
                })
                .await?;
            if interactive {
                eprintln!();
            }
            println!("replayed {}", report.replayed);
            if !report.unroutable.is_empty() {
                println!(
                    "{} left in the dead-letter queue: their queue does not exist (ids: {})",
                    report.unroutable.len(),
                    report.unroutable.join(", ")
                );
            }
            if report.refused > 0 {
                println!(
                    "{} left in the dead-letter queue: the broker refused their copies; try again",
                    report.refused
                );
            }
            if !report.unroutable.is_empty() || report.refused > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Action::Purge { dry_run: true } => {
            let matched = session.walk(|_| {}).await?;
            println!("would purge {matched} of {total} dead letters");
        }
        Action::Purge { dry_run: false } => {
            let purged = session.purge().await?;
            println!("purged {purged}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

enum Action {
    List { json: bool },
    Replay { dry_run: bool },
    Purge { dry_run: bool },
}

/// The `dlq list` table, printed a row at a time as letters are read.
#[derive(Default)]
struct LetterTable {
    /// The header is printed before the first row.
    started: bool,
}

impl LetterTable {
    fn row(&mut self, letter: &DeadLetter, now: i64) {
        if !self.started {
            println!(
                "{:<12} {:<20} {:<19} {:>8} {:>8}  ERROR",
                "KIND", "PAGE", "REASON", "ATTEMPTS", "AGE"
            );
            self.started = true;
        }
        let error: String = letter.info.error.chars().take(80).collect();
        println!(
            "{:<12} {:<20} {:<19} {:>8} {:>8}  {}",
            letter.kind(),
            letter.page_id().unwrap_or("-"),
            letter.info.reason,
            letter.info.attempts,
            format_age(letter.age_secs(now)),
            error
        );
    }

    fn finish(self, matched: usize, total: u32) {
        if matched == 0 {
            println!("no dead letters match ({total} in the queue)");
        } else {
            println!("{matched} of {total} dead letters");
        }
    }
}

fn format_age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
