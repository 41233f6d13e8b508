//! The JSON API under `/api/v1` (documented in `docs/web.md`): what every
//! page is built on, and what scripts use. Without a session (or a bearer
//! token) it answers 401; a change through a session needs the session's
//! CSRF token in `X-CSRF-Token` (403 without it); each change needs its
//! role (403 for less) and is recorded with its user.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{same, Role, Users};
use super::tasks::{State as TaskState, Verified};
use super::{simulate, status, worker, Web};

pub const COOKIE: &str = "bulwark_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
    fn not_found(what: impl Into<String>) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, what.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError::internal(format!("{e:#}"))
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// Who is asking, and through what.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: String,
    pub role: Role,
    /// The session's CSRF token (none for a bearer token).
    pub csrf: Option<String>,
    /// The session cookie's value.
    pub session: Option<String>,
}

impl Caller {
    /// 403 unless the caller has at least `role`.
    pub fn need(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "{} may not do this: it needs the {} role",
                    self.role.as_str(),
                    role.as_str()
                ),
            ))
        }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Authenticates a request: a bearer token from the users file, else the
/// session cookie; for a change through a session, the CSRF token too.
pub fn authenticate(web: &Web, parts: &Parts) -> Result<Caller, ApiError> {
    let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, m.to_string());
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|a| a.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("Authorization: expected Bearer TOKEN"))?;
        let users = Users::load(&web.conf.users_file)?;
        let (name, role) = users
            .check_token(token.trim())
            .ok_or_else(|| unauthorized("unknown token"))?;
        return Ok(Caller {
            user: format!("token:{name}"),
            role,
            csrf: None,
            session: None,
        });
    }
    let id = cookie(&parts.headers, COOKIE).ok_or_else(|| unauthorized("not logged in"))?;
    let s = web
        .sessions
        .get(&id)
        .ok_or_else(|| unauthorized("session expired: log in again"))?;
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        let sent = parts
            .headers
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !same(sent, s.csrf.as_bytes()) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "missing or wrong X-CSRF-Token: send the token login returned".into(),
            ));
        }
    }
    Ok(Caller {
        user: s.user,
        role: s.role,
        csrf: Some(s.csrf),
        session: Some(id),
    })
}

impl FromRequestParts<Arc<Web>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        web: &Arc<Web>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(web, parts)
    }
}

/// Runs blocking work (sockets, libvirt, the repository) off the runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

/// `GET /api/v1`: the endpoints.
pub async fn index() -> Json<Value> {
    Json(json!({
        "endpoints": [
            "POST /api/v1/login {user, password} -> {user, role, csrf} + session cookie",
            "POST /api/v1/logout",
            "GET  /api/v1/status (the agent's status document)",
            "GET  /api/v1/hosts (other hosts' status documents)",
            "GET  /api/v1/snapshots?source=&repository=",
            "POST /api/v1/backup {domain, policy?, full?} (operator)",
            "POST /api/v1/protect {domain, policies} (admin)",
            "POST /api/v1/unprotect {domain} (admin)",
            "POST /api/v1/restore {repository?, vms: [{snapshot, as, live?, storage_dir?, start?}]} (operator)",
            "GET  /api/v1/tasks, GET /api/v1/tasks/{id}, POST /api/v1/tasks/{id}/cancel (operator)",
            "GET  /api/v1/live, POST /api/v1/live/{name}/cancel (operator)",
            "POST /api/v1/prune/simulate {repository?, source?, policy?, schedule?, days?, keep_*}",
            "POST /api/v1/prune {repository?, source, policy?, keep_*} (admin)",
            "GET  /api/v1/repositories, POST /api/v1/repositories/{name}/verify (operator), .../gc (admin)",
            "GET  /api/v1/files?snapshot=&path=&repository= (volumes, or an entry and its entries)",
            "GET  /api/v1/files/download?snapshot=&path=&repository=&format=zip? (operator: a file, or a zip)",
        ]
    }))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such API endpoint: see GET /api/v1")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    user: String,
    password: String,
}

