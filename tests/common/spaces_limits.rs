//! DigitalOcean Spaces' limits in front of the S3-compatible test server: a reverse proxy that
//! forwards path-style requests (`PUT /bucket/key`) to the real server and answers
//! `503 SlowDown` beyond Spaces' budgets, as Spaces does:
//! - per bucket: W writes (PUT, POST, COPY, DELETE, and LIST = GET on the bucket root) and O
//!   requests of any kind within a sliding second (300 and 500 by default: DigitalOcean's
//!   limits page as last edited 13 January 2026, read 2026-12-04);
//! - per object, when set: N PUT or COPY requests within a sliding window (until 2025: 5 per
//!   300 s, with 150 writes and 240 requests a second: [`SpacesLimits::before_2026`]).
//!
//! Like Spaces, it refuses (400) a request that carries a flexible checksum (`x-amz-checksum-*`,
//! `x-amz-sdk-checksum-algorithm`), which the SDK adds to `DeleteObjects`. It can also play a
//! store that ignores conditional writes (`set_ignore_write_conditions`: `If-Match` and
//! `If-None-Match` are dropped before forwarding) and a storage outage (`set_down`).
//!
//! Refused requests do not use up any budget; they are counted as throttled (or as checksum
//! refusals). Bodies are buffered, not streamed.
//!
//! Also here: an S3 client configured like the app's, and helpers that create a bucket, read an
//! object and list keys.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;

/// The S3-compatible server the tests use (moto by default).
pub fn s3_endpoint() -> String {
    std::env::var("FBSYNC_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5055".into())
}

/// A bucket name no other test uses.
pub fn unique_bucket() -> String {
    format!("fbsync-test-{}", uuid::Uuid::new_v4().simple())
}

/// Spaces' budgets; the defaults are DigitalOcean's as of 13 January 2026 (for the oldest
/// buckets; newer ones allow more).
#[derive(Debug, Clone, Copy)]
pub struct SpacesLimits {
    /// PUT or COPY requests accepted per object within `object_window`; 0: no such window.
    pub object_puts: usize,
    /// The sliding window of the per-object budget.
    pub object_window: Duration,
    /// Write requests (PUT, POST, COPY, DELETE, LIST) accepted per bucket per sliding second.
    pub bucket_writes_per_second: usize,
    /// Requests of any kind accepted per bucket per sliding second.
    pub bucket_operations_per_second: usize,
}

impl Default for SpacesLimits {
    fn default() -> Self {
        Self {
            object_puts: 0,
            object_window: Duration::from_secs(300),
            bucket_writes_per_second: 300,
            bucket_operations_per_second: 500,
        }
    }
}

impl SpacesLimits {
    /// Spaces' limits as documented until 2025: 5 PUTs per object in any 300 s, 150 writes and
    /// 240 requests a second per bucket.
    #[allow(dead_code)] // Not every target tests the old limits.
    pub fn before_2026() -> Self {
        Self {
            object_puts: 5,
            object_window: Duration::from_secs(300),
            bucket_writes_per_second: 150,
            bucket_operations_per_second: 240,
        }
    }
}

/// Which budget a refused request was over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ObjectPuts,
    BucketWrites,
    BucketOperations,
}

/// One request answered `503 SlowDown`.
#[derive(Debug, Clone)]
#[allow(dead_code)] // Fields only the failure messages show (through Debug) are not "read".
pub struct Violation {
    /// The budget it was over.
    pub limit: Limit,
    /// The request's method.
    pub method: Method,
    /// The request's path, `/bucket/key`.
    pub path: String,
    /// When it was refused.
    pub at: Instant,
}

/// The running proxy; it stops when dropped.
pub struct SpacesLimitLayer {
    /// Where the proxy listens.
    addr: SocketAddr,
    /// What the request handlers share with the test.
    state: Arc<LayerState>,
    /// The accept loop.
    server: JoinHandle<()>,
}

