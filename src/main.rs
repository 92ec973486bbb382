//! The `fbsync` command line: one subcommand per role, plus the ops tools.
//!
//! Everything here is wiring: it reads the configuration, refuses to start with one clear line
//! per problem, and hands over to the role's library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use fbsync_shared::broker::{Publisher, Topology};
use fbsync_shared::config::{Role, Settings};
use fbsync_shared::telemetry;
use tokio_util::sync::CancellationToken;

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
    /// Run the HTTP service: webhook intake, /healthz, /readyz, /metrics.
    Ingest,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => return refuse(&e.0),
    };
    telemetry::init_logging(settings.json_logs);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return refuse(&[format!("could not start the async runtime: {e}")]),
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Ingest => run_ingest(settings).await,
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

/// Prints configuration problems, one per line, and exits 2.
fn refuse(problems: &[String]) -> ExitCode {
    for problem in problems {
        eprintln!("fbsync: {problem}");
    }
    ExitCode::from(2)
}

fn check(settings: &Settings, roles: &[Role]) -> Result<(), ExitCode> {
    let mut problems: Vec<String> = roles
        .iter()
        .flat_map(|role| settings.problems_for(*role))
        .collect();
    problems.dedup();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(refuse(&problems))
    }
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
        tracing::info!("shutting down");
        trigger.cancel();
    });
    token
}

async fn run_ingest(settings: Settings) -> anyhow::Result<ExitCode> {
    if let Err(code) = check(&settings, &[Role::Ingest]) {
        return Ok(code);
    }
    let shutdown = shutdown_on_signal();
    let metrics = telemetry::metrics_handle();
    let publisher = Publisher::start(
        settings.broker.amqp_url.clone(),
        Topology::new(&settings.broker.queue_prefix),
        "fbsync-ingest".into(),
        shutdown.clone(),
    );
    let state = Arc::new(fbsync_ingest::IngestState::from_settings(
        &settings, publisher, metrics,
    )?);
    let listener = tokio::net::TcpListener::bind(settings.ingest.addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen on INGEST_ADDR={}: {e}", settings.ingest.addr)
        })?;
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    fbsync_ingest::run(listener, state, settings.ingest.body_limit_bytes, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