/// `POST /api/v1/login`: a session cookie and the CSRF token, or 401; 429
/// once the rate limit is reached.
pub async fn login(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(l): Json<Login>,
) -> ApiResult {
    let addr = peer.ip().to_string();
    if let Err(wait) = web.limiter.check(&addr, &l.user) {
        web.audit.record(
            &l.user,
            "login",
            json!({"from": addr}),
            "refused: rate limit",
        );
        let mut r = ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed logins: try again in {wait}s"),
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return Ok(r);
    }
    let path = web.conf.users_file.clone();
    let (user, password) = (l.user.clone(), l.password);
    let role = blocking(move || Ok(Users::load(&path)?.check_password(&user, &password))).await?;
    let Some(role) = role else {
        web.limiter.failed(&addr, &l.user);
        web.audit.record(
            &l.user,
            "login",
            json!({"from": addr}),
            "refused: wrong user or password",
        );
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong user or password".into(),
        ));
    };
    let (id, s) = web.sessions.create(&l.user, role);
    web.audit
        .record(&l.user, "login", json!({"from": addr}), "ok");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        web.sessions.ttl().as_secs(),
        if web.tls { "; Secure" } else { "" }
    );
    let mut r =
        Json(json!({"user": s.user, "role": role.as_str(), "csrf": s.csrf})).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(ApiError::internal)?,
    );
    Ok(r)
}

/// `POST /api/v1/logout`.
pub async fn logout(State(web): State<Arc<Web>>, c: Caller) -> ApiResult {
    if let Some(id) = &c.session {
        web.sessions.remove(id);
    }
    web.audit.record(&c.user, "logout", json!({}), "ok");
    let mut r = Json(json!({"ok": true})).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("bulwark_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(r)
}

/// `GET /api/v1/status`: the agent's status document, as `bulwark agent
/// status --json` prints it.
pub async fn status(State(web): State<Arc<Web>>, _c: Caller) -> ApiResult {
    let socket = web.cfg.socket.clone();
    let st = tokio::task::spawn_blocking(move || status::fetch(&socket))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, format!("{e:#}")))?;
    ok(status::document(st).map_err(ApiError::internal)?)
}

/// `GET /api/v1/hosts`: the other hosts, as last read.
pub async fn hosts(State(web): State<Arc<Web>>, _c: Caller) -> ApiResult {
    let v: Vec<Value> = web
        .peers
        .seen()
        .into_iter()
        .map(|s| match s.status {
            Ok(doc) => json!({"name": s.name, "url": s.url, "at": s.at, "ok": true, "status": doc}),
            Err(e) => json!({"name": s.name, "url": s.url, "at": s.at, "ok": false, "error": e}),
        })
        .collect();
    ok(json!(v))
}

#[derive(Deserialize)]
pub struct SnapQuery {
    source: Option<String>,
    repository: Option<String>,
}

