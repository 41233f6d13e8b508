//! A repository in an S3-compatible bucket (AWS, Ceph RGW, Garage, MinIO,
//! s3s), on `aws-sdk-s3`.
//!
//! * Location: `s3://BUCKET/PREFIX`. Endpoint: [`S3Config::endpoint`], else
//!   `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` / the profile's
//!   `endpoint_url`, else AWS. Any custom endpoint means path-style
//!   addressing. Region and credentials come from the standard AWS variables
//!   and profiles (`aws-config`); a custom endpoint with no region uses
//!   `us-east-1`.
//! * Checksums are sent and checked only when an operation requires them
//!   (`WhenRequired`): older Ceph, Garage and s3s reject the CRC32 trailers
//!   recent SDKs send by default. Integrity does not depend on them: every
//!   object is authenticated by the repository's own AES-GCM, and TLS guards
//!   the transport on real endpoints.
//! * Synchronous: the backend owns a tokio runtime; each call spawns its
//!   request on that runtime and waits on a channel. It may be called from
//!   any number of OS threads at once, and from tokio `spawn_blocking`
//!   threads. Do **not** call it from inside an async task: it blocks the
//!   calling thread until the request is done (it does not panic, but it
//!   stalls that executor thread). Async callers use `spawn_blocking`.
//! * Retries: the SDK's own retries are off; every request runs in a loop
//!   here with full-jitter exponential backoff on 5xx, 429/503 throttling
//!   (`SlowDown`), connection errors (refused, reset mid-request or
//!   mid-response) and timeouts, each attempt bounded by
//!   [`S3Config::attempt_timeout`]. Re-sending a PUT is safe: objects are
//!   named by fresh random ids and never rewritten, so a retry after a reset
//!   stores the same bytes under the same name. Once attempts are spent the
//!   error names the operation, the bucket, the key, the endpoint and the
//!   last cause.
//! * No overwrites: S3 has no portable create-if-absent, so `put` relies on
//!   unique names; only `config` (the one fixed name) is checked with a HEAD
//!   first, and `Repository::init` checks it too.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use super::{Backend, BackendError, ObjectInfo};

/// Where and how to reach a bucket.
#[derive(Clone, Debug)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`
    /// (empty: the bucket root).
    pub prefix: String,
    /// Custom endpoint (e.g. `http://127.0.0.1:9000`); `None`: from the
    /// environment or profile, else AWS.
    pub endpoint: Option<String>,
    /// `None`: from the environment or profile.
    pub region: Option<String>,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First backoff; doubles per attempt up to `max_backoff`, full jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Whole attempt, body transfer included.
    pub attempt_timeout: Duration,
    /// Concurrent pack uploads: each holds a pack and its request body
    /// (about 2 x 16 MiB), so this bounds the memory of a backup too.
    pub upload_concurrency: usize,
    /// Concurrent ranged reads (restores fetch up to 32 MiB at a time).
    pub read_concurrency: usize,
    /// Explicit access key id and secret (tests, embedding); `None`: the
    /// environment or an AWS profile (see [`credential_source`]).
    pub credentials: Option<(String, String)>,
    /// Let the SDK ask EC2 instance metadata for credentials and region.
    /// Off by default: off EC2 that probe only times out and buries the
    /// real problem under the SDK's errors.
    pub imds: bool,
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn from_url(url: &str) -> Result<Self, BackendError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| BackendError::Other(format!("{url:?} is not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BackendError::Other(format!("{url:?}: no bucket name")));
        }
        Ok(S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            ..Default::default()
        })
    }
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(300),
            upload_concurrency: 4,
            read_concurrency: 8,
            credentials: None,
            imds: false,
        }
    }
}

/// Why a request failed, as far as a caller deciding what to tell the
/// operator cares ([`S3Backend::check`] and the final error message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Could not connect, or no answer in time.
    Unreachable,
    /// Missing, unknown or wrongly signed credentials, or access denied.
    Credentials,
    /// The bucket does not exist.
    NoBucket,
    NotFound,
    /// Server error or throttling (worth retrying).
    Transient,
    Other,
}

#[derive(Debug)]
pub(super) struct Failure {
    pub(super) kind: FailureKind,
    pub(super) retry: bool,
    pub(super) message: String,
}

