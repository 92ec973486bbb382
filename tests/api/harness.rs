//! The harness itself (`tests/common/`): the Spaces limit layer in front of the real
//! S3-compatible server, and the fake Graph API's scripted answers.

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use serde_json::Value;

use crate::common::fake_graph::{CREATED_TIME, Failure, FakeGraph, page_token};
use crate::common::spaces_limits::{
    Limit, SpacesLimitLayer, SpacesLimits, create_bucket, list_keys, read_object, s3_client,
    s3_endpoint, unique_bucket,
};

/// The HTTP status and S3 error code of a failed call.
fn refusal<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> (u16, String) {
    let status = error.raw_response().map_or(0, |r| r.status().as_u16());
    (status, error.code().unwrap_or_default().to_string())
}

async fn put(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: &str,
) -> Result<(), (u16, String)> {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body.as_bytes().to_vec()))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| refusal(&e))
}

fn slow_down() -> Result<(), (u16, String)> {
    Err((503, "SlowDown".to_string()))
}

#[tokio::test]
async fn a_sixth_put_to_one_object_is_refused_and_reads_go_through() {
    let bucket = unique_bucket();
    create_bucket(&s3_endpoint(), &bucket).await;
    create_bucket(&s3_endpoint(), &bucket).await; // Creating it again is fine.
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::before_2026()).await;
    let client = s3_client(&layer.endpoint());
    let key = "users/u1/facebook_messenger/p1/conversations/psid-1.json";

    for i in 1..=5 {
        assert_eq!(put(&client, &bucket, key, &format!("[{i}]")).await, Ok(()));
    }
    assert_eq!(put(&client, &bucket, key, "[6]").await, slow_down());
    assert_eq!(layer.throttled(), 1);
    assert_eq!(layer.violations()[0].limit, Limit::ObjectPuts);
    assert_eq!(layer.puts_for("conversations/psid-1.json"), 5);
    assert_eq!(layer.forwarded(), 5);

    // Another object has its own budget.
    let other = "users/u1/facebook_messenger/p1/conversations/psid-2.json";
    assert_eq!(put(&client, &bucket, other, "[1]").await, Ok(()));
    assert_eq!(layer.puts_for("psid-2.json"), 1);

    // Reads through the layer see the last accepted write.
    let endpoint = layer.endpoint();
    assert_eq!(
        read_object(&endpoint, &bucket, key).await,
        Some(b"[5]".to_vec())
    );
    let head = client
        .head_object()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .expect("head");
    assert_eq!(head.content_length(), Some(3));
    assert_eq!(
        read_object(&endpoint, &bucket, "users/none.json").await,
        None
    );
    assert_eq!(
        list_keys(&endpoint, &bucket, "users/u1/").await,
        vec![key.to_string(), other.to_string()]
    );
    assert_eq!(layer.forwarded(), 10);
    assert_eq!(layer.throttled(), 1);
}

#[tokio::test]
async fn the_object_window_slides() {
    let bucket = unique_bucket();
    create_bucket(&s3_endpoint(), &bucket).await;
    let limits = SpacesLimits {
        object_puts: 2,
        object_window: Duration::from_secs(1),
        ..SpacesLimits::default()
    };
    let layer = SpacesLimitLayer::start(&s3_endpoint(), limits).await;
    let client = s3_client(&layer.endpoint());
    assert_eq!(put(&client, &bucket, "k", "1").await, Ok(()));
    assert_eq!(put(&client, &bucket, "k", "2").await, Ok(()));
    assert_eq!(put(&client, &bucket, "k", "3").await, slow_down());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(put(&client, &bucket, "k", "4").await, Ok(()));
    assert_eq!(layer.puts_for("/k"), 3);
    assert_eq!(layer.throttled(), 1);
    assert_eq!(
        read_object(&s3_endpoint(), &bucket, "k").await,
        Some(b"4".to_vec())
    );
}