/// `GET /api/v1/snapshots`: from the cache, newest first.
pub async fn snapshots(
    State(web): State<Arc<Web>>,
    _c: Caller,
    Query(q): Query<SnapQuery>,
) -> ApiResult {
    let view = web.cache.view();
    let mut out: Vec<Value> = Vec::new();
    for (name, r) in &view.repos {
        if q.repository.as_ref().is_some_and(|x| x != name) {
            continue;
        }
        let lists: Vec<_> = match &q.source {
            Some(s) => r.by_source.get(s).into_iter().collect(),
            None => r.by_source.values().collect(),
        };
        for s in lists.into_iter().flatten() {
            out.push(serde_json::to_value(&**s).map_err(ApiError::internal)?);
        }
    }
    out.sort_by(|a, b| b["time"].as_str().cmp(&a["time"].as_str()));
    ok(json!(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupReq {
    domain: String,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    full: bool,
}

/// `POST /api/v1/backup`: the agent backs the domain up now (a task).
pub async fn backup(State(web): State<Arc<Web>>, c: Caller, Json(b): Json<BackupReq>) -> ApiResult {
    c.need(Role::Operator)?;
    let detail = json!({"domain": b.domain, "policy": b.policy, "full": b.full});
    web.audit
        .record(&c.user, "backup", detail.clone(), "started");
    let t = web
        .tasks
        .add("backup", format!("backup of {}", b.domain), &c.user);
    let id = t.id;
    let w = web.clone();
    web.tasks.run(t, move |t| {
        let req = bulwark_proto::Request::Backup {
            domain: b.domain.clone(),
            policy: b.policy.clone(),
            full: b.full,
        };
        t.log(format!("asking the agent to back up {}", b.domain));
        let reply: bulwark_proto::Reply<bulwark_proto::Backed<Value>> = crate::daemon::request(
            &w.cfg.socket,
            &req,
            std::time::Duration::from_secs(24 * 3600),
        )?;
        let r = reply.into_result().map_err(anyhow::Error::from);
        let outcome = if r.is_ok() { "ok" } else { "failed" };
        w.audit.record(&t.user, "backup", detail, outcome);
        let report = r?.report;
        t.log(format!(
            "snapshot {}",
            report["snapshot"].as_str().unwrap_or("?")
        ));
        w.cache.refresh_all();
        Ok(report)
    });
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectReq {
    domain: String,
    #[serde(default)]
    policies: Vec<String>,
}

/// `POST /api/v1/protect`: names policies in the domain's XML, as
/// `bulwark protect` does (each must be usable on this host).
pub async fn protect(
    State(web): State<Arc<Web>>,
    c: Caller,
    Json(p): Json<ProtectReq>,
) -> ApiResult {
    c.need(Role::Admin)?;
    if p.policies.is_empty() {
        return Err(ApiError::bad("name at least one policy"));
    }
    for name in &p.policies {
        if !web.cfg.policies.contains_key(name) {
            return Err(ApiError::bad(format!("no policy {name:?} in the config")));
        }
        if let Some(why) = web.cfg.refusal(name) {
            return Err(ApiError::bad(why));
        }
    }
    set_policies(&web, &c, p.domain, Some(p.policies)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnprotectReq {
    domain: String,
}

/// `POST /api/v1/unprotect`: removes Bulwark's policies from the domain.
pub async fn unprotect(
    State(web): State<Arc<Web>>,
    c: Caller,
    Json(u): Json<UnprotectReq>,
) -> ApiResult {
    c.need(Role::Admin)?;
    set_policies(&web, &c, u.domain, None).await
}

async fn set_policies(
    web: &Arc<Web>,
    c: &Caller,
    domain: String,
    policies: Option<Vec<String>>,
) -> ApiResult {
    let action = if policies.is_some() {
        "protect"
    } else {
        "unprotect"
    };
    let detail = json!({"domain": domain, "policies": policies});
    let uri = web.cfg.libvirt_uri.clone();
    let r = blocking(move || {
        let dom = crate::libvirt::Libvirt::open(&uri)?.domain(&domain)?;
        let running = dom.state()? == crate::libvirt::State::Active;
        let xml = policies.as_deref().map(crate::vm::domain::policies_set_xml);
        dom.set_metadata(xml.as_deref(), running)?;
        Ok(())
    })
    .await;
    web.audit.record(
        &c.user,
        action,
        detail.clone(),
        if r.is_ok() { "ok" } else { "failed" },
    );
    r?;
    ok(json!({"ok": true, "action": action, "detail": detail}))
}

/// `POST /api/v1/restore`: starts the restores (one task); 202 with its id.
pub async fn restore(State(web): State<Arc<Web>>, c: Caller, body: axum::body::Bytes) -> ApiResult {
    c.need(Role::Operator)?;
    let job: worker::Job = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("bad restore request: {e}")))?;
    job.check().map_err(ApiError::bad)?;
    web.repository(job.repository.as_deref())
        .map_err(ApiError::bad)?;
    let detail = serde_json::to_value(&job).map_err(ApiError::internal)?;
    let names: Vec<&str> = job.vms.iter().map(|v| v.name.as_str()).collect();
    let t = web.tasks.add(
        "restore",
        format!("restore of {}", names.join(", ")),
        &c.user,
    );
    let r = worker::spawn(&web.config_path, t.clone(), &job);
    web.audit.record(
        &c.user,
        "restore",
        detail,
        if r.is_ok() { "started" } else { "failed" },
    );
    if let Err(e) = r {
        t.finish(TaskState::Failed(format!("{e:#}")), None);
        return Err(e.into());
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"task": t.id}))).into_response())
}