/// The result of [`S3Backend::check`].
#[derive(Clone, Debug)]
pub struct CheckError {
    pub kind: FailureKind,
    pub message: String,
}

pub struct S3Backend {
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    pub(super) cfg: Arc<S3Config>,
    /// `prefix/` or empty.
    key_prefix: String,
    endpoint: String,
    /// How `put` locks new objects (`super::s3_lock`).
    pub(super) new_rule: std::sync::Mutex<Option<super::RetentionRule>>,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("location", &self.location())
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        // Safe even when the last handle is dropped inside an async task.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Where the credentials come from when the config names none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CredentialSource {
    /// Keys given: in the config, or `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.
    Keys,
    /// The SDK's provider chain: a profile, web identity, a container's
    /// credentials, or instance metadata (only when asked).
    Chain,
}

/// Decides before the SDK is asked, so a host with no credentials gets one
/// line saying what to set, instead of seconds of EC2 metadata probes and
/// the SDK's dump of each provider's failure.
fn credential_source(
    cfg: &S3Config,
    var: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<CredentialSource, BackendError> {
    let set = |k: &str| var(k).is_some_and(|v| !v.is_empty());
    if cfg.credentials.is_some() {
        return Ok(CredentialSource::Keys);
    }
    match (set("AWS_ACCESS_KEY_ID"), set("AWS_SECRET_ACCESS_KEY")) {
        (true, true) => return Ok(CredentialSource::Keys),
        (true, false) => {
            return Err(BackendError::Credentials(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
            ))
        }
        (false, true) => {
            return Err(BackendError::Credentials(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into(),
            ))
        }
        (false, false) => {}
    }
    let home_file = |f: &str| {
        var("HOME").is_some_and(|h| std::path::Path::new(&h).join(".aws").join(f).is_file())
    };
    let chain = cfg.imds
        || [
            "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ]
        .iter()
        .any(|k| set(k))
        || home_file("credentials")
        || home_file("config");
    if chain {
        return Ok(CredentialSource::Chain);
    }
    Err(BackendError::Credentials(format!(
        "no S3 credentials for bucket {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         or AWS_PROFILE with a profile in ~/.aws/credentials (on EC2, pass --s3-imds to use \
         the instance's role)",
        cfg.bucket
    )))
}

fn endpoint_from_env() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.is_empty())
}