#[tokio::test]
async fn bucket_write_and_operation_rates_are_enforced_per_second() {
    let bucket = unique_bucket();
    create_bucket(&s3_endpoint(), &bucket).await;
    let direct = s3_client(&s3_endpoint());
    assert_eq!(put(&direct, &bucket, "seed", "seed").await, Ok(()));
    let limits = SpacesLimits {
        bucket_writes_per_second: 2,
        bucket_operations_per_second: 4,
        ..SpacesLimits::default()
    };
    let layer = SpacesLimitLayer::start(&s3_endpoint(), limits).await;
    let client = s3_client(&layer.endpoint());
    let started = std::time::Instant::now();

    // LIST and PUT are writes: the third write in the second is refused.
    let list = client.list_objects_v2().bucket(&bucket).send().await;
    assert_eq!(list.expect("list").key_count(), Some(1));
    assert_eq!(put(&client, &bucket, "a", "a").await, Ok(()));
    let delete = client.delete_object().bucket(&bucket).key("a").send().await;
    assert_eq!(
        refusal(&delete.expect_err("refused")),
        (503, "SlowDown".into())
    );
    // Reads still pass until four operations in all.
    let get = client.get_object().bucket(&bucket).key("seed").send().await;
    get.expect("third operation");
    let head = client
        .head_object()
        .bucket(&bucket)
        .key("seed")
        .send()
        .await;
    head.expect("fourth operation");
    let get = client.get_object().bucket(&bucket).key("seed").send().await;
    assert_eq!(
        refusal(&get.expect_err("refused")),
        (503, "SlowDown".into())
    );
    // Another bucket has its own budget.
    create_bucket(&layer.endpoint(), &unique_bucket()).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "too slow to test a one-second window: {:?}",
        started.elapsed()
    );

    let limits: Vec<Limit> = layer.violations().iter().map(|v| v.limit).collect();
    assert_eq!(limits, [Limit::BucketWrites, Limit::BucketOperations]);
    assert_eq!(layer.forwarded(), 5);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let delete = client.delete_object().bucket(&bucket).key("a").send().await;
    delete.expect("a new second");
    assert_eq!(list_keys(&s3_endpoint(), &bucket, "").await, ["seed"]);
}

#[tokio::test]
async fn a_storage_outage_refuses_everything_without_forwarding() {
    let bucket = unique_bucket();
    create_bucket(&s3_endpoint(), &bucket).await;
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::default()).await;
    let client = s3_client(&layer.endpoint());
    assert_eq!(put(&client, &bucket, "k", "before").await, Ok(()));

    layer.set_down(true);
    let down = Err((503, "ServiceUnavailable".to_string()));
    assert_eq!(put(&client, &bucket, "k", "during").await, down);
    let get = client.get_object().bucket(&bucket).key("k").send().await;
    assert_eq!(
        refusal(&get.expect_err("down")),
        (503, "ServiceUnavailable".into())
    );
    assert_eq!(layer.refused_while_down(), 2);
    assert_eq!(layer.forwarded(), 1);
    assert_eq!(layer.throttled(), 0);

    layer.set_down(false);
    assert_eq!(
        read_object(&layer.endpoint(), &bucket, "k").await,
        Some(b"before".to_vec())
    );
    assert_eq!(layer.puts_for("k"), 1);
}