/// `GET /api/v1/tasks`: newest first, without their log lines.
pub async fn tasks(State(web): State<Arc<Web>>, _c: Caller) -> ApiResult {
    ok(json!(web
        .tasks
        .all()
        .iter()
        .map(|t| t.to_json(false))
        .collect::<Vec<_>>()))
}

pub async fn task(State(web): State<Arc<Web>>, _c: Caller, Path(id): Path<u64>) -> ApiResult {
    let t = web
        .tasks
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    ok(t.to_json(true))
}

pub async fn cancel_task(State(web): State<Arc<Web>>, c: Caller, Path(id): Path<u64>) -> ApiResult {
    c.need(Role::Operator)?;
    let t = web
        .tasks
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    let done = t.cancel();
    web.audit.record(
        &c.user,
        "cancel",
        json!({"task": id}),
        if done { "ok" } else { "refused: not running" },
    );
    if !done {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("task {id} is not running or cannot be cancelled"),
        ));
    }
    ok(json!({"ok": true}))
}

/// `GET /api/v1/live`: every live restore, with progress and ETA.
pub async fn live(State(web): State<Arc<Web>>, _c: Caller) -> ApiResult {
    let dir = web.cfg.state_dir.clone();
    let list = blocking(move || live_list(&dir)).await?;
    ok(json!(list))
}

/// The live restore records, as `bulwark restore status --json` shows them.
pub fn live_list(state_dir: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let records = crate::live::record::Records::new(state_dir);
    Ok(records
        .all()?
        .iter()
        .map(|r| {
            let (rate, eta) = r.rate_and_eta();
            let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
            v["bytes_total"] = json!(r.bytes_total());
            v["bytes_done"] = json!(r.bytes_done());
            v["bytes_per_second"] = json!(rate);
            v["eta_seconds"] = json!(eta);
            v
        })
        .collect())
}

pub async fn cancel_live(
    State(web): State<Arc<Web>>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    c.need(Role::Operator)?;
    let (dir, uri) = (web.cfg.state_dir.clone(), web.cfg.libvirt_uri.clone());
    let n = name.clone();
    let r = blocking(move || {
        let records = crate::live::record::Records::new(&dir);
        if !records.exists(&n) {
            anyhow::bail!("no live restore {n}");
        }
        crate::live::cancel(&records, &n, &uri, false)
    })
    .await;
    web.audit.record(
        &c.user,
        "cancel_live",
        json!({"name": name}),
        if r.is_ok() { "ok" } else { "failed" },
    );
    let r = r?;
    ok(json!({"ok": true, "name": r.name}))
}

/// `POST /api/v1/prune/simulate`: kept and removed, with the rule.
pub async fn simulate(
    State(web): State<Arc<Web>>,
    _c: Caller,
    Json(q): Json<simulate::Request>,
) -> ApiResult {
    let marks = run_simulation(&web, &q)?;
    let kept = marks.iter().filter(|m| m.kept()).count();
    ok(json!({"kept": kept, "removed": marks.len() - kept, "snapshots": marks}))
}

/// The marks for a simulation request (pages and API).
pub fn run_simulation(web: &Web, q: &simulate::Request) -> Result<Vec<simulate::Mark>, ApiError> {
    let keep = q.keep();
    if !keep.any() {
        return Err(ApiError::bad("set at least one keep number"));
    }
    let snaps: Vec<(chrono::DateTime<chrono::Utc>, Option<String>)> = if q.synthetic() {
        let schedule = q.schedule.as_deref().unwrap_or_default();
        simulate::synthetic(schedule, q.days.unwrap_or(90), chrono::Utc::now())
            .map_err(ApiError::bad)?
            .into_iter()
            .map(|t| (t, None))
            .collect()
    } else {
        group(web, q)?
            .into_iter()
            .map(|s| (s.time, Some(s.id.to_hex())))
            .collect()
    };
    simulate::decide(snaps, &keep, &chrono::Local).map_err(|e| ApiError::bad(e.to_string()))
}

