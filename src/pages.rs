//! `fbsync pages add | list | remove`: the Page registry from the command line.

use std::process::ExitCode;

use fbsync_shared::config::{Role, Settings};
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::db::{Database, PageRow};
use fbsync_shared::now_ms;
use secrecy::{ExposeSecret, SecretString};

use crate::{PagesCommand, check, refuse};

pub async fn run(settings: Settings, command: PagesCommand) -> anyhow::Result<ExitCode> {
    if let Err(code) = check(&settings, &[Role::Registry]) {
        return Ok(code);
    }
    let db = Database::connect(&settings.database_url).await?;
    let code = match command {
        PagesCommand::Add {
            page_id,
            user_uuid,
            token,
        } => {
            let mut problems = Vec::new();
            if page_id.is_empty() || !page_id.chars().all(|c| c.is_ascii_digit()) {
                problems.push(format!(
                    "--page-id {page_id:?} is not a Facebook Page id (digits only)"
                ));
            }
            if uuid::Uuid::parse_str(&user_uuid).is_err() {
                problems.push(format!("--user-uuid {user_uuid:?} is not a UUID"));
            }
            let token = SecretString::from(token);
            if token.expose_secret().trim().is_empty() {
                problems.push("--token is empty".to_string());
            }
            if !problems.is_empty() {
                return Ok(refuse(&problems));
            }
            let key = settings
                .token_encryption_key
                .as_ref()
                .expect("checked by Role::Registry");
            let cipher = TokenCipher::from_base64(key)?;
            let sealed = cipher.seal(&page_id, &token);
            db.upsert_page(&page_id, &user_uuid.to_lowercase(), sealed, now_ms())
                .await?;
            println!(
                "page {page_id} registered for user {}",
                user_uuid.to_lowercase()
            );
            ExitCode::SUCCESS
        }
        PagesCommand::List { json } => {
            let pages = db.list_pages().await?;
            if json {
                for page in &pages {
                    println!("{}", page_json(page));
                }
            } else {
                print_table(&pages);
            }
            ExitCode::SUCCESS
        }
        PagesCommand::Remove { page_id } => {
            if db.remove_page(&page_id).await? {
                println!("page {page_id} removed (its stored objects stay)");
                ExitCode::SUCCESS
            } else {
                eprintln!("fbsync: page {page_id} is not registered");
                ExitCode::from(1)
            }
        }
    };
    db.close().await;
    Ok(code)
}

fn page_json(page: &PageRow) -> serde_json::Value {
    serde_json::json!({
        "page_id": page.page_id,
        "user_uuid": page.user_uuid,
        "status": page.status,
        "staged": page.staged,
        "last_event_ms": page.last_event_ms,
        "last_flush_ms": page.last_flush_ms,
        "last_error_ms": page.last_error_ms,
        "last_error": page.last_error,
    })
}

fn print_table(pages: &[PageRow]) {
    if pages.is_empty() {
        println!("no Pages registered (add one with `fbsync pages add`)");
        return;
    }
    println!(
        "{:<20} {:<36} {:<13} {:>7} {:<20} {:<20} LAST ERROR",
        "PAGE", "USER", "STATUS", "STAGED", "LAST EVENT", "LAST FLUSH"
    );
    for page in pages {
        println!(
            "{:<20} {:<36} {:<13} {:>7} {:<20} {:<20} {}",
            page.page_id,
            page.user_uuid,
            page.status,
            page.staged,
            format_time(page.last_event_ms),
            format_time(page.last_flush_ms),
            page.last_error.as_deref().unwrap_or("-"),
        );
    }
}

fn format_time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "-".to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
}
