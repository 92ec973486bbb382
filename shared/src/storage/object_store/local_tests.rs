//! The local store: listings, deletions and racing conditional writes.

use super::*;
use crate::storage::object_key::{KeyPrefix, ObjectKey};
use crate::storage::object_store::Listing;

fn listed(listing: &Listing) -> Vec<&str> {
    listing.keys.iter().map(ObjectKey::as_str).collect()
}

#[tokio::test]
async fn the_local_store_lists_a_prefix_and_deletes() {
    let root = std::env::temp_dir().join(format!("fbsync-list-{}", uuid::Uuid::new_v4()));
    let store = LocalStore { root: root.clone() };
    for key in ["users/a/x/1.json", "users/a/2.json", "users/b/3.json"] {
        store
            .put(
                &ObjectKey::from_text(key),
                Bytes::from_static(b"[]"),
                &WriteCondition::Absent,
            )
            .await
            .expect("put");
    }
    let listing = store
        .list(&KeyPrefix::from_text("users/a/"), None)
        .await
        .expect("list");
    assert_eq!(listed(&listing), ["users/a/2.json", "users/a/x/1.json"]);
    assert_eq!(listing.next, None);
    store
        .delete(&ObjectKey::from_text("users/a/2.json"))
        .await
        .expect("delete");
    let listing = store
        .list(&KeyPrefix::from_text("users/a/"), None)
        .await
        .expect("list");
    assert_eq!(listed(&listing), ["users/a/x/1.json"]);
    assert!(
        store
            .list(&KeyPrefix::from_text("users/c/"), None)
            .await
            .expect("list")
            .keys
            .is_empty()
    );
    let _ = std::fs::remove_dir_all(root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conditional_writes_to_the_local_store_let_exactly_one_through() {
    let root = std::env::temp_dir().join(format!("fbsync-lock-{}", uuid::Uuid::new_v4()));
    let store = std::sync::Arc::new(LocalStore { root: root.clone() });
    for round in 0..5 {
        let key = ObjectKey::from_text(&format!(
            "users/u/facebook_messenger/1/conversations/{round}.json"
        ));
        let writers: Vec<_> = (0..16)
            .map(|writer| {
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let body = Bytes::from(format!("[{writer}]"));
                    store.put(&key, body, &WriteCondition::Absent).await
                })
            })
            .collect();
        let mut written = 0;
        for writer in writers {
            match writer.await.expect("task") {
                Ok(_) => written += 1,
                Err(StoreError::Conflict) => {}
                Err(e) => panic!("unexpected failure: {e}"),
            }
        }
        assert_eq!(written, 1, "round {round}: exactly one creator wins");
    }
    let _ = std::fs::remove_dir_all(root);
}

/// `fbsync check` and every worker at start write a probe and delete it: on a local directory
/// it left its lock file and an empty `_fbsync/probe/` folder behind each time.
#[tokio::test]
async fn a_deleted_probe_leaves_no_folder_or_lock_file_behind() {
    let root = std::env::temp_dir().join(format!("fbsync-probe-{}", uuid::Uuid::new_v4()));
    let store = LocalStore { root: root.clone() };
    let kept = ObjectKey::from_text("users/a/kept.json");
    for key in [&kept, &ObjectKey::probe()] {
        store
            .put(key, Bytes::from_static(b"{}"), &WriteCondition::Absent)
            .await
            .expect("put");
    }
    let probe = ObjectKey::probe();
    store
        .put(&probe, Bytes::from_static(b"{}"), &WriteCondition::Absent)
        .await
        .expect("put");
    store.delete(&probe).await.expect("delete");
    assert!(
        root.join("_fbsync/probe").exists(),
        "a folder another probe still holds stays"
    );
    let listing = store
        .list(&KeyPrefix::from_text("_fbsync/"), None)
        .await
        .expect("list");
    for key in listing.keys.clone() {
        store.delete(&key).await.expect("delete");
    }
    assert!(!root.join("_fbsync").exists(), "no empty probe folder left");
    let locks: Vec<_> = std::fs::read_dir(root.join(".locks"))
        .expect("locks")
        .collect();
    assert_eq!(locks.len(), 1, "only the kept object's lock file stays");
    assert!(root.join("users/a/kept.json").exists());
    let _ = std::fs::remove_dir_all(&root);
}
