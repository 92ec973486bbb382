//! Who connected each Page: one row per Page and Facebook person, with that person's Page token
//! sealed. `pages.token_sealed` is the token in use and `pages.connected_by` names whose it is.
//! Meta's deauthorize and data-deletion callbacks name one person, so what they undo is that
//! person's: their rows go; a Page whose token in use was theirs goes on with another person's
//! token of the same shop, or is removed when nobody else connects it; a data deletion also
//! ends the sessions their Facebook Login started, and a shop nobody is left connected to loses
//! its token, its sessions and all its Pages (its whole folder is then deleted by a worker).
//!
//! Invariant: a person's rows belong to the Page's current shop; a Page that moves to another
//! shop takes no one of the old shop's people with it.

use super::{DbError, Owners, Registry, outbox};
use crate::ids::{FacebookUserId, PageId, UserUuid};
use crate::jobs::{Job, OnboardPage};
use crate::storage::db::PageStatus;
use crate::storage::db::pages::remove_page_rows;

/// What forgetting a person changed (or, planned, would change).
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

/// Which of Meta's callbacks a person is forgotten for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    /// Their Pages stop syncing with their tokens; nothing else changes.
    Deauthorize,
    /// As deauthorize, and their sessions end; a shop left with nobody is wiped.
    DataDeletion,
}

impl Registry {
    /// `person` connected `pages` (each Page's id and sealed token) through `user`'s shop, in
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
        pages: &[(PageId, Vec<u8>)],
        now: i64,
    ) -> Result<Vec<(String, Job)>, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        let mut queued = Vec::with_capacity(pages.len());
        for (page_id, token_sealed) in pages {
            connect_page(&mut transaction, page_id, user, person, token_sealed, now).await?;
            let job = Job::OnboardPage(OnboardPage {
                page_id: page_id.clone(),
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
    /// Forgets `person` for `what` (see the module's header) in one transaction; with `apply`
    /// false the transaction is rolled back, so the answer is the plan of what would change.
    pub async fn forget_person(
        &self,
        person: &FacebookUserId,
        what: Forget,
        apply: bool,
    ) -> Result<Forgotten, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        // A write first: SQLite cannot turn a transaction that has read into a writing one
        // while another connection writes (it answers busy at once, without waiting).
        let mut connections: Vec<(String, String)> = sqlx::query_as(
            "DELETE FROM page_connections WHERE facebook_user_id = $1
             RETURNING page_id, user_uuid",
        )
        .bind(person.as_str())
        .fetch_all(&mut *transaction)
        .await?;
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
            let in_use: Option<(Option<String>,)> = sqlx::query_as(
                "SELECT connected_by FROM pages WHERE page_id = $1 AND user_uuid = $2",
            )
            .bind(page)
            .bind(user)
            .fetch_optional(&mut *transaction)
            .await?;
            let Some((connected_by,)) = in_use else {
                continue;
            };
            if connected_by.as_deref() != Some(person.as_str()) {
                forgotten.kept.push(page_id);
                continue;
            }
            let other: Option<(String, Vec<u8>)> = sqlx::query_as(
                "SELECT facebook_user_id, token_sealed FROM page_connections
                 WHERE page_id = $1 AND user_uuid = $2
                 ORDER BY connected_at_ms DESC, facebook_user_id LIMIT 1",
            )
            .bind(page)
            .bind(user)
            .fetch_optional(&mut *transaction)
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
                .execute(&mut *transaction)
                .await?;
                forgotten.kept.push(page_id);
            } else {
                remove_page_rows(&mut transaction, page).await?;
                forgotten.removed.push((user_uuid, page_id));
            }
        }
        if what == Forget::DataDeletion {
            let sessions = sqlx::query("DELETE FROM sessions WHERE facebook_user_id = $1")
                .bind(person.as_str())
                .execute(&mut *transaction)
                .await?;
            forgotten.sessions += sessions.rows_affected();
            for user in users {
                let (remaining,): (i64,) =
                    sqlx::query_as("SELECT COUNT(*) FROM page_connections WHERE user_uuid = $1")
                        .bind(user.as_str())
                        .fetch_one(&mut *transaction)
                        .await?;
                if remaining > 0 {
                    continue;
                }
                let pages: Vec<(String,)> = sqlx::query_as(
                    "SELECT page_id FROM pages WHERE user_uuid = $1 ORDER BY page_id",
                )
                .bind(user.as_str())
                .fetch_all(&mut *transaction)
                .await?;
                for (page,) in pages {
                    remove_page_rows(&mut transaction, &page).await?;
                    if let Ok(page_id) = PageId::parse(&page) {
                        forgotten.kept.retain(|kept| *kept != page_id);
                        forgotten.removed.push((user.clone(), page_id));
                    }
                }
                let sessions = sqlx::query("DELETE FROM sessions WHERE user_uuid = $1")
                    .bind(user.as_str())
                    .execute(&mut *transaction)
                    .await?;
                forgotten.sessions += sessions.rows_affected();
                sqlx::query("UPDATE users SET shop_token_sealed = NULL WHERE user_uuid = $1")
                    .bind(user.as_str())
                    .execute(&mut *transaction)
                    .await?;
                forgotten.emptied.push(user);
            }
        }
        if apply {
            transaction.commit().await?;
        } else {
            transaction.rollback().await?;
        }
        Ok(forgotten)
    }

    /// Removes `page_id` (and who connected it) if it is still `user`'s: the data-deletion
    /// job, which may run before its request's database part, so no flush writes into the
    /// folder it empties.
    pub async fn remove_page_of_user(
        &self,
        user: &UserUuid,
        page_id: &PageId,
    ) -> Result<bool, DbError> {
        let mut transaction = self.db.pool.begin().await?;
        // A write first (see `forget_person`): the row goes only if it is still `user`'s.
        let owned = sqlx::query("DELETE FROM pages WHERE page_id = $1 AND user_uuid = $2")
            .bind(page_id.as_str())
            .bind(user.as_str())
            .execute(&mut *transaction)
            .await?;
        if owned.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM page_connections WHERE page_id = $1")
            .bind(page_id.as_str())
            .execute(&mut *transaction)
            .await?;
        remove_page_rows(&mut transaction, page_id.as_str()).await?;
        transaction.commit().await?;
        Ok(true)
    }
}

