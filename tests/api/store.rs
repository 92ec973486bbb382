//! The object store interface against the real S3 test server and a local directory:
//! round trips, missing objects, and conditional writes that refuse a lost update.

use std::collections::HashMap;
use std::sync::Arc;

use fbsync_shared::config::Settings;
use fbsync_shared::storage::object_store::{
    ObjectKey, ObjectStore, StoreError, WriteCondition, open_store,
};

use crate::common::spaces_limits::{create_bucket, s3_endpoint, unique_bucket};

async fn s3_store() -> Arc<dyn ObjectStore> {
    let bucket = unique_bucket();
    create_bucket(&s3_endpoint(), &bucket).await;
    let vars: HashMap<String, String> = [
        ("SPACES_ENDPOINT", s3_endpoint()),
        ("SPACES_BUCKET", bucket),
        ("SPACES_REGION", "us-east-1".into()),
        ("SPACES_API_KEY", "test".into()),
        ("SPACES_API_SECRET", "test".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    open_store(
        &Settings::from_map(&vars)
            .expect("settings")
            .store_location()
            .expect("S3 store"),
    )
}

fn local_store() -> Arc<dyn ObjectStore> {
    let dir = std::env::temp_dir().join(format!("fbsync-store-{}", uuid::Uuid::new_v4().simple()));
    let vars: HashMap<String, String> =
        [("DATA_DIR".to_string(), dir.display().to_string())].into();
    open_store(
        &Settings::from_map(&vars)
            .expect("settings")
            .store_location()
            .expect("local store"),
    )
}

async fn conditional_writes_refuse_lost_updates(store: Arc<dyn ObjectStore>) {
    let key = &ObjectKey::from_text("users/u/facebook_messenger/p/conversations/c.json");
    assert_eq!(store.get(key).await.expect("get"), None);
    store
        .put(key, "[1]".into(), &WriteCondition::Absent)
        .await
        .expect("first write");
    let first = store.get(key).await.expect("get").expect("exists");
    assert_eq!(first.body.as_ref(), b"[1]");

    // A second writer that also read "absent" must not overwrite.
    let refused = store.put(key, "[2]".into(), &WriteCondition::Absent).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");

    let after_read = WriteCondition::after_read(Some(&first));
    store
        .put(key, "[1,2]".into(), &after_read)
        .await
        .expect("write after read");
    // The same stale version again: refused.
    let stale = store.put(key, "[1,3]".into(), &after_read).await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    assert_eq!(
        store
            .get(key)
            .await
            .expect("get")
            .expect("exists")
            .body
            .as_ref(),
        b"[1,2]"
    );
}

#[tokio::test]
async fn s3_conditional_writes_refuse_lost_updates() {
    conditional_writes_refuse_lost_updates(s3_store().await).await;
}

#[tokio::test]
async fn local_conditional_writes_refuse_lost_updates() {
    conditional_writes_refuse_lost_updates(local_store()).await;
}

#[tokio::test]
async fn local_store_refuses_keys_that_leave_its_directory() {
    let store = local_store();
    let refused = store
        .put(
            &ObjectKey::from_text("users/../../etc/x.json"),
            "[]".into(),
            &WriteCondition::Absent,
        )
        .await;
    assert!(matches!(refused, Err(StoreError::Permanent(_))));
}
