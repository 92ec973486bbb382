//! Who connected each Page: one row per Page and Facebook person, with that person's Page token
//! sealed. `pages.token_sealed` is the token in use and `pages.connected_by` names whose it is.
//! Meta's deauthorize and data-deletion callbacks name one person, so what they undo is that
//! person's:
//! - deauthorize: their tokens go but their rows stay (marked), as Meta sends the person's data
//!   deletion later and it must still find what they connected; a Page whose token in use was
//!   theirs goes on with another person's token of the same shop, or stops (its row removed);
//! - data deletion: as deauthorize, and their rows go; every Page they connected that no one
//!   else connects is removed (its folder to be deleted), the sessions their Facebook Login
//!   started end, and a shop nobody is left connected to loses its token, its sessions and all
//!   its Pages (its whole folder to be deleted). The request is recorded and its job written to
//!   the outbox in the same transaction (`data_deletions.rs`).
//!
//! Invariant: a person's rows belong to the Page's current shop; a Page that moves to another
//! shop takes no one of the old shop's people with it.

use super::{DbError, Owners, Registry, outbox};
use crate::ids::{FacebookUserId, PageId, UserUuid};
use crate::jobs::{Job, OnboardPage};
use crate::storage::db::PageStatus;
use crate::storage::db::pages::remove_page_rows;

/// What forgetting a person changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Pages removed, tokens and all, with their shop: nobody else connects them.
    pub removed: Vec<(UserUuid, PageId)>,
    /// Pages that stay: another person of the shop connects them, or the token in use is not
    /// this person's. Only this person's token for them went.
    pub kept: Vec<PageId>,
    /// Shops nobody is connected to any more (data deletion only): their token and sessions
    /// went, and their whole folder is to be deleted.
    pub emptied: Vec<UserUuid>,
    /// Sessions ended (data deletion only).
    pub sessions: u64,
}

/// A Page as Facebook Login hands it over.
#[derive(Debug, Clone)]
pub struct GrantedPage {
    /// The Page.
    pub page_id: PageId,
    /// Its name, for the owner's status page.
    pub name: String,
    /// The person's Page token, sealed.
    pub token_sealed: Vec<u8>,
}

/// Which of Meta's callbacks a person is forgotten for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Forget {
    /// Their Pages stop syncing with their tokens; nothing else changes.
    Deauthorize,
    /// As deauthorize, and their sessions end; a shop left with nobody is wiped.
    DataDeletion,
}

impl Registry {
    /// `person` connected `pages` through `user`'s shop, in
    /// one transaction: each person's row is recorded (or renewed), each Page registered under
    /// `user` with this token in use (a re-auth flag cleared; the rows of another shop's people
    /// for it go, as the Page moved), its onboarding steps that did not succeed marked queued
    /// (those that did keep their outcome until the new job records its own), and its
    /// onboarding job written to the outbox. The outbox rows and their jobs, for the caller to
    /// publish at once.
    pub async fn connect_pages(
        &self,
        user: &UserUuid,
        person: &FacebookUserId,
        pages: &[GrantedPage],
        now: i64,
    ) -> Result<Vec<(String, Job)>, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        let mut queued = Vec::with_capacity(pages.len());
        for page in pages {
            connect_page(&mut transaction, page, user, person, now).await?;
            let job = Job::OnboardPage(OnboardPage {
                page_id: page.page_id.clone(),
            });
            let row = outbox::enqueue(&mut transaction, &job, now).await?;
            queued.push((row, job));
        }
        transaction.commit().await?;
        Ok(queued)
    }

    /// The people who connected a Page, most recent first.
    pub async fn people_of_page(&self, page_id: &PageId) -> Result<Vec<FacebookUserId>, DbError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT facebook_user_id FROM page_connections WHERE page_id = $1
             ORDER BY connected_at_ms DESC, facebook_user_id",
        )
        .bind(page_id.as_str())
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(person,)| FacebookUserId::parse(&person).ok())
            .collect())
    }
}