struct LayerState {
    /// Base URL of the real server, without a trailing slash.
    upstream: String,
    /// The budgets enforced.
    limits: SpacesLimits,
    /// The client that forwards requests.
    client: reqwest::Client,
    /// When set, every request is answered 503 ServiceUnavailable and nothing is forwarded.
    down: AtomicBool,
    /// When set, `If-Match` and `If-None-Match` are dropped before forwarding: a store that
    /// ignores conditional writes.
    ignore_write_conditions: AtomicBool,
    /// How long the answer to each admitted request is held back: a store that answers slowly
    /// (the request is counted in its windows and carried out when it arrives).
    delay: Mutex<std::ops::Range<Duration>>,
    /// Windows and counters, updated together.
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    /// Accepted PUT/COPY times per `bucket/key`, within the object window.
    object_puts: HashMap<String, VecDeque<Instant>>,
    /// Accepted write times per bucket, within the last second.
    bucket_writes: HashMap<String, VecDeque<Instant>>,
    /// Accepted request times per bucket, within the last second.
    bucket_operations: HashMap<String, VecDeque<Instant>>,
    /// PUT/COPY requests forwarded per `bucket/key`, ever.
    puts: HashMap<String, u64>,
    /// GET requests of an object that arrived, per `bucket/key`, ever.
    gets: HashMap<String, u64>,
    /// LIST requests (GET on the bucket root) that arrived, ever.
    lists: u64,
    /// Requests forwarded to the real server.
    forwarded: u64,
    /// Requests answered 503 SlowDown.
    violations: Vec<Violation>,
    /// Requests answered 503 ServiceUnavailable while down.
    refused_while_down: u64,
    /// Requests refused (400) for carrying a flexible checksum, as Spaces refuses them.
    checksum_refusals: u64,
    /// `bucket/key` of every DELETE of one object that was forwarded, in order.
    deleted: Vec<String>,
    /// Every admitted request, in arrival order: its wall-clock arrival time in ms since the
    /// epoch and whether it is a write (PUT, POST, DELETE, LIST).
    arrivals: Vec<(i64, bool)>,
}

/// What a request does, as far as the budgets care.
struct Target {
    /// The bucket, unless the request is for the service (`GET /`).
    bucket: Option<String>,
    /// `bucket/key` for an object PUT or COPY.
    object_put: Option<String>,
    /// PUT, POST, COPY, DELETE, or LIST.
    write: bool,
}

impl Target {
    fn of(method: &Method, path: &str) -> Self {
        let path = percent_decode(path.trim_start_matches('/'));
        let (bucket, key) = match path.split_once('/') {
            Some((bucket, key)) => (bucket.to_string(), key.to_string()),
            None => (path.clone(), String::new()),
        };
        if bucket.is_empty() {
            return Self {
                bucket: None,
                object_put: None,
                write: false,
            };
        }
        let list = *method == Method::GET && key.is_empty();
        let write = list || [Method::PUT, Method::POST, Method::DELETE].contains(method);
        let object_put =
            (*method == Method::PUT && !key.is_empty()).then(|| format!("{bucket}/{key}"));
        Self {
            bucket: Some(bucket),
            object_put,
            write,
        }
    }
}

/// Drops the times that left the window; true when the window still has room.
fn has_room(window: &mut VecDeque<Instant>, length: Duration, budget: usize, now: Instant) -> bool {
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= length)
    {
        window.pop_front();
    }
    window.len() < budget
}

impl Counters {
    /// Takes the request into every window it belongs to, or says which budget it is over.
    fn admit(&mut self, limits: &SpacesLimits, target: &Target, now: Instant) -> Result<(), Limit> {
        let second = Duration::from_secs(1);
        if let Some(object) = &target.object_put
            && limits.object_puts > 0
        {
            let window = self.object_puts.entry(object.clone()).or_default();
            if !has_room(window, limits.object_window, limits.object_puts, now) {
                return Err(Limit::ObjectPuts);
            }
        }
        if let Some(bucket) = &target.bucket {
            let writes = self.bucket_writes.entry(bucket.clone()).or_default();
            if target.write && !has_room(writes, second, limits.bucket_writes_per_second, now) {
                return Err(Limit::BucketWrites);
            }
            let operations = self.bucket_operations.entry(bucket.clone()).or_default();
            if !has_room(operations, second, limits.bucket_operations_per_second, now) {
                return Err(Limit::BucketOperations);
            }
        }
        if let Some(object) = &target.object_put {
            if limits.object_puts > 0 {
                self.object_puts
                    .entry(object.clone())
                    .or_default()
                    .push_back(now);
            }
            *self.puts.entry(object.clone()).or_default() += 1;
        }
        if let Some(bucket) = &target.bucket {
            if target.write {
                self.bucket_writes
                    .entry(bucket.clone())
                    .or_default()
                    .push_back(now);
            }
            self.bucket_operations
                .entry(bucket.clone())
                .or_default()
                .push_back(now);
        }
        self.forwarded += 1;
        Ok(())
    }
}

