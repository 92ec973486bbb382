//! One connected Page on the owner's status page, in the owner's words: its name (its id small
//! beside it), whether it is receiving messages, whether its details are saved, how far its
//! history has been copied, its last message, and a problem as one sentence with the one thing
//! to do. Internal words (step names, `needs_reauth`, "poll", "job") never reach the page;
//! times are relative, the exact time on hover.

use fbsync_shared::storage::db::{PageStatus, PageSummary};

use super::page::escape;

/// `ms` as people read it: "just now", "5 minutes ago", "3 days ago", with the exact UTC time
/// as the element's title (shown on hover) and its machine-readable form.
pub fn relative_time(ms: i64, now_ms: i64) -> String {
    let seconds = (now_ms - ms).max(0) / 1000;
    let (count, unit) = match seconds {
        0..=59 => (0, ""),
        60..=3_599 => (seconds / 60, "minute"),
        3_600..=86_399 => (seconds / 3_600, "hour"),
        _ => (seconds / 86_400, "day"),
    };
    let words = match count {
        0 => "just now".to_string(),
        1 => format!("1 {unit} ago"),
        n => format!("{n} {unit}s ago"),
    };
    let exact = chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| (t.format("%Y-%m-%d %H:%M UTC").to_string(), t.to_rfc3339()))
        .unwrap_or_default();
    format!(
        "<time datetime=\"{}\" title=\"{}\">{words}</time>",
        escape(&exact.1),
        escape(&exact.0)
    )
}

/// A number as people read it: `1,240`.
fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// The reason after `failed: `, when a step failed.
fn failure(outcome: Option<&str>) -> Option<&str> {
    outcome.and_then(|o| o.strip_prefix("failed: ").or(o.strip_prefix("failed")))
}

/// Whether a step waits for its job.
fn waiting(outcome: Option<&str>) -> bool {
    outcome == Some("queued")
}

/// Whether a step failed: the steps after it do not run until the owner reconnects.
fn stopped(page: &PageSummary) -> bool {
    page.status == PageStatus::NeedsReauth
        || page.last_error.is_some()
        || [
            &page.onboard_subscribe,
            &page.onboard_page_data,
            &page.onboard_backfill,
        ]
        .iter()
        .any(|step| failure(step.as_deref()).is_some())
}

/// Whether the page is still moving (a step waiting, or a poll in progress, and nothing has
/// stopped it): the status page then refreshes itself.
pub fn in_progress(page: &PageSummary) -> bool {
    !stopped(page)
        && (page.poll_started_ms.is_some()
            || [
                &page.onboard_subscribe,
                &page.onboard_page_data,
                &page.onboard_backfill,
            ]
            .iter()
            .any(|step| waiting(step.as_deref())))
}

/// Whether the Page receives its messages, and since when its subscription is known good.
fn receiving_with_check(page: &PageSummary, now_ms: i64) -> String {
    let words = escape(&receiving(page));
    if words != "Receiving messages" {
        return words;
    }
    let day_ms = 86_400_000;
    match (
        page.subscription_restored_at_ms,
        page.subscription_checked_at_ms,
    ) {
        (Some(restored), _) if now_ms - restored < day_ms => format!(
            "Receiving messages again since {} (Facebook had stopped sending them; what was \
             missed is being read back)",
            relative_time(restored, now_ms)
        ),
        (_, Some(checked)) => format!("{words} (checked {})", relative_time(checked, now_ms)),
        _ => words,
    }
}

/// Whether the Page receives its messages.
fn receiving(page: &PageSummary) -> String {
    if page.status == PageStatus::NeedsReauth {
        return "Not receiving messages: Facebook no longer accepts fbsync's access".into();
    }
    let step = page.onboard_subscribe.as_deref();
    match failure(step) {
        Some(reason) => format!("Not receiving messages yet ({})", reason.trim()),
        None if waiting(step) => "Getting ready to receive messages…".into(),
        None => "Receiving messages".into(),
    }
}

/// Whether the Page's details are saved.
fn details(page: &PageSummary) -> String {
    let step = page.onboard_page_data.as_deref();
    match failure(step) {
        Some(reason) => format!("Not saved yet ({})", reason.trim()),
        None if waiting(step) && stopped(page) => {
            "Not started: a step above did not succeed".into()
        }
        None if waiting(step) => "Saving…".into(),
        None if step.is_none() => "Saved with the first message".into(),
        None => "Saved".into(),
    }
}