impl Owners {
    /// Deauthorizes `person` (see the module's header) in one transaction.
    pub async fn deauthorize_person(
        &self,
        person: &FacebookUserId,
        now: i64,
    ) -> Result<Forgotten, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        let forgotten = forget(&mut transaction, person, Forget::Deauthorize, now).await?;
        transaction.commit().await?;
        Ok(forgotten)
    }

    /// Removes `page_id` if it is still `user`'s: the data-deletion job does first, so no
    /// flush writes into the folder it empties (who connected it is the request's to change).
    pub async fn remove_page_of_user(
        &self,
        user: &UserUuid,
        page_id: &PageId,
    ) -> Result<bool, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        // A write first (see `forget`): the row goes only if it is still `user`'s.
        let owned = sqlx::query("DELETE FROM pages WHERE page_id = $1 AND user_uuid = $2")
            .bind(page_id.as_str())
            .bind(user.as_str())
            .execute(&mut *transaction)
            .await?;
        if owned.rows_affected() == 0 {
            return Ok(false);
        }
        remove_page_rows(&mut transaction, page_id.as_str()).await?;
        transaction.commit().await?;
        Ok(true)
    }
}

/// Forgets `person` for `what` inside `transaction`: what changed.
pub(super) async fn forget(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    person: &FacebookUserId,
    what: Forget,
    now: i64,
) -> Result<Forgotten, DbError> {
    // A write first: SQLite cannot turn a transaction that has read into a writing one while
    // another connection writes (it answers busy at once, without waiting).
    let mut connections: Vec<(String, String)> = match what {
        Forget::Deauthorize => {
            sqlx::query_as(
                "UPDATE page_connections SET token_sealed = NULL, deauthorized_at_ms = $2
                 WHERE facebook_user_id = $1 AND deauthorized_at_ms IS NULL
                 RETURNING page_id, user_uuid",
            )
            .bind(person.as_str())
            .bind(now)
            .fetch_all(&mut **transaction)
            .await?
        }
        Forget::DataDeletion => {
            sqlx::query_as(
                "DELETE FROM page_connections WHERE facebook_user_id = $1
                 RETURNING page_id, user_uuid",
            )
            .bind(person.as_str())
            .fetch_all(&mut **transaction)
            .await?
        }
    };
    connections.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    let mut forgotten = Forgotten::default();
    let mut users: Vec<UserUuid> = Vec::new();
    for (page, user) in &connections {
        let (Ok(page_id), Ok(user_uuid)) = (PageId::parse(page), UserUuid::parse(user)) else {
            continue;
        };
        if !users.contains(&user_uuid) {
            users.push(user_uuid.clone());
        }
        let in_use: Option<(Option<String>,)> =
            sqlx::query_as("SELECT connected_by FROM pages WHERE page_id = $1 AND user_uuid = $2")
                .bind(page)
                .bind(user)
                .fetch_optional(&mut **transaction)
                .await?;
        match in_use {
            // Stopped already (an earlier deauthorization, or the deletion job ran first): for a
            // data deletion its folder still holds their data.
            None => {
                if what == Forget::DataDeletion {
                    forgotten.removed.push((user_uuid, page_id));
                }
                continue;
            }
            Some((connected_by,)) if connected_by.as_deref() != Some(person.as_str()) => {
                forgotten.kept.push(page_id);
                continue;
            }
            Some(_) => {}
        }
        let other: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT facebook_user_id, token_sealed FROM page_connections
             WHERE page_id = $1 AND user_uuid = $2 AND token_sealed IS NOT NULL
             ORDER BY connected_at_ms DESC, facebook_user_id LIMIT 1",
        )
        .bind(page)
        .bind(user)
        .fetch_optional(&mut **transaction)
        .await?;
        if let Some((other_person, token)) = other {
            sqlx::query(
                "UPDATE pages SET token_sealed = $3, connected_by = $4, status = $5,
                     last_error = NULL, last_error_ms = NULL
                 WHERE page_id = $1 AND user_uuid = $2",
            )
            .bind(page)
            .bind(user)
            .bind(token)
            .bind(other_person)
            .bind(PageStatus::Active.as_str())
            .execute(&mut **transaction)
            .await?;
            forgotten.kept.push(page_id);
        } else {
            remove_page_rows(transaction, page).await?;
            forgotten.removed.push((user_uuid, page_id));
        }
    }
    if what == Forget::DataDeletion {
        let sessions = sqlx::query("DELETE FROM sessions WHERE facebook_user_id = $1")
            .bind(person.as_str())
            .execute(&mut **transaction)
            .await?;
        forgotten.sessions += sessions.rows_affected();
        for user in users {
            // Anyone else's row, even a deauthorized person's, keeps the shop: their data is
            // theirs to have deleted.
            let (remaining,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM page_connections WHERE user_uuid = $1")
                    .bind(user.as_str())
                    .fetch_one(&mut **transaction)
                    .await?;
            if remaining > 0 {
                continue;
            }
            let pages: Vec<(String,)> =
                sqlx::query_as("SELECT page_id FROM pages WHERE user_uuid = $1 ORDER BY page_id")
                    .bind(user.as_str())
                    .fetch_all(&mut **transaction)
                    .await?;
            for (page,) in pages {
                remove_page_rows(transaction, &page).await?;
                if let Ok(page_id) = PageId::parse(&page) {
                    forgotten.kept.retain(|kept| *kept != page_id);
                    forgotten.removed.push((user.clone(), page_id));
                }
            }
            let sessions = sqlx::query("DELETE FROM sessions WHERE user_uuid = $1")
                .bind(user.as_str())
                .execute(&mut **transaction)
                .await?;
            forgotten.sessions += sessions.rows_affected();
            sqlx::query("UPDATE users SET shop_token_sealed = NULL WHERE user_uuid = $1")
                .bind(user.as_str())
                .execute(&mut **transaction)
                .await?;
            forgotten.emptied.push(user);
        }
    }
    Ok(forgotten)
}