impl SpacesLimitLayer {
    /// Starts the proxy on 127.0.0.1:0 in front of `upstream` (e.g. [`s3_endpoint`]).
    pub async fn start(upstream: &str, limits: SpacesLimits) -> Self {
        let state = Arc::new(LayerState {
            upstream: upstream.trim_end_matches('/').to_string(),
            limits,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .expect("a plain HTTP client always builds"),
            down: AtomicBool::new(false),
            ignore_write_conditions: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO..Duration::ZERO),
            counters: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let (addr, server) = super::serve_on_loopback(app).await;
        Self {
            addr,
            state,
            server,
        }
    }

    /// The endpoint the app should use as SPACES_ENDPOINT: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered 503 SlowDown.
    pub fn throttled(&self) -> u64 {
        self.counters().violations.len() as u64
    }

    /// Every request answered 503 SlowDown, and why.
    pub fn violations(&self) -> Vec<Violation> {
        self.counters().violations.clone()
    }

    /// Requests forwarded to the real server (whatever it answered).
    pub fn forwarded(&self) -> u64 {
        self.counters().forwarded
    }

    /// PUT/COPY requests forwarded to objects whose `bucket/key` ends with `key_suffix`.
    #[allow(dead_code)] // Used by the api target only.
    pub fn puts_for(&self, key_suffix: &str) -> u64 {
        self.counters()
            .puts
            .iter()
            .filter(|(object, _)| object.ends_with(key_suffix))
            .map(|(_, count)| count)
            .sum()
    }

    /// GET requests that arrived for objects whose `bucket/key` ends with `key_suffix`.
    pub fn gets_for(&self, key_suffix: &str) -> u64 {
        self.counters()
            .gets
            .iter()
            .filter(|(object, _)| object.ends_with(key_suffix))
            .map(|(_, count)| count)
            .sum()
    }

    /// LIST requests that arrived.
    #[allow(dead_code)] // Used by the api target only.
    pub fn lists(&self) -> u64 {
        self.counters().lists
    }

    /// Every admitted request so far, in arrival order: when it arrived (wall clock, ms since
    /// the epoch, comparable with the app's budget windows) and whether it is a write (PUT,
    /// POST, DELETE, LIST). Refused requests are not included.
    #[allow(dead_code)] // Used by the reliability target only.
    pub fn arrivals(&self) -> Vec<(i64, bool)> {
        self.counters().arrivals.clone()
    }

    /// The answer to every request admitted from now on is held back `delay` (a slow store).
    #[allow(dead_code)] // Not every target slows the store down.
    pub fn set_delay(&self, delay: Duration) {
        self.set_delay_between(delay..delay);
    }

    /// The answer to every request admitted from now on is held back a random time in `delays`
    /// (a store whose answers come back unevenly).
    #[allow(dead_code)] // Not every target slows the store down.
    pub fn set_delay_between(&self, delays: std::ops::Range<Duration>) {
        *self.state.delay.lock().expect("delay lock") = delays;
    }

    /// While down, every request is answered 503 ServiceUnavailable and nothing is forwarded.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Requests answered 503 ServiceUnavailable while down.
    pub fn refused_while_down(&self) -> u64 {
        self.counters().refused_while_down
    }

    /// While set, conditional writes are accepted as plain ones (their `If-Match` and
    /// `If-None-Match` dropped): a store that ignores them.
    #[allow(dead_code)] // Used by the api target only.
    pub fn set_ignore_write_conditions(&self, ignore: bool) {
        self.state
            .ignore_write_conditions
            .store(ignore, Ordering::SeqCst);
    }

    /// Requests refused for carrying a flexible checksum.
    #[allow(dead_code)] // Used by the api target only.
    pub fn checksum_refusals(&self) -> u64 {
        self.counters().checksum_refusals
    }

    /// `bucket/key` of every DELETE of one object that was forwarded, in order.
    #[allow(dead_code)] // Used by the api target only.
    pub fn deleted(&self) -> Vec<String> {
        self.counters().deleted.clone()
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.state.counters.lock().expect("counters lock")
    }
}

impl Drop for SpacesLimitLayer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Headers that belong to one connection, not to the request or answer.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    for name in HOP_BY_HOP {
        kept.remove(name);
    }
    kept
}

/// An S3 error answer.
fn s3_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