/// How far the Page's history has been copied.
fn history(page: &PageSummary, now_ms: i64) -> String {
    let stored = grouped(page.conversations_stored);
    if page.poll_started_ms.is_some() && !stopped(page) {
        return format!("Copying: {stored} conversations so far…");
    }
    if page.poll_started_ms.is_some() {
        return format!("Paused at {stored} conversations: see the problem below");
    }
    if let Some(done) = page.last_backfill_end_ms {
        return format!(
            "Done {} ({stored} conversations)",
            relative_time(done, now_ms)
        );
    }
    let step = page.onboard_backfill.as_deref();
    match failure(step) {
        Some(reason) => format!("Not copied yet ({})", escape(reason.trim())),
        None if step.is_some() && stopped(page) => {
            "Not started: a step above did not succeed".into()
        }
        None if step.is_some() => "Waiting to start…".into(),
        None => match page.last_poll_ms {
            Some(polled) => format!("Checked {}", relative_time(polled, now_ms)),
            None => "Not copied yet".into(),
        },
    }
}

/// The problem the owner can act on, as one sentence with its one action, if any.
fn problem(page: &PageSummary) -> Option<String> {
    if page.status == PageStatus::NeedsReauth {
        return Some(
            "Facebook no longer accepts fbsync's access to this Page (the permission was \
             removed or has expired). <a class=\"reconnect\" href=\"/facebook/login\">Reconnect \
             this Page</a> to go on."
                .into(),
        );
    }
    if page.messaging_blocked() {
        return Some(format!(
            "Facebook has blocked this Page from sending messages ({}). Messages people send are \
             still kept here. Review the Page's messaging issues in Meta Business Suite to have \
             the block lifted.",
            escape(page.policy_reason.as_deref().unwrap_or("no reason given"))
        ));
    }
    if page.policy_action.as_deref() == Some("warning") {
        return Some(format!(
            "Facebook has warned this Page about its messaging ({}). Review it in Meta \
             Business Suite before Facebook blocks it.",
            escape(page.policy_reason.as_deref().unwrap_or("no reason given"))
        ));
    }
    if page.details_unavailable > 0 {
        return Some(format!(
            "{} older message(s) could not be copied: Facebook only gives the details of a \
             conversation's 20 most recent messages.",
            grouped(page.details_unavailable)
        ));
    }
    page.last_error.as_ref().map(|error| {
        format!(
            "Something went wrong: {}. fbsync keeps trying.",
            escape(error)
        )
    })
}

/// The Page's card: HTML, every value escaped.
pub fn card(page: &PageSummary, now_ms: i64) -> String {
    let id = escape(page.page_id.as_str());
    let name = page
        .name
        .as_deref()
        .map(escape)
        .unwrap_or_else(|| format!("Page {id}"));
    let last_message = page
        .last_event_ms
        .map(|t| relative_time(t, now_ms))
        .unwrap_or_else(|| "None yet".into());
    let problem = problem(page)
        .map(|text| format!("<p class=\"problem\" role=\"status\">{text}</p>\n"))
        .unwrap_or_default();
    format!(
        "<section class=\"page\" data-page-id=\"{id}\" aria-labelledby=\"page-{id}\">\n\
         <h2 id=\"page-{id}\"><span class=\"name\">{name}</span> <small class=\"id\">{id}</small></h2>\n\
         <dl>\n\
         <dt>Messages</dt><dd class=\"receiving\">{}</dd>\n\
         <dt>Page details</dt><dd class=\"details\">{}</dd>\n\
         <dt>History</dt><dd class=\"history\">{}</dd>\n\
         <dt>Last message</dt><dd>{last_message}</dd>\n\
         <dt>Conversations stored</dt><dd>{}</dd>\n\
         </dl>\n{problem}</section>\n",
        receiving_with_check(page, now_ms),
        escape(&details(page)),
        history(page, now_ms),
        grouped(page.conversations_stored),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_times_read_as_people_read_them() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(1_240), "1,240");
        assert_eq!(grouped(3_000_000), "3,000,000");
        let now = 1_800_000_000_000;
        assert!(relative_time(now - 5_000, now).contains(">just now<"));
        assert!(relative_time(now - 120_000, now).contains(">2 minutes ago<"));
        assert!(relative_time(now - 3_600_000, now).contains(">1 hour ago<"));
        assert!(relative_time(now - 3 * 86_400_000, now).contains(">3 days ago<"));
        assert!(relative_time(now, now).contains("title=\"2027-01-15 08:00 UTC\""));
    }
}
