//! A real S3 server on loopback for tests, and a fault-injecting proxy to
//! put in front of it.
//!
//! * [`S3Server::start`] runs `s3s-fs` (a real S3 implementation over a
//!   directory) on a free loopback port with a temporary data directory and
//!   fresh credentials, installing it first with `scripts/setup-s3.sh` if
//!   needed (once, cached in `target/tools/bin`). It is killed and its data
//!   removed on drop.
//! * [`S3Server::create_bucket`] makes a bucket with a unique name.
//! * [`FaultProxy::start`] listens on another loopback port and forwards to
//!   the server, answering some requests itself with `503 SlowDown`,
//!   resetting some connections mid-request or mid-response, and adding
//!   latency, at rates that can be changed while it runs ([`FaultProxy::set`]).
//!   Each proxied connection carries one request (`Connection: close` is
//!   forced), so a fault never hits more than one request.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, Result};

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testbed sits in the workspace")
        .to_path_buf()
}

/// The `s3s-fs` binary: `$S3S_FS`, else `target/tools/bin/s3s-fs` (installed
/// by `scripts/setup-s3.sh` when missing).
pub fn s3s_fs_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return Ok(PathBuf::from(p));
    }
    let root = workspace_root();
    let bin = root.join("target/tools/bin/s3s-fs");
    if bin.exists() {
        return Ok(bin);
    }
    let out = Command::new("bash")
        .arg(root.join("scripts/setup-s3.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(io("running scripts/setup-s3.sh"))?;
    if !out.status.success() || !bin.exists() {
        return Err(Error::Setup(format!(
            "scripts/setup-s3.sh did not install {}",
            bin.display()
        )));
    }
    Ok(bin)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding a loopback port"))?;
    Ok(l.local_addr().map_err(io("local addr"))?.port())
}

fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| char::from_digit(rand::random::<u32>() % 16, 16).unwrap())
        .collect()
}

/// A running `s3s-fs` on loopback; killed on drop.
pub struct S3Server {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    /// Access key id the server accepts.
    pub access_key: String,
    /// Secret key the server accepts.
    pub secret_key: String,
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("port", &self.port)
            .finish()
    }
}

impl S3Server {
    /// Starts a server with an empty data directory.
    pub fn start() -> Result<Self> {
        let bin = s3s_fs_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("bw-s3-")
            .tempdir()
            .map_err(io("creating the S3 data directory"))?;
        let access_key = format!("AK{}", random_hex(14).to_uppercase());
        let secret_key = random_hex(32);
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let log = std::fs::File::create(dir.path().join("server.log"))
                .map_err(io("creating the S3 server log"))?;
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).map_err(io("creating the S3 data directory"))?;
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(io("log"))?)
                .stderr(log)
                .env("RUST_LOG", "warn")
                .spawn()
                .map_err(io(format!("starting {}", bin.display())))?;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(st)) = child.try_wait() {
                    last = format!("s3s-fs exited ({st})");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(S3Server {
                        child,
                        dir,
                        port,
                        access_key,
                        secret_key,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            if last.is_empty() {
                last = "s3s-fs did not listen within 10 s".into();
            }
        }
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        Err(Error::Setup(format!("{last}; log:\n{log}")))
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where the server keeps bucket `bucket` (one directory per bucket,
    /// one file per object): lets tests damage or remove objects behind the
    /// server's back.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.dir.path().join("data").join(bucket)
    }

    /// Creates a bucket with a unique name and returns the name.
    pub fn create_bucket(&self) -> Result<String> {
        let name = format!("bw-{}-{}", std::process::id(), random_hex(10));
        std::fs::create_dir_all(self.bucket_dir(&name)).map_err(io("creating a bucket"))?;
        Ok(name)
    }

    /// Environment for an S3 client of this server (`AWS_*` variables).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            // Keep a developer's own AWS profile out of the tests.
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fault rates of a [`FaultProxy`]; each request draws once.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Share of requests answered `503 SlowDown` by the proxy itself.
    pub slow_down: f64,
    /// Share of requests whose connection is reset after part of the
    /// request was forwarded.
    pub reset_request: f64,
    /// Share of requests whose connection is reset after part of the
    /// response was forwarded.
    pub reset_response: f64,
    /// Added before each request is forwarded (uniform in 0..=latency).
    pub latency: Duration,
    /// Added before every request, on top of `latency`: a bucket this far
    /// away.
    pub delay: Duration,
    /// Every connection is reset as it arrives: the bucket is unreachable.
    pub outage: bool,
    /// Requests whose request line holds this wait in the proxy until the
    /// faults change (then they meet the new ones, an outage say): a test
    /// can stop a client at one step (`"/chunklists/"`: a server about to
    /// open its disks) whatever the timing.
    pub hold: Option<String>,
}

/// What a [`FaultProxy`] did so far.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Requests answered 503.
    pub slow_downs: AtomicU64,
    /// Connections reset mid-request.
    pub resets_request: AtomicU64,
    /// Connections reset mid-response.
    pub resets_response: AtomicU64,
    /// Connections reset during an outage.
    pub outage_resets: AtomicU64,
}