impl S3Backend {
    pub fn new(cfg: S3Config) -> Result<Self, BackendError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
            .thread_name("bulwark-s3")
            .enable_all()
            .build()
            .map_err(|e| BackendError::Other(format!("starting the S3 runtime: {e}")))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(cfg.connect_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        let source = credential_source(&cfg, &|k| std::env::var_os(k))?;
        match (&cfg.credentials, source) {
            (Some((id, secret)), _) => {
                loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                    id.clone(),
                    secret.clone(),
                    None,
                    None,
                    "bulwark",
                ));
            }
            (None, CredentialSource::Keys) => {
                loader = loader.credentials_provider(
                    aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
                );
            }
            // The SDK's chain: profiles, web identity, containers (and
            // instance metadata when asked, or when a profile points there).
            (None, CredentialSource::Chain) => {}
        }
        let region = cfg.region.clone().or_else(|| {
            ["AWS_REGION", "AWS_DEFAULT_REGION"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        });
        match region {
            Some(r) => loader = loader.region(Region::new(r)),
            // No profile to read one from and no metadata to ask: the
            // default, rather than a probe of EC2 metadata.
            None if source == CredentialSource::Keys && !cfg.imds => {
                loader = loader.region(Region::new("us-east-1"))
            }
            None => {}
        }
        let sdk = rt.block_on(loader.load());
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(endpoint_from_env)
            .or_else(|| sdk.endpoint_url().map(str::to_string));
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(ep) = &endpoint {
            b = b.endpoint_url(ep.clone()).force_path_style(true);
        }
        if sdk.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        let client = Client::from_conf(b.build());
        let key_prefix = if cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", cfg.prefix)
        };
        Ok(S3Backend {
            rt: Some(rt),
            client,
            endpoint: endpoint.unwrap_or_else(|| "AWS S3".into()),
            key_prefix,
            cfg: Arc::new(cfg),
            new_rule: std::sync::Mutex::new(None),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.cfg.bucket
    }

    /// The endpoint requests go to (`AWS S3` when none is set).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub(super) fn key(&self, name: &str) -> String {
        format!("{}{}", self.key_prefix, name)
    }

    /// Runs `fut` on the backend's runtime and waits for it. Works from
    /// any thread; blocks the caller.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt
            .as_ref()
            .expect("runtime lives until drop")
            .spawn(async move {
                let _ = tx.send(fut.await);
            });
        rx.recv().expect("S3 runtime stopped")
    }

    /// Runs `op` (one attempt) until it succeeds, fails for good, or the
    /// attempts are spent.
    pub(super) fn call<T, F, Fut>(
        &self,
        what: &'static str,
        name: &str,
        op: F,
    ) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: Fn(Client, String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Failure>> + Send,
    {
        let client = self.client.clone();
        let cfg = self.cfg.clone();
        let key = self.key(name);
        let r = self.run(async move { retry_loop(&cfg, &client, &key, op).await });
        r.map_err(|(f, attempts)| self.error(what, name, f, attempts))
    }

    fn error(&self, what: &str, name: &str, f: Failure, attempts: u32) -> BackendError {
        if f.kind == FailureKind::NotFound {
            return BackendError::NotFound(name.to_string());
        }
        let tries = if attempts > 1 {
            format!(" (gave up after {attempts} attempts)")
        } else {
            String::new()
        };
        BackendError::Other(format!(
            "S3 {what} {name} in bucket {} at {}: {}{tries}",
            self.cfg.bucket, self.endpoint, f.message
        ))
    }

    /// GETs `name` (or `range`: offset, length) into `buf`, copying each
    /// piece of the body as it arrives: the HTTP client's read buffer is
    /// then free again for the next piece, so a large read allocates
    /// nothing new per piece (holding the pieces made it map fresh memory
    /// for every few hundred KiB).
    fn read_into(
        &self,
        name: &str,
        range: Option<(u64, u64)>,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        let bucket = self.cfg.bucket.clone();
        let header = range.map(|(o, l)| format!("bytes={}-{}", o, o + l - 1));
        // Shared with the attempts on the runtime (each starts afresh);
        // locked once per piece, never across an await.
        let dest = Arc::new(std::sync::Mutex::new(std::mem::take(buf)));
        let d = dest.clone();
        let r = self.call("get", name, move |c, key| {
            let req = c
                .get_object()
                .bucket(&bucket)
                .key(key)
                .set_range(header.clone());
            let d = d.clone();
            async move {
                let lock = || d.lock().unwrap_or_else(|e| e.into_inner());
                lock().clear();
                let out = match req.send().await {
                    Ok(out) => out,
                    // Range past the end: an empty (short) read.
                    Err(e)
                        if range.is_some()
                            && e.raw_response().map(|r| r.status().as_u16()) == Some(416) =>
                    {
                        return Ok(());
                    }
                    Err(e) => return Err(classify(e, false)),
                };
                let mut window = Window::new(range, out.content_length());
                lock().reserve(window.expected);
                let mut body = out.body;
                while let Some(piece) = body.try_next().await.map_err(body_failure)? {
                    window.copy(&piece, &mut lock())?;
                }
                Ok(())
            }
        });
        *buf = std::mem::take(&mut *dest.lock().unwrap_or_else(|e| e.into_inner()));
        r
    }

    /// Checks that the bucket answers with these credentials: a HEAD of
    /// the bucket and a one-key listing of the prefix, a few attempts only.
    pub fn check(&self) -> Result<(), CheckError> {
        let bucket = self.cfg.bucket.clone();
        let prefix = self.key_prefix.clone();
        let client = self.client.clone();
        let mut cfg = (*self.cfg).clone();
        cfg.max_attempts = cfg.max_attempts.min(3);
        cfg.attempt_timeout = cfg.attempt_timeout.min(Duration::from_secs(20));
        let r = self.run(async move {
            retry_loop(&cfg, &client, "", move |c, _| {
                let bucket = bucket.clone();
                let prefix = prefix.clone();
                async move {
                    c.head_bucket()
                        .bucket(&bucket)
                        .send()
                        .await
                        .map_err(|e| classify(e, true))?;
                    c.list_objects_v2()
                        .bucket(&bucket)
                        .prefix(&prefix)
                        .max_keys(1)
                        .send()
                        .await
                        .map_err(|e| classify(e, true))?;
                    Ok(())
                }
            })
            .await
        });
        r.map_err(|(f, attempts)| CheckError {
            kind: f.kind.clone(),
            message: match self.error("check", "", f, attempts) {
                BackendError::Other(m) => m,
                e => e.to_string(),
            },
        })
    }
}

