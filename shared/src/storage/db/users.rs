//! Shop owners: one user UUID per Shopify shop, for good (a shop that connects again finds its
//! UUID, so its objects stay where they are), the shop's token sealed, and the Facebook user who
//! connected its Pages (Meta's deauthorize and data-deletion callbacks name that person).

use super::{DbError, Owners};
use crate::ids::{ShopDomain, UserUuid};

/// What Meta's callbacks removed at once for a Facebook user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// The users (shops) that person had connected.
    pub users: Vec<UserUuid>,
    /// Pages removed, tokens and all.
    pub pages: u64,
    /// Sessions ended.
    pub sessions: u64,
}

impl Owners {
    /// The shop's user: created with `new_user` on its first connection, found afterwards;
    /// either way its token is replaced by `token_sealed`.
    pub async fn connect_shop(
        &self,
        shop: &ShopDomain,
        new_user: &UserUuid,
        token_sealed: Vec<u8>,
        now: i64,
    ) -> Result<UserUuid, DbError> {
        let (user,): (String,) = sqlx::query_as(
            "INSERT INTO users (user_uuid, shop, shop_token_sealed, created_at_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (shop) DO UPDATE SET shop_token_sealed = excluded.shop_token_sealed
             RETURNING user_uuid",
        )
        .bind(new_user.as_str())
        .bind(shop.as_str())
        .bind(token_sealed)
        .bind(now)
        .fetch_one(&self.db.pool)
        .await?;
        UserUuid::parse(&user).map_err(|e| DbError::Query(sqlx::Error::Decode(e.into())))
    }

    /// The shop of a user.
    pub async fn user_shop(&self, user: &UserUuid) -> Result<Option<ShopDomain>, DbError> {
        let shop: Option<(String,)> = sqlx::query_as("SELECT shop FROM users WHERE user_uuid = $1")
            .bind(user.as_str())
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(shop.and_then(|(shop,)| ShopDomain::parse(&shop).ok()))
    }

    /// Records the Facebook user who connected the user's Pages.
    pub async fn set_facebook_user(
        &self,
        user: &UserUuid,
        facebook_user_id: &str,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE users SET facebook_user_id = $2, connected_at_ms = $3 WHERE user_uuid = $1",
        )
        .bind(user.as_str())
        .bind(facebook_user_id)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The users whose Pages `facebook_user_id` connected.
    pub async fn users_of_facebook_user(
        &self,
        facebook_user_id: &str,
    ) -> Result<Vec<UserUuid>, DbError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT user_uuid FROM users WHERE facebook_user_id = $1 ORDER BY user_uuid",
        )
        .bind(facebook_user_id)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(user,)| UserUuid::parse(&user).ok())
            .collect())
    }

    /// Removes every Page of `user` (tokens with them); how many.
    pub async fn remove_pages_of_user(&self, user: &UserUuid) -> Result<u64, DbError> {
        let done = sqlx::query("DELETE FROM pages WHERE user_uuid = $1")
            .bind(user.as_str())
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deauthorization: the Pages `facebook_user_id` connected stop syncing (their rows, tokens
    /// included, are removed). With `everything` (data deletion) the users' sessions end and
    /// the shop tokens go too.
    pub async fn forget_facebook_user(
        &self,
        facebook_user_id: &str,
        everything: bool,
    ) -> Result<Forgotten, DbError> {
        let users = self.users_of_facebook_user(facebook_user_id).await?;
        let mut forgotten = Forgotten {
            users: users.clone(),
            ..Default::default()
        };
        let mut transaction = self.db.pool.begin().await?;
        for user in &users {
            let pages = sqlx::query("DELETE FROM pages WHERE user_uuid = $1")
                .bind(user.as_str())
                .execute(&mut *transaction)
                .await?;
            forgotten.pages += pages.rows_affected();
            if everything {
                let sessions = sqlx::query("DELETE FROM sessions WHERE user_uuid = $1")
                    .bind(user.as_str())
                    .execute(&mut *transaction)
                    .await?;
                forgotten.sessions += sessions.rows_affected();
                sqlx::query(
                    "UPDATE users SET shop_token_sealed = NULL, facebook_user_id = NULL
                     WHERE user_uuid = $1",
                )
                .bind(user.as_str())
                .execute(&mut *transaction)
                .await?;
            }
        }
        transaction.commit().await?;
        Ok(forgotten)
    }
}