/// One Page of [`Registry::connect_pages`], inside its transaction.
async fn connect_page(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    page: &GrantedPage,
    user: &UserUuid,
    person: &FacebookUserId,
    now: i64,
) -> Result<(), DbError> {
    let (page_id, token_sealed) = (&page.page_id, &page.token_sealed);
    sqlx::query("DELETE FROM page_connections WHERE page_id = $1 AND user_uuid <> $2")
        .bind(page_id.as_str())
        .bind(user.as_str())
        .execute(&mut **transaction)
        .await?;
    // A Page moving to another shop is onboarded afresh there: its steps start again, and its
    // history is read again into the new shop's folder.
    let moved = sqlx::query(
        "UPDATE pages SET onboard_subscribe = NULL, onboard_page_data = NULL,
             onboard_backfill = NULL
         WHERE page_id = $1 AND user_uuid <> $2",
    )
    .bind(page_id.as_str())
    .bind(user.as_str())
    .execute(&mut **transaction)
    .await?;
    if moved.rows_affected() > 0 {
        sqlx::query("UPDATE page_polls SET last_backfill_end_ms = NULL WHERE page_id = $1")
            .bind(page_id.as_str())
            .execute(&mut **transaction)
            .await?;
    }
    sqlx::query(
        "INSERT INTO page_connections
             (page_id, facebook_user_id, user_uuid, token_sealed, connected_at_ms)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (page_id, facebook_user_id) DO UPDATE SET
             user_uuid = excluded.user_uuid, token_sealed = excluded.token_sealed,
             connected_at_ms = excluded.connected_at_ms, deauthorized_at_ms = NULL",
    )
    .bind(page_id.as_str())
    .bind(person.as_str())
    .bind(user.as_str())
    .bind(token_sealed.to_vec())
    .bind(now)
    .execute(&mut **transaction)
    .await?;
    sqlx::query(
        "INSERT INTO pages (page_id, user_uuid, token_sealed, status, created_at_ms,
             connected_by, name)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (page_id) DO UPDATE SET user_uuid = excluded.user_uuid,
             token_sealed = excluded.token_sealed, status = excluded.status,
             connected_by = excluded.connected_by, name = excluded.name, last_error = NULL,
             last_error_ms = NULL",
    )
    .bind(page_id.as_str())
    .bind(user.as_str())
    .bind(token_sealed.to_vec())
    .bind(PageStatus::Active.as_str())
    .bind(now)
    .bind(person.as_str())
    .bind(&page.name)
    .execute(&mut **transaction)
    .await?;
    // A step that succeeded keeps its outcome; one never run, or failed, waits for the job.
    sqlx::query(
        "UPDATE pages SET
             onboard_subscribe = CASE WHEN onboard_subscribe IS NULL
                 OR onboard_subscribe LIKE 'failed%' THEN 'queued' ELSE onboard_subscribe END,
             onboard_page_data = CASE WHEN onboard_page_data IS NULL
                 OR onboard_page_data LIKE 'failed%' THEN 'queued' ELSE onboard_page_data END,
             onboard_backfill = CASE WHEN onboard_backfill IS NULL
                 OR onboard_backfill LIKE 'failed%' THEN 'queued' ELSE onboard_backfill END
         WHERE page_id = $1",
    )
    .bind(page_id.as_str())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::db::test_support::backends;

    fn id(text: &str) -> PageId {
        PageId::parse(text).expect("page id")
    }

    fn person(text: &str) -> FacebookUserId {
        FacebookUserId::parse(text).expect("person")
    }

    fn granted(page_id: &PageId, token: u8) -> GrantedPage {
        GrantedPage {
            page_id: page_id.clone(),
            name: format!("Page {page_id}"),
            token_sealed: vec![token],
        }
    }

    /// A data deletion for `who`, as Meta's callback makes it.
    async fn data_deletion(owners: &Owners, who: &str) -> Forgotten {
        let code = format!("code-{who}");
        let (forgotten, _) = owners
            .request_data_deletion(
                crate::storage::db::NewDataDeletion {
                    confirmation_code: &code,
                    person: &person(who),
                    signed_request_sha256: &code,
                },
                30,
            )
            .await
            .expect("request")
            .expect("not a replay");
        forgotten
    }

    #[tokio::test]
    async fn forgetting_a_person_removes_only_what_they_alone_connected() {
        for (backend, db) in backends().await {
            let (registry, owners) = (db.registry(), db.owners());
            let shop = UserUuid::new_random();
            let (own, shared) = (id("11"), id("12"));
            let connect = |who: &'static str, page: &PageId, token: u8, at: i64| {
                let (registry, shop, page) = (registry.clone(), shop.clone(), page.clone());
                async move {
                    registry
                        .connect_pages(&shop, &person(who), &[granted(&page, token)], at)
                        .await
                        .expect("connect")
                }
            };
            connect("1", &own, 1, 1).await;
            connect("1", &shared, 1, 2).await;
            connect("2", &shared, 2, 3).await;

            // Person 2 deauthorizes: the shared Page goes on with person 1's token.
            let done = owners
                .deauthorize_person(&person("2"), 10)
                .await
                .expect("deauthorize");
            assert_eq!(done.kept, std::slice::from_ref(&shared), "{backend}");
            assert!(done.removed.is_empty(), "{backend}");
            let record = registry.page(&shared).await.expect("read").expect("kept");
            assert_eq!(
                record.token_sealed,
                vec![1],
                "{backend}: person 1's token in use"
            );
            assert_eq!(
                registry.people_of_page(&shared).await.expect("people"),
                [person("2"), person("1")],
                "{backend}: a deauthorized person stays known for their data deletion"
            );

            // Person 1's data deletion: both Pages go (person 2 holds no token), the shop stays
            // (person 2 is still known).
            let done = data_deletion(&owners, "1").await;
            assert_eq!(
                done.removed,
                [(shop.clone(), own.clone()), (shop.clone(), shared.clone())],
                "{backend}"
            );
            assert!(done.emptied.is_empty(), "{backend}");
            assert!(
                registry.page(&own).await.expect("read").is_none(),
                "{backend}"
            );

            // Person 2's data deletion after their deauthorization: what they connected is
            // found, and nobody is left.
            let done = data_deletion(&owners, "2").await;
            assert_eq!(done.removed, [(shop.clone(), shared.clone())], "{backend}");
            assert_eq!(done.emptied, std::slice::from_ref(&shop), "{backend}");

            // A Page moving to another shop takes none of the old shop's people along.
            let other_shop = UserUuid::new_random();
            connect("3", &own, 3, 4).await;
            registry
                .connect_pages(&other_shop, &person("4"), &[granted(&own, 4)], 5)
                .await
                .expect("connect");
            assert_eq!(
                registry.people_of_page(&own).await.expect("people"),
                [person("4")],
                "{backend}"
            );
            let done = owners
                .deauthorize_person(&person("3"), 20)
                .await
                .expect("deauthorize");
            assert_eq!(done, Forgotten::default(), "{backend}");
            assert!(
                registry.page(&own).await.expect("read").is_some(),
                "{backend}"
            );
        }
    }
}