/// The snapshots of the requested group, from the cache.
fn group(
    web: &Web,
    q: &simulate::Request,
) -> Result<Vec<std::sync::Arc<super::cache::Snap>>, ApiError> {
    let repo = web
        .repository(q.repository.as_deref())
        .map_err(ApiError::bad)?;
    let source = q
        .source
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad("name a source (VM) or a synthetic schedule"))?;
    let view = web.cache.view();
    let policy = q.policy.as_deref().filter(|p| !p.is_empty());
    Ok(view
        .repos
        .get(&repo)
        .and_then(|r| r.by_source.get(source))
        .into_iter()
        .flatten()
        .filter(|s| s.policy.as_deref() == policy)
        .cloned()
        .collect())
}

/// `POST /api/v1/prune`: prunes one group now (admin), as `bulwark prune`.
pub async fn prune(
    State(web): State<Arc<Web>>,
    c: Caller,
    Json(q): Json<simulate::Request>,
) -> ApiResult {
    c.need(Role::Admin)?;
    if q.synthetic() {
        return Err(ApiError::bad("a synthetic schedule can only be simulated"));
    }
    let keep = q.keep();
    if !keep.any() {
        return Err(ApiError::bad("set at least one keep number"));
    }
    let repo_name = web
        .repository(q.repository.as_deref())
        .map_err(ApiError::bad)?;
    let source = q
        .source
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad("name a source"))?;
    let policy = q.policy.clone().filter(|p| !p.is_empty());
    let detail = json!({"repository": repo_name, "source": source, "policy": policy, "keep": keep});
    web.audit
        .record(&c.user, "prune", detail.clone(), "started");
    let t = web.tasks.add(
        "prune",
        format!("prune of {source} in {repo_name}"),
        &c.user,
    );
    let id = t.id;
    let w = web.clone();
    web.tasks.run(t, move |t| {
        let repo = w.cache.maintenance_repo(&repo_name)?;
        let snaps: Vec<_> = repo
            .snapshots()?
            .into_iter()
            .filter(|s| s.source == source && s.policy == policy)
            .collect();
        let decisions = bulwark_store::maintain::prune::plan(snaps, &keep, &chrono::Local)?;
        for d in &decisions {
            t.log(format!(
                "{} {} {}",
                d.snapshot.id.short(),
                d.snapshot
                    .time
                    .with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M"),
                d.rule.map_or("remove", |r| r.as_str())
            ));
        }
        let n = bulwark_store::maintain::prune::execute(&repo, &decisions)?;
        w.audit
            .record(&t.user, "prune", detail, &format!("ok: {n} removed"));
        w.cache.changed(&repo_name);
        Ok(json!({"removed": n, "kept": decisions.len() - n}))
    });
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))).into_response())
}

/// `GET /api/v1/repositories`: sizes, dedup, health, last GC and verify.
pub async fn repositories(State(web): State<Arc<Web>>, _c: Caller) -> ApiResult {
    // Without the agent the rows still show the repositories, unchecked.
    let st = status::ask(&web).await.ok();
    ok(json!(repository_rows(&web, st.as_ref())))
}