/// One Page of [`Registry::connect_pages`], inside its transaction.
async fn connect_page(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    page_id: &PageId,
    user: &UserUuid,
    person: &FacebookUserId,
    token_sealed: &[u8],
    now: i64,
) -> Result<(), DbError> {
    sqlx::query("DELETE FROM page_connections WHERE page_id = $1 AND user_uuid <> $2")
        .bind(page_id.as_str())
        .bind(user.as_str())
        .execute(&mut **transaction)
        .await?;
    sqlx::query(
        "INSERT INTO page_connections
             (page_id, facebook_user_id, user_uuid, token_sealed, connected_at_ms)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (page_id, facebook_user_id) DO UPDATE SET
             user_uuid = excluded.user_uuid, token_sealed = excluded.token_sealed,
             connected_at_ms = excluded.connected_at_ms",
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
             connected_by)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (page_id) DO UPDATE SET user_uuid = excluded.user_uuid,
             token_sealed = excluded.token_sealed, status = excluded.status,
             connected_by = excluded.connected_by, last_error = NULL, last_error_ms = NULL",
    )
    .bind(page_id.as_str())
    .bind(user.as_str())
    .bind(token_sealed.to_vec())
    .bind(PageStatus::Active.as_str())
    .bind(now)
    .bind(person.as_str())
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

    #[tokio::test]
    async fn forgetting_a_person_removes_only_what_they_alone_connected_and_a_plan_changes_nothing()
    {
        for (backend, db) in backends().await {
            let (registry, owners) = (db.registry(), db.owners());
            let shop = UserUuid::new_random();
            let (own, shared) = (id("11"), id("12"));
            registry
                .connect_pages(&shop, &person("1"), &[(own.clone(), vec![1])], 1)
                .await
                .expect("connect");
            registry
                .connect_pages(&shop, &person("1"), &[(shared.clone(), vec![1])], 2)
                .await
                .expect("connect");
            registry
                .connect_pages(&shop, &person("2"), &[(shared.clone(), vec![2])], 3)
                .await
                .expect("connect");

            let plan = owners
                .forget_person(&person("2"), Forget::DataDeletion, false)
                .await
                .expect("plan");
            assert_eq!(plan.kept, std::slice::from_ref(&shared), "{backend}");
            assert!(
                plan.removed.is_empty() && plan.emptied.is_empty(),
                "{backend}"
            );
            assert_eq!(
                registry
                    .people_of_page(&shared)
                    .await
                    .expect("people")
                    .len(),
                2,
                "{backend}: a plan is rolled back"
            );

            let done = owners
                .forget_person(&person("2"), Forget::Deauthorize, true)
                .await
                .expect("forget");
            assert_eq!(done.kept, std::slice::from_ref(&shared), "{backend}");
            let record = registry.page(&shared).await.expect("read").expect("kept");
            assert_eq!(
                record.token_sealed,
                vec![1],
                "{backend}: person 1's token in use"
            );
            assert_eq!(
                registry.people_of_page(&shared).await.expect("people"),
                [person("1")],
                "{backend}"
            );

            let done = owners
                .forget_person(&person("1"), Forget::DataDeletion, true)
                .await
                .expect("forget");
            assert_eq!(
                done.removed,
                [(shop.clone(), own.clone()), (shop.clone(), shared.clone())],
                "{backend}"
            );
            assert_eq!(
                done.emptied,
                std::slice::from_ref(&shop),
                "{backend}: nobody is left"
            );
            assert!(
                registry.page(&own).await.expect("read").is_none(),
                "{backend}"
            );

            // A Page moving to another shop takes none of the old shop's people along.
            let other_shop = UserUuid::new_random();
            registry
                .connect_pages(&shop, &person("3"), &[(own.clone(), vec![3])], 4)
                .await
                .expect("connect");
            registry
                .connect_pages(&other_shop, &person("4"), &[(own.clone(), vec![4])], 5)
                .await
                .expect("connect");
            assert_eq!(
                registry.people_of_page(&own).await.expect("people"),
                [person("4")],
                "{backend}"
            );
            let done = owners
                .forget_person(&person("3"), Forget::Deauthorize, true)
                .await
                .expect("forget");
            assert_eq!(done, Forgotten::default(), "{backend}");
            assert!(
                registry.page(&own).await.expect("read").is_some(),
                "{backend}"
            );
        }
    }
}