/// Like Spaces, the layer refuses the flexible checksum the SDK still adds to `DeleteObjects`
/// (with checksums "when required"), while a single DELETE, which needs none, goes through; and
/// it can play a store that ignores conditional writes.
#[tokio::test]
async fn checksummed_requests_are_refused_and_conditions_can_be_ignored() {
    use aws_sdk_s3::types::{Delete, ObjectIdentifier};
    let bucket = unique_bucket();
    create_bucket(&s3_endpoint(), &bucket).await;
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::default()).await;
    let client = s3_client(&layer.endpoint());
    assert_eq!(put(&client, &bucket, "a", "1").await, Ok(()));
    let batch = Delete::builder()
        .objects(ObjectIdentifier::builder().key("a").build().expect("key"))
        .build()
        .expect("delete");
    let refused = client
        .delete_objects()
        .bucket(&bucket)
        .delete(batch)
        .send()
        .await
        .expect_err("a checksummed request is refused");
    assert_eq!(refusal(&refused), (400, "InvalidArgument".into()));
    assert_eq!(layer.checksum_refusals(), 1);
    client
        .delete_object()
        .bucket(&bucket)
        .key("a")
        .send()
        .await
        .expect("a single delete needs no checksum");
    assert_eq!(layer.deleted(), [format!("{bucket}/a")]);

    // Conditions honoured, then ignored.
    let conditional = |condition: &'static str| {
        client
            .put_object()
            .bucket(&bucket)
            .key("b")
            .if_none_match(condition)
            .body(ByteStream::from_static(b"x"))
            .send()
    };
    conditional("*").await.expect("new");
    let second = conditional("*").await.expect_err("exists");
    assert_eq!(refusal(&second).0, 412);
    layer.set_ignore_write_conditions(true);
    conditional("*").await.expect("the condition is dropped");
}

async fn graph_get(url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let answer = reqwest::Client::new()
        .get(url)
        .query(&[("fields", "id,name,picture")])
        .bearer_auth("user-token")
        .send()
        .await
        .expect("fake graph answers");
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    (status, headers, answer.json().await.expect("JSON"))
}

/// `estimated_time_to_regain_access` for `page_id` in `X-Business-Use-Case-Usage`.
fn regain_minutes(headers: &reqwest::header::HeaderMap, page_id: &str) -> u64 {
    let usage = headers["x-business-use-case-usage"]
        .to_str()
        .expect("ASCII");
    let usage: Value = serde_json::from_str(usage).expect("usage JSON");
    usage[page_id][0]["estimated_time_to_regain_access"]
        .as_u64()
        .expect("minutes")
}

#[tokio::test]
async fn scripted_graph_failures_come_in_order_then_the_page() {
    let graph = FakeGraph::start().await;
    graph.set_page("1001", "Shop");
    graph.set_page("2002", "Other shop");
    for failure in [
        Failure::TokenExpired,
        Failure::RateLimited {
            code: 4,
            regain_minutes: 3,
        },
        Failure::RateLimited {
            code: 80006,
            regain_minutes: 0,
        },
        Failure::ServerError,
    ] {
        graph.push_failure("1001", failure);
    }
    let page = format!("{}/1001", graph.url());

    let (status, _, body) = graph_get(&page).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], 190);
    assert_eq!(body["error"]["error_subcode"], 463);
    assert_eq!(body["error"]["type"], "OAuthException");

    // Another Page's calls do not consume 1001's script.
    let (status, _, body) = graph_get(&format!("{}/2002", graph.url())).await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Other shop")));

    let (status, headers, body) = graph_get(&page).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (403, Some(4)));
    assert_eq!(
        body["error"]["message"],
        "(#4) Application request limit reached"
    );
    assert_eq!(regain_minutes(&headers, "1001"), 3);

    let (status, headers, body) = graph_get(&page).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (400, Some(80006)));
    assert_eq!(regain_minutes(&headers, "1001"), 0);

    let (status, _, body) = graph_get(&page).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (500, Some(2)));
    assert_eq!(body["error"]["is_transient"], true);
    assert_eq!(graph.pending_failures("1001"), 0);

    let (status, _, body) = graph_get(&page).await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], "1001");
    assert_eq!(body["name"], "Shop");
    assert_eq!(body["created_time"], CREATED_TIME);
    assert!(body["picture"]["data"]["url"].is_string());
    assert_eq!(body["access_token"], page_token("1001"));
    assert_eq!(Some(body), graph.page("1001"));

    graph.set_page("1001", "Shop, renamed");
    let (_, _, body) = graph_get(&page).await;
    assert_eq!(body["name"], "Shop, renamed");
    assert_eq!(body["fan_count"], 1234);

    let times = graph.calls_for("1001");
    assert_eq!(times.len(), 6);
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]));
    assert_eq!(graph.calls_for("2002").len(), 1);
    let calls = graph.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.token.as_deref() == Some("user-token"))
    );
    assert_eq!(calls[0].path, "/1001");
}

