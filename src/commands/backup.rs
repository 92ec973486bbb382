//! `fbsync backup --to PATH`: a consistent snapshot of the SQLite database, taken while the
//! pipeline runs (tokens stay sealed in it). PostgreSQL is pg_dump's job.
//!
//! A path it cannot write to is bad input (one line, exit 2), found before the database is
//! opened; a snapshot that fails once started is one line and exit 1.

use std::path::Path;
use std::process::ExitCode;

use fbsync_shared::config::Settings;
use fbsync_shared::storage::db::{Backend, Database};

use crate::refuse;

pub async fn run(settings: Settings, to: &Path) -> anyhow::Result<ExitCode> {
    if let Some(problem) = target_problem(to) {
        return Ok(refuse(&[problem]));
    }
    let database = Database::open(&settings.database_url).await?;
    if database.backend == Backend::Postgres {
        database.close().await;
        return Ok(refuse(&[
            "DATABASE_URL is PostgreSQL: back it up with `pg_dump` (see the README)".to_string(),
        ]));
    }
    let written = database.backup_to(to).await;
    database.close().await;
    if let Err(e) = written {
        eprintln!("fbsync: the backup to {} failed: {e}", to.display());
        return Ok(ExitCode::FAILURE);
    }
    println!("backup written to {}", to.display());
    Ok(ExitCode::SUCCESS)
}

/// Why `to` cannot take a new snapshot, if it cannot: it exists (a backup never overwrites), or
/// its folder does not exist or is not a folder.
fn target_problem(to: &Path) -> Option<String> {
    if to.exists() {
        return Some(format!(
            "--to {}: the file exists; choose a new path (a backup never overwrites)",
            to.display()
        ));
    }
    let folder = match to.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Some(format!(
            "--to {}: the folder {} does not exist; create it first",
            to.display(),
            folder.display()
        ));
    }
    None
}