/// One JSON object per configured repository.
pub fn repository_rows(web: &Web, st: Option<&status::Status>) -> Vec<Value> {
    let view = web.cache.view();
    let verified = web.tasks.verified();
    web.cfg
        .repositories
        .iter()
        .map(|(name, rc)| {
            let r = view.repos.get(name);
            let target = st.and_then(|s| s.targets.get(name));
            let gc = st.and_then(|s| s.gcs.get(name));
            json!({
                "name": name,
                "location": rc.path,
                "usable": target.map(|t| t.ok),
                "checked": target.map(|t| t.checked),
                "problem": target.and_then(|t| t.error.clone()),
                "snapshots": r.map(|r| r.snapshots),
                "logical_bytes": r.map(|r| r.logical),
                "data_bytes": r.map(|r| r.data),
                "stored_bytes": r.map(|r| r.sizes.stored),
                "total_bytes": r.map(|r| r.sizes.total),
                "packs": r.map(|r| r.sizes.packs),
                "dedup_ratio": r.map(|r| r.dedup_ratio()),
                "refreshed": r.and_then(|r| r.refreshed),
                "error": r.and_then(|r| r.error.clone()),
                "last_gc": gc.map(|g| json!({"at": g.at, "ok": g.ok, "error": g.error, "bytes_deleted": g.bytes_deleted})),
                "last_verify": verified.get(name),
            })
        })
        .collect()
}

/// `POST /api/v1/repositories/{name}/verify` (operator): re-reads every chunk.
pub async fn verify(State(web): State<Arc<Web>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    let name = web.repository(Some(&name)).map_err(ApiError::not_found)?;
    web.audit
        .record(&c.user, "verify", json!({"repository": name}), "started");
    let t = web
        .tasks
        .add("verify", format!("verify of {name}"), &c.user);
    let id = t.id;
    let w = web.clone();
    web.tasks.run(t, move |t| {
        let r = (|| -> anyhow::Result<bulwark_store::maintain::verify::VerifyReport> {
            let repo = w.cache.repo(&name)?;
            let snaps = repo.snapshots()?;
            t.log(format!("checking {} snapshots", snaps.len()));
            Ok(bulwark_store::maintain::verify::verify(
                &repo,
                &snaps,
                2,
                &|_| {},
            )?)
        })();
        let v = match &r {
            Ok(rep) => Verified {
                at: chrono::Utc::now().timestamp(),
                ok: rep.damaged.is_empty(),
                snapshots: rep.snapshots,
                damaged: rep.damaged.len(),
                error: None,
            },
            Err(e) => Verified {
                at: chrono::Utc::now().timestamp(),
                ok: false,
                error: Some(format!("{e:#}")),
                ..Verified::default()
            },
        };
        w.tasks.record_verify(&name, v.clone())?;
        w.audit.record(
            &t.user,
            "verify",
            json!({"repository": name}),
            if v.ok { "ok" } else { "damaged" },
        );
        let rep = r?;
        for d in &rep.damaged {
            t.log(format!("DAMAGED {}: {}", d.object, d.reason));
        }
        if !rep.damaged.is_empty() {
            anyhow::bail!("{} damaged object(s)", rep.damaged.len());
        }
        Ok(serde_json::to_value(&rep)?)
    });
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))).into_response())
}

/// `POST /api/v1/repositories/{name}/gc` (admin): a GC with the
/// repository's grace period.
pub async fn gc(State(web): State<Arc<Web>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Admin)?;
    let name = web.repository(Some(&name)).map_err(ApiError::not_found)?;
    web.audit
        .record(&c.user, "gc", json!({"repository": name}), "started");
    let t = web.tasks.add("gc", format!("gc of {name}"), &c.user);
    let id = t.id;
    let w = web.clone();
    web.tasks.run(t, move |t| {
        let rc = &w.cfg.repositories[&name];
        let r = (|| -> anyhow::Result<bulwark_store::maintain::gc::GcReport> {
            let opts = bulwark_store::maintain::gc::GcOptions {
                grace: rc.gc_grace()?,
                ..Default::default()
            };
            let repo = w.cache.maintenance_repo(&name)?;
            Ok(bulwark_store::maintain::gc::run(&repo, &opts, &|step| t.log(step))?)
        })();
        w.audit.record(&t.user, "gc", json!({"repository": name}), if r.is_ok() { "ok" } else { "failed" });
        let rep = r?;
        w.cache.changed(&name);
        Ok(json!({"packs_deleted": rep.packs_deleted, "bytes_deleted": rep.bytes_deleted, "packs_condemned": rep.packs_condemned}))
    });
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))).into_response())
}
