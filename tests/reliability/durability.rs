//! Acked means on disk, seen from the system calls of the real binary (under strace): every
//! staging commit SQLite makes is followed by a sync of its write-ahead log before the message
//! is acked (`synchronous=FULL`), and the local directory store syncs each object's file before
//! renaming it into place and syncs its folder after, before the staged rows are deleted.

use std::time::Duration;

use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind, conversation_key};
use crate::common::webhook::{message_delivery, post_signed, webhook_client};
use crate::shared_services::serial;

/// Deliveries posted one at a time, each its own staging commit.
const DELIVERIES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_commits_and_stored_objects_are_synced_to_disk() {
    let _serial = serial().await;
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let trace = pipeline.data_dir.join("syscalls.trace");
    let (mut up, urls) = pipeline
        .up_traced(&trace, "fsync,fdatasync,rename,renameat,renameat2")
        .await;
    let client = webhook_client();
    let user = "durable";
    for n in 0..DELIVERIES {
        let body = message_delivery(PAGE_ID, user, &format!("m_d_{n}"), n as i64, false);
        assert_eq!(post_signed(&client, &urls.webhook, &body).await, 200);
        // Stored before the next one: one staging commit and one object write each.
        pipeline
            .wait_for_conversation(PAGE_ID, user, n + 1, Duration::from_secs(30))
            .await;
    }
    up.stop_traced().await;
    let calls = std::fs::read_to_string(&trace).expect("trace");
    let lines: Vec<&str> = calls.lines().collect();

    // SQLite: the write-ahead log is synced at least once per staging commit.
    let wal_syncs = lines
        .iter()
        .filter(|l| {
            (l.contains("fsync(") || l.contains("fdatasync(")) && l.contains("fbsync.db-wal>")
        })
        .count();
    println!("{wal_syncs} syncs of the write-ahead log for {DELIVERIES} staging commits");
    assert!(
        wal_syncs >= DELIVERIES,
        "every staging commit syncs the write-ahead log ({wal_syncs} syncs for {DELIVERIES} commits)"
    );

    // The local store: for the conversation object, each rename of a temporary file into place
    // comes after a sync of that temporary file and before a sync of the object's folder.
    let object = pipeline.data_dir.join(conversation_key(PAGE_ID, user));
    let object = object.display().to_string();
    let folder = object.rsplit_once('/').expect("a folder").0.to_string();
    let renames: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("rename") && l.contains(&format!("\"{object}\"")))
        .map(|(i, _)| i)
        .collect();
    assert!(
        renames.len() >= DELIVERIES,
        "{} renames of the object into place",
        renames.len()
    );
    for &at in &renames {
        let temporary = lines[at]
            .split('"')
            .nth(1)
            .expect("the temporary file's name")
            .to_string();
        let synced_first = lines[..at]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&format!("{temporary}>")));
        let folder_after = lines[at..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&format!("<{folder}>")));
        assert!(
            synced_first,
            "{temporary} synced before its rename:\n{}",
            lines[at]
        );
        assert!(
            folder_after,
            "{folder} synced after the rename:\n{}",
            lines[at]
        );
    }
    pipeline.cleanup().await;
}