async fn handle(State(state): State<Arc<LayerState>>, request: Request) -> Response {
    if state.down.load(Ordering::SeqCst) {
        state
            .counters
            .lock()
            .expect("counters lock")
            .refused_while_down += 1;
        return s3_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "Service is unable to handle request.",
        );
    }
    let (mut parts, body) = request.into_parts();
    if carries_flexible_checksum(&parts.headers) {
        state
            .counters
            .lock()
            .expect("counters lock")
            .checksum_refusals += 1;
        return s3_error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "x-amz-checksum and x-amz-sdk-checksum-algorithm are not supported.",
        );
    }
    if state.ignore_write_conditions.load(Ordering::SeqCst) && parts.method == Method::PUT {
        parts.headers.remove(header::IF_MATCH);
        parts.headers.remove(header::IF_NONE_MATCH);
    }
    let target = Target::of(&parts.method, parts.uri.path());
    let refused = {
        let mut counters = state.counters.lock().expect("counters lock");
        let now = Instant::now();
        if parts.method == Method::GET
            && let Some(object) = object_of(parts.uri.path())
        {
            *counters.gets.entry(object).or_default() += 1;
        } else if parts.method == Method::GET && target.write {
            counters.lists += 1;
        }
        match counters.admit(&state.limits, &target, now) {
            Ok(()) => {
                if parts.method == Method::DELETE
                    && let Some(object) = object_of(parts.uri.path())
                {
                    counters.deleted.push(object);
                }
                counters
                    .arrivals
                    .push((chrono::Utc::now().timestamp_millis(), target.write));
                false
            }
            Err(limit) => {
                let path = parts.uri.path().to_string();
                let method = parts.method.clone();
                counters.violations.push(Violation {
                    limit,
                    method,
                    path,
                    at: now,
                });
                true
            }
        }
    };
    if refused {
        return s3_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            "Please reduce your request rate.",
        );
    }
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // The Host header goes along unchanged, so signatures stay valid.
    let sent = state
        .client
        .request(parts.method, format!("{}{path_and_query}", state.upstream))
        .headers(end_to_end(&parts.headers))
        .body(body)
        .send()
        .await;
    let answer = match sent {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("upstream: {e}")).into_response(),
    };
    let status = answer.status();
    let headers = end_to_end(answer.headers());
    // A slow store: the request was counted and carried out on arrival; its answer is late.
    let delays = state.delay.lock().expect("delay lock").clone();
    let delay = if delays.is_empty() {
        delays.start
    } else {
        rand::random_range(delays)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match answer.bytes().await {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("upstream body: {e}")).into_response(),
    }
}

/// Whether a request carries a flexible checksum (the SDK's CRC32 and kin), which Spaces and
/// other S3-compatible services have refused.
fn carries_flexible_checksum(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        let name = name.as_str();
        name.starts_with("x-amz-checksum-") || name == "x-amz-sdk-checksum-algorithm"
    })
}

/// `bucket/key` of a request for one object; `None` for the service or a bucket.
fn object_of(path: &str) -> Option<String> {
    let path = percent_decode(path.trim_start_matches('/'));
    let (bucket, key) = path.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then(|| format!("{bucket}/{key}"))
}

/// Decodes `%XX` escapes (object keys arrive URL-encoded).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// An S3 client for `endpoint` configured exactly like the app's (path-style, checksums only
/// when required, no retries, so a 503 is seen as it is), with the test credentials.
pub fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let vars: std::collections::HashMap<String, String> = [
        ("SPACES_ENDPOINT", endpoint),
        ("SPACES_BUCKET", "unused"),
        ("SPACES_REGION", "us-east-1"),
        ("SPACES_API_KEY", "test"),
        ("SPACES_API_SECRET", "test"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let settings = fbsync_shared::config::Settings::from_map(&vars).expect("test settings");
    let Ok(fbsync_shared::config::StoreLocation::S3(target)) = settings.store_location() else {
        panic!("test settings name an S3 store");
    };
    fbsync_shared::storage::object_store::S3Store::new(&target)
        .client()
        .clone()
}

/// Creates `bucket` (an existing one of ours is fine).
pub async fn create_bucket(endpoint: &str, bucket: &str) {
    let created = s3_client(endpoint)
        .create_bucket()
        .bucket(bucket)
        .send()
        .await;
    if let Err(e) = created {
        let owned = e
            .as_service_error()
            .is_some_and(|e| e.is_bucket_already_owned_by_you());
        assert!(owned, "create bucket {bucket}: {e:?}");
    }
}

/// The object's bytes, or None when there is no such key.
pub async fn read_object(endpoint: &str, bucket: &str, key: &str) -> Option<Vec<u8>> {
    let answer = s3_client(endpoint)
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await;
    match answer {
        Ok(object) => {
            let bytes = object.body.collect().await.expect("object body");
            Some(bytes.into_bytes().to_vec())
        }
        Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => None,
        Err(e) => panic!("get {bucket}/{key}: {e:?}"),
    }
}

/// Every key under `prefix`, in S3's (lexicographic) order.
#[allow(dead_code)] // Used by the api target only.
pub async fn list_keys(endpoint: &str, bucket: &str, prefix: &str) -> Vec<String> {
    let client = s3_client(endpoint);
    let mut keys = Vec::new();
    let mut continuation: Option<String> = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(continuation.take())
            .send()
            .await
            .unwrap_or_else(|e| panic!("list {bucket}/{prefix}: {e:?}"));
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from)),
        );
        match page.next_continuation_token() {
            Some(token) if page.is_truncated() == Some(true) => continuation = Some(token.into()),
            _ => return keys,
        }
    }
}
