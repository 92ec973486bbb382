//! `fbsync pages add | list | remove`: the Page registry from the command line (`list` shows
//! the onboarding steps of Pages that owners connected).

use std::process::ExitCode;

use fbsync_shared::config::Settings;
use fbsync_shared::ids::{PageId, Psid, UserUuid};
use fbsync_shared::now_ms;
use fbsync_shared::storage::db::{Database, PageStatus, PageSummary};
use secrecy::{ExposeSecret, SecretString};

use crate::{PagesCommand, refuse};

pub async fn run(settings: Settings, command: PagesCommand) -> anyhow::Result<ExitCode> {
    let db = Database::connect(&settings.database_url).await?;
    let code = match command {
        PagesCommand::Add {
            page_id,
            user_uuid,
            token,
        } => {
            // Only registering a Page seals a token; listing and removing need no key.
            let mut problems = Vec::new();
            let cipher = settings
                .token_cipher()
                .map_err(|key_problems| problems.extend(key_problems))
                .ok();
            let page_id = PageId::parse(&page_id)
                .map_err(|e| problems.push(format!("--page-id: {e}")))
                .ok();
            let user_uuid = UserUuid::parse(&user_uuid)
                .map_err(|e| problems.push(format!("--user-uuid: {e}")))
                .ok();
            let token = SecretString::from(token);
            if token.expose_secret().trim().is_empty() {
                problems.push("--token is empty".to_string());
            }
            let (Some(cipher), Some(page_id), Some(user_uuid)) = (cipher, page_id, user_uuid)
            else {
                return Ok(refuse(&problems));
            };
            if !problems.is_empty() {
                return Ok(refuse(&problems));
            }
            let sealed = cipher.seal(page_id.as_str(), &token);
            db.registry()
                .upsert_page(&page_id, &user_uuid, sealed, now_ms())
                .await?;
            println!("page {page_id} registered for user {user_uuid}");
            ExitCode::SUCCESS
        }
        PagesCommand::List { json } => {
            let pages = db.registry().list_pages().await?;
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
            let page_id = match PageId::parse(&page_id) {
                Ok(page_id) => page_id,
                Err(e) => return Ok(refuse(&[format!("--page-id: {e}")])),
            };
            if db.registry().remove_page(&page_id).await? {
                println!("page {page_id} removed (its stored objects stay)");
                ExitCode::SUCCESS
            } else {
                eprintln!("fbsync: page {page_id} is not registered");
                ExitCode::from(1)
            }
        }
        PagesCommand::Requeue { page_id, user_psid } => {
            let mut problems = Vec::new();
            let page_id = PageId::parse(&page_id)
                .map_err(|e| problems.push(format!("--page-id: {e}")))
                .ok();
            let user_psid = match user_psid.as_deref().map(Psid::parse) {
                Some(Ok(psid)) => Some(psid),
                Some(Err(e)) => {
                    problems.push(format!("--user-psid: {e}"));
                    None
                }
                None => None,
            };
            let Some(page_id) = page_id else {
                return Ok(refuse(&problems));
            };
            if !problems.is_empty() {
                return Ok(refuse(&problems));
            }
            let aside = db
                .conversations()
                .set_aside_conversations(Some(&page_id))
                .await?;
            let requeued = db
                .conversations()
                .requeue_set_aside(&page_id, user_psid.as_ref())
                .await?;
            for conversation in aside
                .iter()
                .filter(|c| user_psid.as_ref().is_none_or(|psid| &c.user_psid == psid))
            {
                println!(
                    "requeued {} / {} (was: {})",
                    conversation.page_id, conversation.user_psid, conversation.set_aside_reason
                );
            }
            println!("{requeued} conversation(s) of page {page_id} requeued");
            ExitCode::SUCCESS
        }
    };
    db.close().await;
    Ok(code)
}