#[tokio::test]
async fn the_fake_graph_pages_conversations_and_messages_and_withholds_old_details() {
    let graph = FakeGraph::start().await;
    graph.set_page("1001", "Shop");
    // Conversations newest first, paged at both levels; old messages without details.
    graph.set_paging(1, 2);
    graph.add_conversation("1001", "u1", 3, 1_000_000_000_000);
    let messages = graph.add_conversation("1001", "u2", 22, 1_100_000_000_000);
    let (_, _, body) = graph_get(&format!("{}/1001/conversations", graph.url())).await;
    assert_eq!(body["data"][0]["id"], "t_1001_1", "the newest update first");
    assert_eq!(body["data"][0]["updated_time"], "2004-11-09T11:33:41+0000");
    let nested = &body["data"][0]["messages"];
    assert_eq!(nested["data"][0]["id"], messages[21].id.as_str());
    assert_eq!(
        nested["data"][0]["from"]["id"], "1001",
        "the Page's own reply"
    );
    assert_eq!(nested["data"][1]["from"]["id"], "u2");
    let next = body["paging"]["next"].as_str().expect("a second page");
    assert!(
        next.contains("access_token="),
        "Facebook writes the token into links"
    );
    let (_, _, second) = graph_get(next).await;
    assert_eq!(second["data"][0]["id"], "t_1001_0");
    assert!(second["paging"]["next"].is_null());
    let (_, _, oldest) = graph_get(&format!(
        "{}/t_1001_1/messages?after=20&limit=2",
        graph.url()
    ))
    .await;
    assert_eq!(oldest["data"][0]["id"], messages[1].id.as_str());
    assert!(
        oldest["data"][0]["from"].is_null(),
        "no details beyond the 20 most recent"
    );
    let (status, _, refused) = graph_get(&format!("{}/{}", graph.url(), messages[0].id)).await;
    assert_eq!(
        (status, refused["error"]["code"].as_u64()),
        (400, Some(100))
    );
    let (status, _, detailed) = graph_get(&format!("{}/{}", graph.url(), messages[5].id)).await;
    assert_eq!(
        (status, detailed["message"].as_str()),
        (200, Some(messages[5].text.as_str()))
    );
}

#[tokio::test]
async fn the_fake_graph_answers_versions_conversations_and_errors() {
    let graph = FakeGraph::start().await;
    graph.set_page("1001", "Shop");

    let (status, _, body) = graph_get(&format!("{}/v25.0/1001", graph.url())).await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Shop")));

    let (status, _, body) = graph_get(&format!("{}/1001/conversations", graph.url())).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], serde_json::json!([]));
    assert!(body["paging"]["next"].is_null());

    let (status, _, body) = graph_get(&format!("{}/3003", graph.url())).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (400, Some(100)));

    let anonymous = reqwest::get(format!("{}/1001", graph.url()))
        .await
        .expect("answer");
    assert_eq!(anonymous.status(), 400);
    let body: Value = anonymous.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], 104);
    let by_parameter = reqwest::get(format!("{}/1001?access_token=t2", graph.url()))
        .await
        .expect("answer");
    assert_eq!(by_parameter.status(), 200);

    for (code, status) in [(4, 403), (17, 403), (32, 400), (613, 400), (80006, 400)] {
        graph.push_failure(
            "1001",
            Failure::RateLimited {
                code,
                regain_minutes: 1,
            },
        );
        let (answered, headers, body) = graph_get(&format!("{}/1001", graph.url())).await;
        assert_eq!(answered, status, "code {code}");
        assert_eq!(body["error"]["code"], code);
        assert_eq!(regain_minutes(&headers, "1001"), 1);
    }
    assert_eq!(graph.calls_for("1001").len(), 9);
    let tokens: Vec<Option<String>> = graph.calls().into_iter().map(|c| c.token).collect();
    assert_eq!(tokens[3], None);
    assert_eq!(tokens[4].as_deref(), Some("t2"));
}
