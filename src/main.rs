//! The `fbsync` command line: one subcommand per role, plus the ops tools.
//!
//! Everything here is wiring: it reads the configuration, refuses to start with one clear line
//! per problem, and hands over to the role's library. Every Rust allocation of every role goes
//! through mimalloc (the global allocator below), not glibc's malloc.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use fbsync_shared::config::{OwnerSettings, Problems, Settings, StoreLocation, WebhookSecrets};
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::queue::{Publisher, Topology};
use fbsync_shared::telemetry;
use tokio_util::sync::CancellationToken;

mod commands;

use commands::{backup, check, dlq, pages, poll};

/// mimalloc for every role: cheaper per allocation than glibc's malloc under ingest's load (see
/// the workspace's Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fbsync",
    version,
    about = "Facebook Page webhooks to durable, de-duplicated object storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run ingest, a worker and the scheduler in one process, for a single machine.
    Up,
    /// Run the HTTP service: webhook intake, /healthz, /readyz, /metrics.
    Ingest,
    /// Run a worker: stage events, flush conversations, refresh Page metadata, poll the Graph
    /// API.
    Worker,
    /// Run the scheduler: one poll job per active Page and period (POLL_SCHEDULE), spread over
    /// POLL_SPREAD.
    Scheduler {
        /// Plan one round for the current period now (no spread) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Enqueue poll jobs now: the Page's metadata and conversations from the Graph API.
    Poll {
        /// Only this Page; every active Page otherwise.
        #[arg(long)]
        page_id: Option<String>,
        /// Read the whole history, not only what changed since the last complete poll.
        #[arg(long)]
        backfill: bool,
        /// Wait for the polls to finish, with a progress line (exit 1 if one failed).
        #[arg(long)]
        wait: bool,
    },
    /// Manage the Page registry.
    #[command(subcommand)]
    Pages(PagesCommand),
    /// Inspect, replay and purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Check the configuration, the broker, the database, the object store and every Page's
    /// token: one line per check (exit 0 all pass, 1 one failed, 2 bad configuration).
    Check,
    /// Write a consistent snapshot of the SQLite database while the pipeline runs.
    Backup {
        /// Where to write it (a new file).
        #[arg(long)]
        to: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum PagesCommand {
    /// Register a Page (or replace its owner and token) without the OAuth flow.
    Add {
        /// The Facebook Page id (digits).
        #[arg(long)]
        page_id: String,
        /// The owner's user UUID: objects go under `users/<uuid>/`.
        #[arg(long)]
        user_uuid: String,
        /// The Page access token (stored encrypted). Prefer FBSYNC_PAGE_TOKEN over the command
        /// line, which other users of the machine can see.
        #[arg(long, env = "FBSYNC_PAGE_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// List registered Pages: status, staged backlog, last flush, last error, onboarding steps
    /// (never a token).
    List {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a Page from the registry (its stored objects stay; events still staged for it go
    /// to the dead-letter queue as `page_removed`, to replay once it is added again).
    Remove {
        #[arg(long)]
        page_id: String,
    },
    /// Flush conversations again that were set aside because their stored object could not be
    /// read (not a JSON array), once the object is fixed or deleted.
    Requeue {
        #[arg(long)]
        page_id: String,
        /// Only this conversation (the person's page-scoped id); all of the Page's otherwise.
        #[arg(long)]
        user_psid: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (settings, mut problems) = Settings::from_env_with_problems();
    if !problems.is_empty() {
        // Every mistake in one run: what the command's roles require too, checked on the
        // settings as far as they parsed.
        problems.extend(requirement_problems(&cli.command, &settings));
        return refuse(&problems);
    }
    telemetry::init_logging(settings.json_logs);
    // Installed before any role records a metric: what a worker records while it opens (the
    // conditional-write probe's gauge) is on its /metrics page too.
    telemetry::metrics_handle();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return refuse(&[format!("could not start the async runtime: {e}")]),
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Up => run_up(settings).await,
            Command::Ingest => run_ingest(settings).await,
            Command::Worker => run_worker(settings).await,
            Command::Scheduler { once } => run_scheduler(settings, once).await,
            Command::Poll {
                page_id,
                backfill,
                wait,
            } => {
                let command = poll::PollCommand {
                    page_id,
                    backfill,
                    wait,
                };
                poll::run(settings, command).await
            }
            Command::Pages(command) => pages::run(settings, command).await,
            Command::Dlq(command) => dlq::run(settings, command).await,
            Command::Check => check::run(settings).await,
            Command::Backup { to } => backup::run(settings, &to).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints configuration problems, one per line (each once, though two roles of `up` may both
/// find it), and exits 2.
fn refuse(problems: &[String]) -> ExitCode {
    for (i, problem) in problems.iter().enumerate() {
        if !problems[..i].contains(problem) {
            eprintln!("fbsync: {problem}");
        }
    }
    ExitCode::from(2)
}

/// A role's required configuration, or exit status 2 after printing every problem.
fn required<T>(checked: Result<T, Vec<String>>) -> Result<T, ExitCode> {
    checked.map_err(|problems| refuse(&problems))
}

/// What a worker requires: the token cipher and the object store's location.
fn worker_requirements(settings: &Settings) -> Result<(TokenCipher, StoreLocation), Vec<String>> {
    let mut problems = Problems::default();
    let cipher = problems.take(settings.token_cipher());
    let store = problems.take(settings.store_location());
    let (Some(cipher), Some(store)) = (cipher, store) else {
        return Err(problems.into_lines());
    };
    Ok((cipher, store))
}

/// What `command`'s roles require and the settings lack (each role checks it again when it
/// starts): reported with the settings' own problems, so that one run names every mistake.
fn requirement_problems(command: &Command, settings: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    if matches!(command, Command::Ingest | Command::Up | Command::Check) {
        problems.extend(ingest_requirements(settings).err().unwrap_or_default());
    }
    if matches!(command, Command::Worker | Command::Up | Command::Check) {
        problems.extend(worker_requirements(settings).err().unwrap_or_default());
    }
    problems
}

/// The owner routes' settings and the cipher for their tokens, when they are configured.
type OwnerRequirements = Option<(OwnerSettings, TokenCipher)>;

/// What ingest requires: the webhook secrets, and with the owner routes configured their
/// settings and the token cipher.
fn ingest_requirements(
    settings: &Settings,
) -> Result<(WebhookSecrets, OwnerRequirements), Vec<String>> {
    let mut problems = Problems::default();
    let secrets = problems.take(settings.webhook_secrets());
    let owner = problems
        .take(settings.owner_settings())
        .and_then(|owner| match owner {
            None => Some(None),
            Some(owner) => problems
                .take(settings.token_cipher())
                .map(|cipher| Some((owner, cipher))),
        });
    let (Some(secrets), Some(owner)) = (secrets, owner) else {
        return Err(problems.into_lines());
    };
    Ok((secrets, owner))
}

/// Cancels the token on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        trigger.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        // Cancelled before anything is logged: the shutdown never waits on a log line.
        trigger.cancel();
        tracing::info!("shutting down");
    });
    token
}

async fn run_ingest(settings: Settings) -> anyhow::Result<ExitCode> {
    let (secrets, owner) = match required(ingest_requirements(&settings)) {
        Ok(required) => required,
        Err(code) => return Ok(code),
    };
    let shutdown = shutdown_on_signal();
    serve_ingest(&settings, secrets, owner, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_worker(settings: Settings) -> anyhow::Result<ExitCode> {
    let (cipher, store) = match required(worker_requirements(&settings)) {
        Ok(required) => required,
        Err(code) => return Ok(code),
    };
    let shutdown = shutdown_on_signal();
    let worker = fbsync_worker::Worker::open(&settings, cipher, &store, &shutdown).await?;
    if let Some(addr) = settings.worker.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on WORKER_METRICS_ADDR={addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "worker metrics listening");
        tokio::spawn(fbsync_worker::serve_metrics(
            listener,
            telemetry::metrics_handle(),
            worker.health.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!("worker started");
    worker.run(shutdown).await;
    tracing::info!("worker stopped");
    Ok(ExitCode::SUCCESS)
}

/// Plans poll rounds until shutdown, or one round with `once`.
async fn run_scheduler(settings: Settings, once: bool) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_on_signal();
    let scheduler = fbsync_scheduler::Scheduler::open(&settings, &shutdown).await?;
    if !once {
        tracing::info!(schedule = %settings.scheduler.schedule.text, "scheduler started");
        scheduler.run(shutdown).await;
        tracing::info!("scheduler stopped");
        return Ok(ExitCode::SUCCESS);
    }
    if !scheduler
        .publisher
        .wait_ready(std::time::Duration::from_secs(10))
        .await
    {
        shutdown.cancel();
        anyhow::bail!("the broker is not reachable (AMQP_URL)");
    }
    let report = scheduler.plan_once().await?;
    shutdown.cancel();
    let period = chrono::DateTime::from_timestamp_millis(report.period_ms)
        .map_or_else(|| report.period_ms.to_string(), |t| t.to_rfc3339());
    println!(
        "period {period}: enqueued {} poll jobs; {} already claimed by another scheduler; {} not confirmed",
        report.enqueued, report.claimed_elsewhere, report.failed
    );
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Ingest, a worker and the scheduler in one process.
async fn run_up(settings: Settings) -> anyhow::Result<ExitCode> {
    let mut problems = Problems::default();
    let ingest = problems.take(ingest_requirements(&settings));
    let worker = problems.take(worker_requirements(&settings));
    let (Some((secrets, owner)), Some((cipher, store))) = (ingest, worker) else {
        return Ok(refuse(&problems.into_lines()));
    };
    let shutdown = shutdown_on_signal();
    let worker = fbsync_worker::Worker::open(&settings, cipher, &store, &shutdown).await?;
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    let scheduler = fbsync_scheduler::Scheduler::open(&settings, &shutdown).await?;
    let scheduler_task = tokio::spawn(scheduler.run(shutdown.clone()));
    serve_ingest(&settings, secrets, owner, shutdown.clone()).await?;
    shutdown.cancel();
    worker_task.await?;
    scheduler_task.await?;
    Ok(ExitCode::SUCCESS)
}

/// Serves ingest on INGEST_ADDR until `shutdown` (with the owner routes when configured).
async fn serve_ingest(
    settings: &Settings,
    secrets: WebhookSecrets,
    owner: OwnerRequirements,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = telemetry::metrics_handle();
    let publisher = Publisher::start(
        settings.broker.amqp_url.clone(),
        Topology::new(&settings.broker.queue_prefix),
        "fbsync-ingest".into(),
        shutdown.clone(),
    );
    // Start answering once the broker is there (or after a grace period, answering 503 until
    // it is), so a fresh start does not turn Facebook's first deliveries away.
    // A shutdown during that grace period stops it there, before anything listens.
    let ready = tokio::select! {
        ready = publisher.wait_ready(std::time::Duration::from_secs(10)) => ready,
        _ = shutdown.cancelled() => return Ok(()),
    };
    if !ready {
        tracing::warn!("the broker is not reachable yet; deliveries are answered 503 until it is");
    }
    let mut state = fbsync_ingest::IngestState::new(settings, secrets, publisher.clone(), metrics);
    match owner {
        Some((owner, cipher)) => {
            let db = fbsync_shared::storage::db::Database::connect(&settings.database_url).await?;
            state = state.with_owner(fbsync_ingest::owner::OwnerState::new(
                owner,
                db,
                cipher,
                Topology::new(&settings.broker.queue_prefix),
                publisher,
                settings.ingest.publish_timeout,
            ));
            tracing::info!("owner routes served (Shopify OAuth, Facebook Login, /connect)");
        }
        None => tracing::info!(
            "owner routes not served: set the Shopify and Facebook Login variables to serve them"
        ),
    }
    // Down (or unreachable) for longer than the threshold: the window Facebook could not deliver
    // in is reconciled with the first delivery taken again.
    let alive = settings
        .storage
        .data_dir
        .join(fbsync_ingest::refusal_window::ALIVE_FILE);
    if let Some(last_alive) = fbsync_ingest::refusal_window::unreachable_since(
        &alive,
        settings.ingest.reconcile_after,
        fbsync_shared::now_ms(),
    ) {
        tracing::warn!(
            last_alive_ms = last_alive,
            "ingest was down for a while; what Facebook could not deliver meanwhile will be polled back"
        );
        state.refusals.refused(last_alive);
    }
    if fbsync_shared::private_files::create_dir_all(&settings.storage.data_dir).is_ok() {
        tokio::spawn(fbsync_ingest::refusal_window::keep_alive(
            alive,
            shutdown.clone(),
        ));
    }
    let state = Arc::new(state);
    let listener = tokio::net::TcpListener::bind(settings.ingest.addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen on INGEST_ADDR={}: {e}", settings.ingest.addr)
        })?;
    let metrics_addr = settings.ingest.metrics_addr;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on INGEST_METRICS_ADDR={metrics_addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    tracing::info!(addr = %metrics_listener.local_addr()?, "ingest metrics listening");
    tokio::spawn(fbsync_ingest::serve_metrics(
        metrics_listener,
        state.clone(),
        shutdown.clone(),
    ));
    fbsync_ingest::run(listener, state, shutdown).await?;
    Ok(())
}
