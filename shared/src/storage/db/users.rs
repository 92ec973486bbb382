//! Shop owners: one user UUID per Shopify shop, for good (a shop that connects again finds its
//! UUID, so its objects stay where they are), and the shop's token sealed. Who connected which
//! of its Pages: `page_connections.rs`.

use super::{DbError, Owners};
use crate::ids::{ShopDomain, UserUuid};

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

    /// Removes every Page of `user` (tokens with them); how many.
    pub async fn remove_pages_of_user(&self, user: &UserUuid) -> Result<u64, DbError> {
        let done = sqlx::query("DELETE FROM pages WHERE user_uuid = $1")
            .bind(user.as_str())
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