fn page_json(page: &PageSummary) -> serde_json::Value {
    serde_json::json!({
        "page_id": page.page_id.as_str(),
        "user_uuid": page.user_uuid.as_str(),
        "status": page.status.as_str(),
        "staged": page.staged,
        "set_aside": page.set_aside,
        "last_event_ms": page.last_event_ms,
        "last_flush_ms": page.last_flush_ms,
        "last_error_ms": page.last_error_ms,
        "last_error": page.last_error,
        "last_poll_ms": page.last_poll_ms,
        "poll_started_ms": page.poll_started_ms,
        "details_unavailable": page.details_unavailable,
        "conversations_stored": page.conversations_stored,
        "onboarding": onboarding_json(page),
        "name": page.name,
        "messaging_blocked": page.messaging_blocked(),
        "subscription_checked_at_ms": page.subscription_checked_at_ms,
        "subscription_restored_at_ms": page.subscription_restored_at_ms,
        "policy_enforcement": page.policy_action.as_ref().map(|action| serde_json::json!({
            "action": action,
            "reason": page.policy_reason,
            "at_ms": page.policy_at_ms,
        })),
    })
}

/// Each onboarding step's outcome (`null` for a Page added without the connect flow).
fn onboarding_json(page: &PageSummary) -> serde_json::Value {
    let steps: serde_json::Map<String, serde_json::Value> = page
        .onboarding()
        .iter()
        .map(|(step, outcome)| (step.as_str().to_string(), serde_json::json!(outcome)))
        .collect();
    serde_json::Value::Object(steps)
}

fn print_table(pages: &[PageSummary]) {
    if pages.is_empty() {
        println!("no Pages registered (add one with `fbsync pages add`)");
        return;
    }
    println!(
        "{:<20} {:<36} {:<13} {:>13} {:>7} {:>9} {:<20} {:<20} {:<20} {:>9} LAST ERROR",
        "PAGE",
        "USER",
        "STATUS",
        "CONVERSATIONS",
        "STAGED",
        "SET ASIDE",
        "LAST EVENT",
        "LAST FLUSH",
        "LAST POLL",
        "NO DETAIL"
    );
    for page in pages {
        println!(
            "{:<20} {:<36} {:<13} {:>13} {:>7} {:>9} {:<20} {:<20} {:<20} {:>9} {}",
            page.page_id,
            page.user_uuid,
            page.status,
            page.conversations_stored,
            page.staged,
            page.set_aside,
            format_time(page.last_event_ms),
            format_time(page.last_flush_ms),
            last_poll(page),
            page.details_unavailable,
            status_note(page),
        );
        let steps: Vec<String> = page
            .onboarding()
            .iter()
            .filter_map(|(step, outcome)| Some(format!("{}: {}", step.as_str(), (*outcome)?)))
            .collect();
        if !steps.is_empty() {
            println!("{:<20} onboarding: {}", "", steps.join("; "));
        }
        if let Some(checked) = page.subscription_checked_at_ms {
            let restored = page
                .subscription_restored_at_ms
                .map(|t| format!("; found lost and subscribed again {}", format_time(Some(t))))
                .unwrap_or_default();
            println!(
                "{:<20} webhooks: subscription checked {}{restored}",
                "",
                format_time(Some(checked))
            );
        }
        if page.messaging_blocked() {
            println!(
                "{:<20} messaging blocked by Facebook since {}: {}",
                "",
                format_time(page.policy_at_ms),
                page.policy_reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
}

/// The last complete poll's end, or that one is running.
fn last_poll(page: &PageSummary) -> String {
    match page.poll_started_ms {
        Some(_) => "in progress".to_string(),
        None => format_time(page.last_poll_ms),
    }
}

/// The last error, preceded by what a Page that needs re-authorisation means for it.
fn status_note(page: &PageSummary) -> String {
    let error = page.last_error.as_deref().unwrap_or("-");
    match page.status {
        PageStatus::NeedsReauth => {
            format!("polls skip it until it is connected again; {error}")
        }
        PageStatus::Active => error.to_string(),
    }
}

fn format_time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "-".to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
}