async fn retry_loop<T, F, Fut>(
    cfg: &S3Config,
    client: &Client,
    key: &str,
    op: F,
) -> Result<T, (Failure, u32)>
where
    F: Fn(Client, String) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let r = tokio::time::timeout(cfg.attempt_timeout, op(client.clone(), key.to_string()))
            .await
            .unwrap_or_else(|_| {
                Err(Failure {
                    kind: FailureKind::Unreachable,
                    retry: true,
                    message: format!("no answer within {:?}", cfg.attempt_timeout),
                })
            });
        match r {
            Ok(v) => return Ok(v),
            Err(f) if f.retry && attempt < cfg.max_attempts => {
                let cap = cfg.max_backoff.min(
                    cfg.initial_backoff
                        .saturating_mul(1 << (attempt - 1).min(20)),
                );
                let sleep = cap.mul_f64(rand::random::<f64>());
                tracing::debug!(
                    "S3 {key}: attempt {attempt} failed ({}), retrying in {sleep:?}",
                    f.message
                );
                tokio::time::sleep(sleep).await;
            }
            Err(f) => return Err((f, attempt)),
        }
    }
}

/// Sorts an SDK error into retry-or-not and a kind, with a message that
/// keeps the whole cause chain.
pub(super) fn classify<E>(
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    bucket_op: bool,
) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_string);
    // Service errors: the code and message the server sent; others (no
    // answer, reset, timeout): the whole cause chain.
    let detail = match (&e, &code) {
        (SdkError::ServiceError(_), Some(c)) => {
            format!("{c}: {}", e.message().unwrap_or("(no message)"))
        }
        (SdkError::ServiceError(_), None) => "(no error body)".to_string(),
        _ => DisplayErrorContext(&e).to_string(),
    };
    let (kind, retry) = match (&e, status) {
        (SdkError::TimeoutError(_), _) => (FailureKind::Unreachable, true),
        (SdkError::DispatchFailure(d), _) => {
            if d.is_user() || d.is_other() && detail.contains("credentials") {
                (FailureKind::Credentials, false)
            } else {
                (FailureKind::Unreachable, true)
            }
        }
        (SdkError::ResponseError(_), _) => (FailureKind::Transient, true),
        (SdkError::ConstructionFailure(_), _) => {
            if detail.contains("credentials") {
                (FailureKind::Credentials, false)
            } else {
                (FailureKind::Other, false)
            }
        }
        (_, Some(s)) if s >= 500 || s == 429 => (FailureKind::Transient, true),
        (_, Some(401 | 403)) => (FailureKind::Credentials, false),
        (_, Some(404)) if code.as_deref() == Some("NoSuchBucket") || bucket_op => {
            (FailureKind::NoBucket, false)
        }
        (_, Some(404)) => (FailureKind::NotFound, false),
        _ if detail.contains("credentials") => (FailureKind::Credentials, false),
        _ => (FailureKind::Other, false),
    };
    let message = match (kind.clone(), status, code) {
        // The SDK lists every provider it tried, over dozens of lines.
        (FailureKind::Credentials, None, _) if detail.contains("no credentials found in chain") => {
            "no S3 credentials: the AWS profile and the SDK's other providers had none; set \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a profile that \
             has keys"
                .to_string()
        }
        (FailureKind::Credentials, s, c) => format!(
            "access denied or bad credentials ({}{}): {detail}",
            s.map(|s| format!("HTTP {s}")).unwrap_or_default(),
            c.map(|c| format!(" {c}")).unwrap_or_default()
        ),
        (FailureKind::NoBucket, _, _) => format!("no such bucket: {detail}"),
        (FailureKind::Unreachable, _, _) => format!("endpoint unreachable: {detail}"),
        (_, Some(s), _) => format!("HTTP {s} {detail}"),
        _ => detail,
    };
    Failure {
        kind,
        retry,
        message,
    }
}

