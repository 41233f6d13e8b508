//! Shared helpers of the `web_*` tests (included with `#[path]`, after
//! `vm_common`): a `bulwark web` this test started, an HTTP client with
//! its session, and a headless Chromium driven through chromedriver.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::common::Env;

/// Password of every test user.
pub const UPW: &str = "web test password";

/// Adds a user with `bulwark web user add` (password on stdin).
pub fn add_user(env: &Env, users: &Path, name: &str, role: &str) {
    let mut c = env
        .cmd(&[
            "web",
            "user",
            "add",
            name,
            "--role",
            role,
            "--users-file",
            users.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{UPW}\n").as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `bulwark web` on the agent's config, on a free loopback port.
pub struct WebServer {
    child: Child,
    /// `http://127.0.0.1:PORT` (or https).
    pub base: String,
}

impl WebServer {
    /// Starts `bulwark web --config CONFIG --listen 127.0.0.1:0` and waits
    /// for its `listening on` line.
    pub fn start(env: &Env, config: &Path, vars: Vec<(String, String)>) -> WebServer {
        let mut child = env
            .cmd(&[
                "web",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .envs(vars)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("bulwark web said {line:?}"))
            .to_string();
        WebServer { child, base }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client with a session (cookie and CSRF token once logged in).
pub struct Client {
    agent: ureq::Agent,
    pub base: String,
    pub cookie: Option<String>,
    pub csrf: Option<String>,
    pub bearer: Option<String>,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Client {
            agent,
            base: base.to_string(),
            cookie: None,
            csrf: None,
            bearer: None,
        }
    }

    fn auth<B>(&self, mut r: ureq::RequestBuilder<B>, csrf: bool) -> ureq::RequestBuilder<B> {
        if let Some(c) = &self.cookie {
            r = r.header("Cookie", c);
        }
        if let (true, Some(t)) = (csrf, &self.csrf) {
            r = r.header("X-CSRF-Token", t);
        }
        if let Some(b) = &self.bearer {
            r = r.header("Authorization", format!("Bearer {b}"));
        }
        r
    }

    fn answer(mut r: ureq::http::Response<ureq::Body>) -> (u16, Value) {
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// A GET's status, `X-Bulwark-Refused` header and body bytes.
    pub fn bytes(&self, path: &str) -> (u16, Option<String>, Vec<u8>) {
        let r = self.auth(self.agent.get(format!("{}{path}", self.base)), false);
        let mut resp = r.call().unwrap();
        let refused = resp
            .headers()
            .get("x-bulwark-refused")
            .map(|h| h.to_str().unwrap().to_string());
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap();
        (resp.status().as_u16(), refused, body)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.auth(self.agent.get(format!("{}{path}", self.base)), false);
        Self::answer(r.call().unwrap())
    }

    /// A page's status and HTML.
    pub fn page(&self, path: &str) -> (u16, String, Option<String>) {
        let r = self.auth(self.agent.get(format!("{}{path}", self.base)), false);
        let mut resp = r.call().unwrap();
        let location = resp
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
            location,
        )
    }

    /// POST with the CSRF token (if logged in).
    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_with(path, body, true)
    }

    pub fn post_with(&self, path: &str, body: Value, csrf: bool) -> (u16, Value) {
        let r = self.auth(self.agent.post(format!("{}{path}", self.base)), csrf);
        Self::answer(r.send_json(&body).unwrap())
    }

    /// Logs in: the status; on success keeps the cookie and the token.
    pub fn login(&mut self, user: &str, password: &str) -> (u16, Value) {
        let r = self
            .agent
            .post(format!("{}/api/v1/login", self.base))
            .send_json(json!({"user": user, "password": password}))
            .unwrap();
        let cookie = r
            .headers()
            .get("set-cookie")
            .map(|c| c.to_str().unwrap().to_string());
        let (status, v) = Self::answer(r);
        if status == 200 {
            let c = cookie.expect("a session cookie");
            assert!(
                c.contains("HttpOnly") && c.contains("SameSite=Strict"),
                "{c}"
            );
            self.cookie = Some(c.split(';').next().unwrap().to_string());
            self.csrf = Some(v["csrf"].as_str().unwrap().to_string());
        }
        (status, v)
    }

    /// Waits for task `id` to end; its last state.
    pub fn wait_task(&self, id: u64, secs: u64) -> Value {
        let t = Instant::now();
        loop {
            let (s, v) = self.get(&format!("/api/v1/tasks/{id}"));
            assert_eq!(s, 200, "{v}");
            if v["state"] != "running" {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "task {id} still running: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The `[web]` section for a test, with its users file.
pub fn web_section(users: &Path) -> String {
    format!("\n[web]\nusers_file = {users:?}\n")
}

/// A headless Chromium session driven over WebDriver (chromedriver).
pub struct Browser {
    driver: Child,
    http: ureq::Agent,
    url: String,
    _profile: tempfile::TempDir,
    pub shots: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and a Chromium session with a
    /// fresh profile. Screenshots go to `target/screenshots/`.
    pub fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium-driver)");
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let t = Instant::now();
        while http.get(format!("{base}/status")).call().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::Builder::new()
            .prefix("bw-chromium-")
            .tempdir()
            .unwrap();
        let args = json!([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1366,900",
            format!("--user-data-dir={}", profile.path().display()),
        ]);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let mut r = http
            .post(format!("{base}/session"))
            .send_json(&caps)
            .unwrap();
        let v: Value = r.body_mut().read_json().unwrap();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            http,
            url: format!("{base}/session/{id}"),
            _profile: profile,
            shots,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.url);
        let mut r = match method {
            "GET" => self
                .http
                .get(&url)
                .call()
                .unwrap_or_else(|e| panic!("GET {url}: {e}")),
            "DELETE" => self.http.delete(url).call().unwrap(),
            _ => self
                .http
                .post(url)
                .send_json(body.unwrap_or(json!({})))
                .unwrap(),
        };
        let v: Value = r.body_mut().read_json().unwrap();
        if v["value"].get("error").is_some() {
            panic!("WebDriver {method} {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    pub fn current_url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    /// The first element matching `css`, waiting up to 30 s for it.
    pub fn find(&self, css: &str) -> String {
        self.wait_for(&format!("element {css}"), 30, || self.try_find(css))
    }

    pub fn try_find(&self, css: &str) -> Option<String> {
        let url = format!("{}/element", self.url);
        let mut r = self
            .http
            .post(url)
            .send_json(json!({"using": "css selector", "value": css}))
            .unwrap();
        let v: Value = r.body_mut().read_json().unwrap();
        v["value"]
            .as_object()
            .filter(|o| !o.contains_key("error"))
            .and_then(|o| o.values().next())
            .and_then(|e| e.as_str())
            .map(str::to_string)
    }

    pub fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), None);
    }

    /// Replaces the text of an input.
    pub fn fill(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), None);
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        );
    }

    pub fn text(&self, css: &str) -> String {
        let e = self.find(css);
        self.cmd("GET", &format!("/element/{e}/text"), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Runs `script` in the page (its `return` value).
    pub fn script(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Saves a screenshot as `target/screenshots/NAME.png`; its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let p = self.shots.join(format!("{name}.png"));
        std::fs::write(&p, png).unwrap();
        p
    }

    /// Polls `f` every 200 ms until `Some`, failing after `secs`.
    pub fn wait_for<T>(&self, what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
        let t = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.url).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What [`fs_snapshot`] put in its filesystem.
pub struct FsSnapshot {
    pub id: String,
    /// `vda/etc/motd`'s text.
    pub motd: String,
    /// `vda/data/blob.bin`'s bytes.
    pub blob: Vec<u8>,
}

/// Backs up a real ext4 image (made by mkfs.ext4 from a directory) as
/// disk `vda` of source `fsimg`: a snapshot whose files the dashboard lists.
pub fn fs_snapshot(env: &Env) -> FsSnapshot {
    let dir = env.path("fs-tree");
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let motd = format!("welcome to {}\n", env.path("").display());
    let blob = testbed::fsimage::pattern(300 * 1024 + 17, 29);
    std::fs::write(dir.join("etc/motd"), &motd).unwrap();
    std::fs::write(dir.join("data/blob.bin"), &blob).unwrap();
    let image = env.path("fs.ext4");
    testbed::fsimage::ext4(&dir, &image, 16 << 20, "webfs", &[]).unwrap();
    let v = env.json(&[
        "backup",
        "image",
        image.to_str().unwrap(),
        "--source",
        "fsimg",
        "--disk",
        "vda",
        "--json",
    ]);
    FsSnapshot {
        id: v["snapshot"].as_str().unwrap().to_string(),
        motd,
        blob,
    }
}

/// A test VM whose domain XML names `policy`.
pub fn protected_vm(image: &testbed::Image, policy: &str) -> testbed::Vm {
    testbed::Vm::define(
        image,
        testbed::VmOptions {
            metadata_xml: Some(super::common::policy_xml(policy)),
            ..testbed::VmOptions::default()
        },
    )
    .unwrap()
}
