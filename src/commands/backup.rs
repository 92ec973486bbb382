//! `fbsync backup --to PATH`: a consistent snapshot of the SQLite database, taken while the
//! pipeline runs (tokens stay sealed in it). PostgreSQL is pg_dump's job.

use std::path::Path;
use std::process::ExitCode;

use fbsync_shared::config::Settings;
use fbsync_shared::storage::db::{Backend, Database};

use crate::refuse;

pub async fn run(settings: Settings, to: &Path) -> anyhow::Result<ExitCode> {
    if to.exists() {
        return Ok(refuse(&[format!(
            "--to {}: the file exists; choose a new path (a backup never overwrites)",
            to.display()
        )]));
    }
    let database = Database::open(&settings.database_url).await?;
    if database.backend == Backend::Postgres {
        database.close().await;
        return Ok(refuse(&[
            "DATABASE_URL is PostgreSQL: back it up with `pg_dump` (see the README)".to_string(),
        ]));
    }
    database.backup_to(to).await?;
    database.close().await;
    println!("backup written to {}", to.display());
    Ok(ExitCode::SUCCESS)
}