/// Which bytes of a response body a read keeps. A server that ignores
/// Range answers with the whole object (its Content-Length says so before
/// the first byte): the range is then cut out of it. Past the end of the
/// object a read is short, never padded.
#[derive(Debug)]
struct Window {
    /// Body bytes still to drop before the range starts.
    skip: u64,
    /// Bytes still to keep (`u64::MAX`: all).
    keep: u64,
    /// No Content-Length and a range asked for: more than the range's
    /// length means the range was ignored, which cannot be cut right any
    /// more: an error then, never the wrong bytes.
    unsized_range: bool,
    /// What the body will leave in the buffer, as far as known (room is
    /// made for it once, not grown piece by piece).
    expected: usize,
}

impl Window {
    fn new(range: Option<(u64, u64)>, content_length: Option<i64>) -> Window {
        // A negative length is no length: the unsized rules apply.
        let total = content_length.and_then(|n| u64::try_from(n).ok());
        let (skip, keep, unsized_range) = match (range, total) {
            (None, _) => (0, u64::MAX, false),
            (Some((offset, len)), Some(total)) => {
                (if total > len { offset } else { 0 }, len, false)
            }
            (Some((_, len)), None) => (0, len, true),
        };
        let expected = total.map_or(0, |t| t.saturating_sub(skip).min(keep));
        Window {
            skip,
            keep,
            unsized_range,
            // Only a hint for reserving room: 0 just means "grow as it comes".
            expected: usize::try_from(expected).unwrap_or(0),
        }
    }

    fn copy(&mut self, mut piece: &[u8], out: &mut Vec<u8>) -> Result<(), Failure> {
        let drop = self.skip.min(piece.len() as u64);
        self.skip -= drop;
        piece = &piece[drop as usize..];
        if self.unsized_range && piece.len() as u64 > self.keep {
            return Err(Failure {
                kind: FailureKind::Other,
                retry: false,
                message: "the server answered a ranged read with more bytes than asked for, \
                          and no length"
                    .into(),
            });
        }
        let n = self.keep.min(piece.len() as u64) as usize;
        out.extend_from_slice(&piece[..n]);
        self.keep -= n as u64;
        Ok(())
    }
}

fn body_failure(e: impl std::fmt::Display) -> Failure {
    Failure {
        kind: FailureKind::Transient,
        retry: true,
        message: format!("reading the response body: {e}"),
    }
}

impl S3Backend {
    /// One PUT of `body` (shared by the attempts, never copied).
    fn put_body(&self, name: &str, body: bytes::Bytes) -> Result<(), BackendError> {
        if name == crate::format::layout::CONFIG && self.exists(name)? {
            return Err(BackendError::AlreadyExists(name.to_string()));
        }
        let bucket = self.cfg.bucket.clone();
        let lock = self.new_retention();
        self.call("put", name, move |c, key| {
            let req = c
                .put_object()
                .bucket(&bucket)
                .key(key)
                .set_object_lock_mode(lock.map(|r| super::s3_lock::mode(r.mode)))
                .set_object_lock_retain_until_date(lock.map(|r| super::s3_lock::time(r.until)))
                .content_length(body.len() as i64)
                .body(ByteStream::from(body.clone()));
            async move {
                req.send().await.map_err(|e| classify(e, false))?;
                Ok(())
            }
        })
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        if self.cfg.prefix.is_empty() {
            format!("s3://{}", self.cfg.bucket)
        } else {
            format!("s3://{}/{}", self.cfg.bucket, self.cfg.prefix)
        }
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.put_body(name, bytes_of(data))
    }

