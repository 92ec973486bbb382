//! The operator's commands beside the roles: `fbsync check` (every dependency, one line per
//! check, exit 0 / 1 / 2, a probe that never touches `users/`) and `fbsync backup` (a consistent
//! SQLite snapshot while the pipeline runs, tokens still sealed).

use std::time::Duration;

use crate::common::fake_graph::{Failure, FakeGraph};
use crate::common::pipeline::{DbKind, PAGE_ID, PAGE_TOKEN, Pipeline, StoreKind};
use crate::common::spaces_limits::{SpacesLimitLayer, SpacesLimits, list_keys, s3_endpoint};
use crate::common::webhook::{message_delivery, post_signed, webhook_client};

/// A pipeline whose Graph API is `fake`, with the test Page registered.
async fn pipeline_with_graph(db: DbKind, store: StoreKind, fake: &FakeGraph) -> Pipeline {
    let mut pipeline = Pipeline::new(db, store).await;
    pipeline.set("FACEBOOK_GRAPH_URL", &fake.url());
    fake.set_page(PAGE_ID, "Shop");
    pipeline.register_page(PAGE_ID).await;
    pipeline
}

/// Runs `fbsync check`: it exits with `code` and its output holds each of `lines`.
async fn check_says(pipeline: &Pipeline, code: i32, lines: &[&str]) {
    let (exit, stdout, stderr) = pipeline.run(&["check"]).await;
    assert_eq!(exit, code, "{stdout}{stderr}");
    for line in lines {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
}

/// The pipeline's bucket holds no object at all.
async fn assert_bucket_empty(pipeline: &Pipeline, why: &str) {
    let bucket = pipeline
        .bucket
        .as_deref()
        .expect("an S3 pipeline has a bucket");
    let keys = list_keys(&s3_endpoint(), bucket, "").await;
    assert!(keys.is_empty(), "{why}: {keys:?}");
}

/// Applies the migrations as an operator does before `check` (`fbsync pages list`).
async fn migrate(pipeline: &Pipeline) {
    let (code, stdout, stderr) = pipeline.run(&["pages", "list"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[tokio::test]
async fn check_passes_every_dependency_and_leaves_nothing_in_the_bucket() {
    let fake = FakeGraph::start().await;
    let pipeline =
        pipeline_with_graph(DbKind::Postgres, StoreKind::S3 { endpoint: None }, &fake).await;
    let (code, stdout, stderr) = pipeline.run(&["check"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for check in [
        "ok   configuration",
        "ok   broker",
        "ok   database: connected to postgres://",
        "migrations current",
        "ok   object store: wrote, read and deleted a probe",
        "ok   object store budgets: bucket: writes 270/s, operations 450/s",
        "per object: no PUT window",
        "ok   object store: conditional writes honoured",
        &format!("ok   graph: page {PAGE_ID}: token valid"),
    ] {
        assert!(stdout.contains(check), "{check:?} missing:\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // The probe was deleted, and nothing was ever written under users/.
    assert_bucket_empty(&pipeline, "the bucket is left as it was").await;
    assert!(
        !stdout.contains(PAGE_TOKEN) && !stderr.contains(PAGE_TOKEN),
        "no token in the output"
    );
    pipeline.cleanup().await;
}

/// A store that accepts writes its conditions forbid fails the check, with what it means; the
/// probes are deleted all the same.
#[tokio::test]
async fn check_fails_on_a_store_that_ignores_conditional_writes_and_says_what_that_means() {
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::default()).await;
    layer.set_ignore_write_conditions(true);
    let pipeline = Pipeline::new(
        DbKind::Sqlite,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    migrate(&pipeline).await;
    check_says(
        &pipeline,
        1,
        &[
            "FAIL object store: conditional writes ignored: the store accepted a second If-None-Match: * PUT and an If-Match PUT naming a wrong ETag",
            "claims alone",
            "1 check(s) failed",
        ],
    )
    .await;
    assert_bucket_empty(&pipeline, "the probes are deleted").await;
    // With conditions off, nothing is probed and the check passes, saying so.
    let mut pipeline = pipeline;
    pipeline.set("SPACES_CONDITIONAL_WRITES", "off");
    check_says(
        &pipeline,
        0,
        &["ok   object store: conditional writes not sent"],
    )
    .await;
    pipeline.cleanup().await;
}

/// The local directory has no request budgets, and `check` says so.
#[tokio::test]
async fn check_prints_no_budgets_for_the_local_directory() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    // Set in an old .env: it does not apply to a disk.
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "5");
    migrate(&pipeline).await;
    check_says(
        &pipeline,
        0,
        &[
            "ok   object store budgets: bucket: no request budget; per object: no PUT window",
            "ok   object store: conditional writes honoured",
        ],
    )
    .await;
    // Its probes leave nothing behind on the disk: no folder, no lock file.
    assert!(!pipeline.data_dir.join("_fbsync").exists());
    let locks =
        std::fs::read_dir(pipeline.data_dir.join(".locks")).map_or(0, |entries| entries.count());
    assert_eq!(locks, 0, "no lock file left");
    pipeline.cleanup().await;
}

/// A dead log shipper must not make a role unstoppable: with its stdout and stderr a closed
/// pipe, each role still stops on SIGTERM, with status 0. (Logging "shutting down" into the
/// broken pipe used to panic the task that was to start the shutdown.)
#[tokio::test]
async fn every_role_stops_on_sigterm_when_its_log_pipe_is_closed() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("INGEST_METRICS_ADDR", "127.0.0.1:0");
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, _) = pipeline.spawn_ingest().await;
    let mut worker = pipeline.spawn_worker().await;
    let mut scheduler = pipeline.spawn(&["scheduler"]);
    scheduler
        .wait_for_log("scheduler started", Duration::from_secs(30))
        .await;
    for (role, process) in [
        ("ingest", &mut ingest),
        ("worker", &mut worker),
        ("scheduler", &mut scheduler),
    ] {
        process.close_output();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = process
            .terminate_and_wait(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("{role} did not stop on SIGTERM with its log pipe closed"));
        assert!(status.success(), "{role} exited with {status}");
    }
    pipeline.cleanup().await;
}

#[tokio::test]
async fn check_names_each_failing_dependency_and_exits_1() {
    let fake = FakeGraph::start().await;
    let mut pipeline = pipeline_with_graph(DbKind::Sqlite, StoreKind::Local, &fake).await;
    fake.push_failure(PAGE_ID, Failure::TokenExpired);
    // Nothing listens on port 1.
    pipeline.set("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    pipeline.set("SPACES_ENDPOINT", "http://127.0.0.1:1");
    pipeline.set("SPACES_BUCKET", "nowhere");
    pipeline.set("SPACES_API_KEY", "test");
    pipeline.set("SPACES_API_SECRET", "test");
    let (code, stdout, stderr) = pipeline.run(&["check"]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("FAIL broker"), "{stdout}");
    assert!(stdout.contains("check AMQP_URL"), "{stdout}");
    assert!(stdout.contains("ok   database"), "{stdout}");
    assert!(stdout.contains("FAIL object store"), "{stdout}");
    assert!(
        stdout.contains(&format!("FAIL graph: page {PAGE_ID}: token rejected")),
        "{stdout}"
    );
    assert!(stdout.contains("3 check(s) failed"), "{stdout}");
    pipeline.cleanup().await;
}

#[tokio::test]
async fn check_refuses_bad_configuration_with_exit_2() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("TOKEN_ENCRYPTION_KEY", "c2hvcnQ=");
    pipeline.set("FACEBOOK_APP_SECRET", "");
    let (code, stdout, stderr) = pipeline.run(&["check"]).await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("FACEBOOK_APP_SECRET is not set"),
        "{stderr}"
    );
    assert!(
        stderr.contains("TOKEN_ENCRYPTION_KEY is malformed"),
        "{stderr}"
    );
    pipeline.cleanup().await;
}

/// Redirect URIs that are URLs, but not of the routes fbsync serves, are refused by `check`
/// (the provider would send the owner to a page that answers 404), both named in one run.
#[tokio::test]
async fn check_refuses_redirect_uris_whose_path_fbsync_does_not_serve() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    for (key, value) in [
        ("FACEBOOK_APP_ID", "123456789012345"),
        (
            "FACEBOOK_REDIRECT_URI",
            "https://shop.example/facebook/login",
        ),
        ("SHOPIFY_API_KEY", "key"),
        ("SHOPIFY_API_SECRET", "secret"),
        (
            "SHOPIFY_REDIRECT_URI",
            "https://shop.example/callback?from=shopify",
        ),
        ("STATE_TOKEN_SECRET", "a-long-enough-state-secret"),
    ] {
        pipeline.set(key, value);
    }
    let (code, stdout, stderr) = pipeline.run(&["check"]).await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    for expected in [
        "FACEBOOK_REDIRECT_URI=\"https://shop.example/facebook/login\" must end in the path /facebook/callback",
        "SHOPIFY_REDIRECT_URI=\"https://shop.example/callback?from=shopify\" must end in the path /shopify/callback",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing:\n{stderr}");
    }
    pipeline.set(
        "FACEBOOK_REDIRECT_URI",
        "https://shop.example/facebook/callback",
    );
    pipeline.set(
        "SHOPIFY_REDIRECT_URI",
        "https://shop.example/shopify/callback?x=1",
    );
    let (_, stdout, stderr) = pipeline.run(&["check"]).await;
    assert!(
        stdout.contains("ok   owner routes: Shopify OAuth and Facebook Login configured"),
        "{stdout}{stderr}"
    );
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_backup_taken_while_the_pipeline_runs_is_a_consistent_database_with_sealed_tokens() {
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.register_page(PAGE_ID).await;
    let (mut up, urls) = pipeline.up().await;
    let client = webhook_client();
    // Deliveries keep arriving while the backup is taken.
    let sender = {
        let (client, url) = (client.clone(), urls.webhook.clone());
        tokio::spawn(async move {
            for n in 0..200 {
                let body = message_delivery(PAGE_ID, "backup", &format!("m_b_{n}"), n, false);
                assert_eq!(post_signed(&client, &url, &body).await, 200);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let snapshot = pipeline.data_dir.join("snapshot.db");
    let target = snapshot.display().to_string();
    let (code, stdout, stderr) = pipeline.run(&["backup", "--to", &target]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    sender.await.expect("sender");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&snapshot)
            .expect("snapshot")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the backup is its owner's alone");
    // A backup never overwrites.
    let (again, _, refused) = pipeline.run(&["backup", "--to", &target]).await;
    assert_eq!(again, 2, "{refused}");
    assert!(refused.contains("exists"), "{refused}");

    // The snapshot is a database fbsync opens as it is: the Page is in it, its token sealed.
    let raw = std::fs::read(&snapshot).expect("snapshot");
    assert!(
        !raw.windows(PAGE_TOKEN.len())
            .any(|w| w == PAGE_TOKEN.as_bytes()),
        "the token is sealed in the backup"
    );
    let mut restored = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    restored.set("DATABASE_URL", &format!("sqlite://{}", snapshot.display()));
    let (code, listing, stderr) = restored.run(&["pages", "list", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(listing.contains(PAGE_ID), "{listing}");

    up.stop().await;
    restored.cleanup().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn a_backup_into_a_missing_folder_is_bad_input_in_one_line() {
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let target = pipeline.data_dir.join("missing/dir/x.db");
    let (code, stdout, stderr) = pipeline
        .run(&["backup", "--to", &target.display().to_string()])
        .await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("does not exist"), "{stderr}");
    assert!(!target.exists());
    pipeline.cleanup().await;
}

#[tokio::test]
async fn backup_of_postgresql_is_refused_with_pg_dump_named() {
    let pipeline = Pipeline::new(DbKind::Postgres, StoreKind::Local).await;
    let target = pipeline.data_dir.join("nope.db").display().to_string();
    let (code, _, stderr) = pipeline.run(&["backup", "--to", &target]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("pg_dump"), "{stderr}");
    pipeline.cleanup().await;
}
