//! Owner sessions: the SHA-256 of a random cookie value mapped to a user until it expires.
//! Only hashes are stored; expired rows are removed whenever a session is created. Beside
//! them, the nonces of OAuth states and Meta's signed requests already used (each is accepted
//! once).

use super::{DbError, Owners};
use crate::ids::{FacebookUserId, UserUuid};

impl Owners {
    /// Stores a session (by the hash of its id; with the Facebook person whose login started
    /// it, if one did) and removes every expired one.
    pub async fn create_session(
        &self,
        session_hash: &str,
        user: &UserUuid,
        person: Option<&FacebookUserId>,
        expires_at_ms: i64,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query("DELETE FROM sessions WHERE expires_at_ms <= $1")
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        sqlx::query(
            "INSERT INTO sessions (session_hash, user_uuid, facebook_user_id, expires_at_ms)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(session_hash)
        .bind(user.as_str())
        .bind(person.map(FacebookUserId::as_str))
        .bind(expires_at_ms)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The user of a session that has not expired.
    pub async fn session_user(
        &self,
        session_hash: &str,
        now: i64,
    ) -> Result<Option<UserUuid>, DbError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT user_uuid FROM sessions WHERE session_hash = $1 AND expires_at_ms > $2",
        )
        .bind(session_hash)
        .bind(now)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.and_then(|(user,)| UserUuid::parse(&user).ok()))
    }

    /// Ends a session.
    pub async fn delete_session(&self, session_hash: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM sessions WHERE session_hash = $1")
            .bind(session_hash)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Records a nonce of an OAuth state as used: true the first time, false on a replay.
    /// Nonces of expired states are removed (an expired state is refused anyway).
    pub async fn use_nonce(
        &self,
        nonce: &str,
        expires_at_ms: i64,
        now: i64,
    ) -> Result<bool, DbError> {
        sqlx::query("DELETE FROM oauth_nonces WHERE expires_at_ms < $1")
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO oauth_nonces (nonce, expires_at_ms) VALUES ($1, $2)
             ON CONFLICT (nonce) DO NOTHING",
        )
        .bind(nonce)
        .bind(expires_at_ms)
        .execute(&self.db.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Forgets a recorded nonce: its use did not take effect, so the retry must not pass for a
    /// replay.
    pub async fn release_nonce(&self, nonce: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM oauth_nonces WHERE nonce = $1")
            .bind(nonce)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ids::UserUuid;
    use crate::storage::db::test_support::backends;

    #[tokio::test]
    async fn sessions_expire_and_nonces_are_used_once() {
        for (backend, db) in backends().await {
            let user = UserUuid::new_random();
            db.owners()
                .create_session("old", &user, None, 100, 50)
                .await
                .expect("create");
            db.owners()
                .create_session("new", &user, None, 1_000, 200)
                .await
                .expect("create");
            assert_eq!(
                db.owners().session_user("old", 200).await.expect("read"),
                None,
                "{backend}"
            );
            assert_eq!(
                db.owners().session_user("new", 200).await.expect("read"),
                Some(user.clone()),
                "{backend}"
            );
            assert!(
                db.owners().use_nonce("n1", 1_000, 0).await.expect("nonce"),
                "{backend}"
            );
            assert!(
                !db.owners().use_nonce("n1", 1_000, 0).await.expect("nonce"),
                "{backend}"
            );
        }
    }
}