    fn put_owned(&self, name: &str, data: Vec<u8>) -> Result<(), BackendError> {
        self.put_body(name, bytes::Bytes::from(data))
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        let mut buf = Vec::new();
        self.read_into(name, None, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        buf.clear();
        if len == 0 {
            return Ok(());
        }
        self.read_into(name, Some((offset, len)), buf)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let bucket = self.cfg.bucket.clone();
            let tok = token.clone();
            let page = self.call("list", prefix, move |c, key| {
                let req = c
                    .list_objects_v2()
                    .bucket(&bucket)
                    .prefix(key)
                    .set_continuation_token(tok.clone());
                async move {
                    let o = req.send().await.map_err(|e| classify(e, true))?;
                    let objs: Vec<(String, u64)> = o
                        .contents()
                        .iter()
                        .filter_map(|x| {
                            Some((x.key()?.to_string(), x.size().unwrap_or(0).max(0) as u64))
                        })
                        .collect();
                    // ListObjectsV2 always sends Size, and IsTruncated
                    // whenever another page follows.
                    let next = if o.is_truncated().unwrap_or(false) {
                        o.next_continuation_token().map(str::to_string)
                    } else {
                        None
                    };
                    Ok((objs, next))
                }
            })?;
            for (k, size) in page.0 {
                if let Some(name) = k.strip_prefix(&self.key_prefix) {
                    out.push(ObjectInfo {
                        name: name.to_string(),
                        size,
                    });
                }
            }
            match page.1 {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        let bucket = self.cfg.bucket.clone();
        self.call("delete", name, move |c, key| {
            let req = c.delete_object().bucket(&bucket).key(key);
            async move {
                req.send().await.map_err(|e| classify(e, false))?;
                Ok(())
            }
        })
    }

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        let bucket = self.cfg.bucket.clone();
        let r = self.call("head", name, move |c, key| {
            let req = c.head_object().bucket(&bucket).key(key);
            async move {
                req.send().await.map_err(|e| classify(e, false))?;
                Ok(())
            }
        });
        match r {
            Ok(()) => Ok(true),
            Err(BackendError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn upload_concurrency(&self) -> usize {
        self.cfg.upload_concurrency
    }

    fn read_concurrency(&self) -> usize {
        self.cfg.read_concurrency
    }

    fn object_lock(&self) -> Option<&dyn super::ObjectLock> {
        Some(self)
    }
}

/// One copy into a refcounted buffer: retries clone the handle, not the data.
fn bytes_of(data: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn source(vars: &[(&str, &str)], imds: bool) -> Result<CredentialSource, String> {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let cfg = S3Config {
            bucket: "b".into(),
            imds,
            ..Default::default()
        };
        credential_source(&cfg, &|k| {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_body_in_pieces_keeps_the_range_asked_for() {
        let read = |range, content_length| {
            let mut w = Window::new(range, content_length);
            let mut out = Vec::new();
            for p in ["abc", "defg", "", "hij"] {
                w.copy(p.as_bytes(), &mut out).map_err(|f| f.message)?;
            }
            Ok::<_, String>(String::from_utf8(out).unwrap())
        };
        // Whole objects, and ranges the server honoured.
        assert_eq!(read(None, Some(10)).unwrap(), "abcdefghij");
        assert_eq!(read(None, None).unwrap(), "abcdefghij");
        assert_eq!(read(Some((5, 10)), Some(10)).unwrap(), "abcdefghij");
        // A body no longer than the range is the range (short at the end
        // of the object, never padded).
        assert_eq!(read(Some((5, 20)), Some(10)).unwrap(), "abcdefghij");
        // The range ignored: cut out of the whole object.
        assert_eq!(read(Some((0, 4)), Some(10)).unwrap(), "abcd");
        assert_eq!(read(Some((2, 6)), Some(10)).unwrap(), "cdefgh");
        assert_eq!(read(Some((8, 5)), Some(10)).unwrap(), "ij");
        assert_eq!(read(Some((12, 5)), Some(10)).unwrap(), "");
        // Ignored with no length: an error, not the wrong bytes.
        assert!(read(Some((2, 6)), None).is_err());
        assert_eq!(read(Some((0, 10)), None).unwrap(), "abcdefghij");
    }

    #[test]
    fn credentials_come_from_keys_a_profile_or_metadata_when_asked() {
        let keys = [("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "s")];
        assert_eq!(source(&keys, false), Ok(CredentialSource::Keys));
        assert_eq!(
            source(&[("AWS_PROFILE", "x")], false),
            Ok(CredentialSource::Chain)
        );
        assert_eq!(
            source(&[("HOME", "/nonexistent")], true),
            Ok(CredentialSource::Chain)
        );
        let none = source(&[("HOME", "/nonexistent")], false).unwrap_err();
        assert!(
            none.contains("AWS_ACCESS_KEY_ID") && none.contains("AWS_PROFILE"),
            "{none}"
        );
        assert!(!none.contains('\n'), "one line: {none}");
        let half = source(&[("AWS_ACCESS_KEY_ID", "a")], false).unwrap_err();
        assert!(half.contains("AWS_SECRET_ACCESS_KEY is not"), "{half}");
        // An empty variable counts as unset.
        assert!(source(
            &[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")],
            false
        )
        .is_err());
    }
}