impl FaultStats {
    /// Faults injected, all kinds.
    pub fn injected(&self) -> u64 {
        self.slow_downs.load(Ordering::Relaxed)
            + self.resets_request.load(Ordering::Relaxed)
            + self.resets_response.load(Ordering::Relaxed)
    }
}

/// A TCP proxy on loopback that injects S3 faults; stopped on drop.
pub struct FaultProxy {
    rt: Option<tokio::runtime::Runtime>,
    port: u16,
    faults: Arc<Mutex<Faults>>,
    /// Counters of what was injected.
    pub stats: Arc<FaultStats>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream_port` on loopback.
    pub fn start(upstream_port: u16, faults: Faults) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(io("starting the proxy runtime"))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(io("binding the proxy port"))?;
        let port = listener.local_addr().map_err(io("local addr"))?.port();
        let faults = Arc::new(Mutex::new(faults));
        let stats = Arc::new(FaultStats::default());
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        let (f, s) = (faults.clone(), stats.clone());
        rt.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (f, s) = (f.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = proxy_one(conn, upstream, f, s).await;
                });
            }
        });
        Ok(FaultProxy {
            rt: Some(rt),
            port,
            faults,
            stats,
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Changes the fault rates from now on.
    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

const SLOW_DOWN_BODY: &str =
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
<Message>Please reduce your request rate.</Message><RequestId>bwfault</RequestId></Error>";

fn reset(s: &tokio::net::TcpStream) {
    let _ = s.set_zero_linger();
}

/// During an outage: the connection is reset (and counted).
fn met_outage(faults: &Mutex<Faults>, stats: &FaultStats, client: &tokio::net::TcpStream) -> bool {
    let outage = faults.lock().unwrap_or_else(|e| e.into_inner()).outage;
    if outage {
        stats.outage_resets.fetch_add(1, Ordering::Relaxed);
        reset(client);
    }
    outage
}

/// Handles one client connection: one request, one response.
async fn proxy_one(
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    stats: Arc<FaultStats>,
) -> std::io::Result<()> {
    if met_outage(&faults, &stats, &client) {
        return Ok(());
    }
    // The request head.
    let mut buf = Vec::with_capacity(8192);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = client.read(&mut chunk).await?;
        if n == 0 || buf.len() > 1 << 20 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let first_line = head.lines().next().unwrap_or("");
    let held = |f: &Faults| {
        f.hold
            .as_ref()
            .is_some_and(|m| first_line.contains(m.as_str()))
    };
    if held(&faults.lock().unwrap_or_else(|e| e.into_inner())) {
        while held(&faults.lock().unwrap_or_else(|e| e.into_inner())) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if met_outage(&faults, &stats, &client) {
            return Ok(());
        }
    }
    if std::env::var_os("BULWARK_PROXY_TRACE").is_some() {
        // For a benchmark's timeline: when each request came, and what.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!(
            "{}.{:06} {}",
            t.as_secs(),
            t.subsec_micros(),
            head.lines().next().unwrap_or("")
        );
    }
    let mut content_length = 0u64;
    let mut expect_continue = false;
    let mut new_head = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if i > 0 && lower.starts_with("connection:") {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("expect:") && lower.contains("100-continue") {
            expect_continue = true;
        }
        new_head.push_str(line);
        new_head.push_str("\r\n");
    }
    new_head.push_str("Connection: close\r\n\r\n");
    let body_start = buf[head_end..].to_vec();

    let f = faults.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let draw = rand::random::<f64>();
    let wait = f.delay + f.latency.mul_f64(rand::random::<f64>());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if draw < f.slow_down {
        stats.slow_downs.fetch_add(1, Ordering::Relaxed);
        if !expect_continue {
            // Take the body first, as a real server would.
            let mut left = content_length.saturating_sub(body_start.len() as u64);
            let mut chunk = vec![0u8; 65536];
            while left > 0 {
                let n = client.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                left = left.saturating_sub(n as u64);
            }
        }
        let resp = format!(
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{SLOW_DOWN_BODY}",
            SLOW_DOWN_BODY.len()
        );
        client.write_all(resp.as_bytes()).await?;
        client.shutdown().await?;
        return Ok(());
    }
    let mut cut_request = None;
    let mut cut_response = None;
    if draw < f.slow_down + f.reset_request {
        // Somewhere in the body (or right after the head when there is none).
        cut_request = Some((rand::random::<f64>() * content_length as f64) as u64);
    } else if draw < f.slow_down + f.reset_request + f.reset_response {
        // Mostly within the status line and headers, which every response has.
        cut_response = Some(rand::random::<u64>() % 300);
    }
    let mut up = tokio::net::TcpStream::connect(upstream).await?;
    up.write_all(new_head.as_bytes()).await?;
    let mut sent_req = 0u64;
    let mut sent_resp = 0u64;
    let mut pending = body_start;
    let mut cbuf = vec![0u8; 65536];
    let mut ubuf = vec![0u8; 65536];
    let mut client_eof = false;
    loop {
        if !pending.is_empty() {
            let data = std::mem::take(&mut pending);
            if let Some(c) = cut_request {
                if sent_req + data.len() as u64 >= c {
                    let keep = (c - sent_req) as usize;
                    up.write_all(&data[..keep]).await?;
                    stats.resets_request.fetch_add(1, Ordering::Relaxed);
                    reset(&client);
                    reset(&up);
                    return Ok(());
                }
            }
            up.write_all(&data).await?;
            sent_req += data.len() as u64;
        }
        if cut_request.is_some() && content_length == 0 {
            stats.resets_request.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            reset(&up);
            return Ok(());
        }
        tokio::select! {
            r = client.read(&mut cbuf), if !client_eof => {
                let n = r?;
                if n == 0 {
                    client_eof = true;
                } else {
                    pending = cbuf[..n].to_vec();
                }
            }
            r = up.read(&mut ubuf) => {
                let n = r?;
                if n == 0 {
                    client.shutdown().await?;
                    return Ok(());
                }
                if let Some(c) = cut_response {
                    if sent_resp + n as u64 >= c {
                        let keep = (c - sent_resp) as usize;
                        client.write_all(&ubuf[..keep]).await?;
                        stats.resets_response.fetch_add(1, Ordering::Relaxed);
                        reset(&client);
                        reset(&up);
                        return Ok(());
                    }
                }
                client.write_all(&ubuf[..n]).await?;
                sent_resp += n as u64;
            }
        }
    }
}
