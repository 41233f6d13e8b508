//! `bulwark web` over HTTP against a real agent, libvirtd and repository:
//! login, wrong password, rate limit, roles, CSRF, every API endpoint, and
//! another host's dashboard read over HTTPS with a token.

#[path = "vm_common/mod.rs"]
mod common;
#[path = "web_common/mod.rs"]
mod web;

use std::process::Command;

use common::*;
use serde_json::json;
use testbed::Image;
use web::*;

/// Login, the rate limit, sessions, CSRF and roles; plain HTTP beyond
/// loopback refused; a peer over HTTPS with a bearer token.
#[test]
fn sessions_csrf_roles_and_rate_limit() {
    let env = Env::new();
    let users = env.path("users.toml");
    add_user(&env, &users, "ada", "admin");
    add_user(&env, &users, "vic", "viewer");
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(text.contains("$argon2id$") && !text.contains(UPW), "{text}");
    let agent = Agent::start(&env, 3600, &web_section(&users));
    let server = WebServer::start(&env, &env.path("agent.toml"), vec![]);

    // Without a session: 401 everywhere in the API, pages go to the login.
    let anon = Client::new(&server.base);
    assert_eq!(anon.get("/api/v1/status").0, 401);
    assert_eq!(anon.post("/api/v1/restore", json!({"vms": []})).0, 401);
    let (s, _, loc) = anon.page("/repositories");
    assert_eq!(s, 303);
    assert_eq!(loc.as_deref(), Some("/login?next=/repositories"));
    let (s, html, _) = anon.page("/login");
    assert_eq!(s, 200);
    assert!(html.contains("data-api=\"/api/v1/login\""), "{html}");

    // Wrong password, unknown user: 401, no cookie.
    let mut c = Client::new(&server.base);
    assert_eq!(c.login("ada", "not the password").0, 401);
    assert_eq!(c.login("nobody", UPW).0, 401);
    assert!(c.cookie.is_none());

    // The right one: a session and a CSRF token.
    let (s, v) = c.login("ada", UPW);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["role"], "admin");
    assert_eq!(v["csrf"].as_str().unwrap().len(), 64);
    let (s, doc) = c.get("/api/v1/status");
    assert_eq!(s, 200, "{doc}");
    // The agent's status document, as `agent status --json` prints it.
    let cli = agent.status(&env);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["host"], cli["host"]);
    assert_eq!(
        doc.as_object().unwrap().keys().collect::<Vec<_>>(),
        cli.as_object().unwrap().keys().collect::<Vec<_>>()
    );

    // A change without the token (or with another) is refused, and does nothing.
    let body = json!({"domain": "no-such-domain"});
    let (s, v) = c.post_with("/api/v1/unprotect", body.clone(), false);
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("X-CSRF-Token"), "{v}");
    let mut forged = Client::new(&server.base);
    forged.cookie = c.cookie.clone();
    forged.csrf = Some("0".repeat(64));
    assert_eq!(forged.post("/api/v1/unprotect", body.clone()).0, 403);
    // With it, the request goes through (and fails on the missing domain).
    let (s, v) = c.post("/api/v1/unprotect", body);
    assert_eq!(s, 500, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("no-such-domain"),
        "{v}"
    );

    // A viewer sees, but may not restore (403 before anything is read).
    let mut viewer = Client::new(&server.base);
    assert_eq!(viewer.login("vic", UPW).0, 200);
    assert_eq!(viewer.get("/api/v1/status").0, 200);
    let (s, v) = viewer.post(
        "/api/v1/restore",
        json!({"vms": [{"snapshot": "x@latest", "as": "y"}]}),
    );
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("operator"), "{v}");
    assert_eq!(viewer.post("/api/v1/backup", json!({"domain": "x"})).0, 403);
    assert_eq!(
        viewer.post("/api/v1/repositories/main/gc", json!({})).0,
        403
    );
    assert!(viewer.get("/api/v1/tasks").1.as_array().unwrap().is_empty());

    // Logout ends the session.
    assert_eq!(viewer.post("/api/v1/logout", json!({})).0, 200);
    assert_eq!(viewer.get("/api/v1/status").0, 401);

    // Rate limit: five failures from one address (two above, three here),
    // then 429 even with the right password.
    let mut r = Client::new(&server.base);
    for _ in 0..3 {
        assert_eq!(r.login("vic", "guess guess").0, 401);
    }
    let (s, v) = r.login("vic", UPW);
    assert_eq!(s, 429, "{v}");
    assert!(v["error"].as_str().unwrap().contains("try again"), "{v}");
    assert!(r.cookie.is_none());

    // Every action is in the audit log with its user.
    let audit = std::fs::read_to_string(env.state_dir().join("web/audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["user"] == "ada" && l["action"] == "login" && l["outcome"] == "ok"));
    assert!(lines
        .iter()
        .any(|l| l["user"] == "ada" && l["action"] == "unprotect" && l["outcome"] == "failed"));
    assert!(lines
        .iter()
        .any(|l| l["user"] == "vic" && l["outcome"] == "refused: rate limit"));

    // Plain HTTP beyond loopback: refused without --insecure, before binding.
    let out = env.run(&[
        "web",
        "--config",
        env.path("agent.toml").to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    assert!(testbed::cli::stderr(&out).contains("--insecure"), "{out:?}");

    // Another host's dashboard over HTTPS, read with a token.
    let pki = testbed::nbd::certs::make_pki(&env.path("pki"));
    let token = env.ok(&[
        "web",
        "token",
        "add",
        "hv1",
        "--users-file",
        users.to_str().unwrap(),
    ]);
    let token = token.trim();
    let peer_cfg = env.path("peer.toml");
    std::fs::write(
        &peer_cfg,
        format!(
            "state_dir = {:?}\nsocket = {:?}\n[web]\nusers_file = {users:?}\n\
             tls_cert = {:?}\ntls_key = {:?}\n",
            env.path("peer-state"),
            agent.socket,
            pki.server_open.join("server-cert.pem"),
            pki.server_open.join("server-key.pem"),
        ),
    )
    .unwrap();
    let peer = WebServer::start(&env, &peer_cfg, vec![]);
    assert!(peer.base.starts_with("https://"), "{}", peer.base);
    let port = peer.base.rsplit(':').next().unwrap();
    let front_cfg = env.path("front.toml");
    std::fs::write(
        &front_cfg,
        format!(
            "state_dir = {:?}\nsocket = {:?}\n[web]\nusers_file = {users:?}\n\
             [[web.peers]]\nname = \"hv1\"\nurl = \"https://localhost:{port}\"\ntoken = {token:?}\nca_file = {:?}\n\
             [[web.peers]]\nname = \"liar\"\nurl = \"https://localhost:{port}\"\ntoken = \"wrong\"\nca_file = {:?}\n",
            env.path("front-state"),
            agent.socket,
            pki.anonymous.join("ca-cert.pem"),
            pki.anonymous.join("ca-cert.pem"),
        ),
    )
    .unwrap();
    let front = WebServer::start(&env, &front_cfg, vec![]);
    let mut f = Client::new(&front.base);
    assert_eq!(f.login("ada", UPW).0, 200);
    let hosts = wait_for("the peers' answers", 30, || {
        let (_, v) = f.get("/api/v1/hosts");
        (v[0]["at"].as_i64() > Some(0)).then_some(v)
    });
    assert_eq!(hosts[0]["name"], "hv1");
    assert_eq!(hosts[0]["ok"], true, "{hosts}");
    assert_eq!(hosts[0]["status"]["host"], cli["host"]);
    assert_eq!(hosts[1]["ok"], false);
    assert!(
        hosts[1]["error"].as_str().unwrap().contains("401"),
        "{hosts}"
    );
    // The overview shows both hosts.
    let (s, html, _) = f.page("/");
    assert_eq!(s, 200);
    assert!(
        html.contains("id=\"host-hv1\"") && html.contains("id=\"host-liar\""),
        "{html}"
    );
    // A bearer token is read-only here: no change with a viewer token.
    let mut t = Client::new(&front.base);
    t.bearer = Some(token.to_string());
    assert_eq!(t.get("/api/v1/status").0, 200);
    assert_eq!(t.post("/api/v1/backup", json!({"domain": "x"})).0, 403);
}

/// Every endpoint against a real VM: back up, protect, restore (bit for
/// bit), snapshots, tasks, prune, repositories, verify, GC, files (list,
/// download, zip).
#[test]
fn every_endpoint_against_a_real_vm() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let policy = format!("web-{}", std::process::id());
    let users = env.path("users.toml");
    add_user(&env, &users, "ada", "admin");
    add_user(&env, &users, "opa", "operator");
    let vm = protected_vm(&image, &policy);
    let name = vm.name().to_string();
    // Backups here come from the API only, not from the schedule.
    env.seed_runs(&[format!("{name}/{policy}"), format!("{name}/other-{policy}")]);
    let _agent = Agent::start(
        &env,
        3600,
        &format!(
            "[policies.{policy}]\nrepository = \"main\"\nschedule = \"yearly\"\nkeep_last = 5\n\
             [policies.other-{policy}]\nrepository = \"main\"\nschedule = \"yearly\"\n{}",
            web_section(&users)
        ),
    );
    let server = WebServer::start(&env, &env.path("agent.toml"), vec![]);
    let mut c = Client::new(&server.base);
    assert_eq!(c.login("opa", UPW).0, 200);

    // Back up now (a task: the agent's backup).
    let (s, v) = c.post("/api/v1/backup", json!({"domain": name, "full": true}));
    assert_eq!(s, 202, "{v}");
    let t = c.wait_task(v["task"].as_u64().unwrap(), 300);
    assert_eq!(t["state"], "done", "{t}");
    let snap = t["result"]["snapshot"].as_str().unwrap().to_string();
    assert_eq!(t["user"], "opa");
    // The snapshot is listed (the cache refreshed after the backup).
    let (_, snaps) = c.get(&format!("/api/v1/snapshots?source={name}"));
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_eq!(snaps[0]["id"], snap.as_str());
    assert_eq!(snaps[0]["policy"], policy.as_str());
    assert_eq!(snaps[0]["vm"], true);
    assert!(snaps[0]["stored"].as_u64().unwrap() > 0);
    // The VM page lists it, with its restore link.
    let (s, html, _) = c.page(&format!("/vm/{name}"));
    assert_eq!(s, 200);
    assert!(
        html.contains(&format!("data-snapshot=\"{snap}\"")),
        "{html}"
    );

    // Protect and unprotect are admin's.
    let both = json!({"domain": name, "policies": [policy, format!("other-{policy}")]});
    assert_eq!(c.post("/api/v1/protect", both.clone()).0, 403);
    let mut admin = Client::new(&server.base);
    assert_eq!(admin.login("ada", UPW).0, 200);
    let (s, v) = admin.post("/api/v1/protect", both);
    assert_eq!(s, 200, "{v}");
    let xml = virsh(&["dumpxml", &name, "--inactive"]);
    assert!(
        xml.contains(&format!("name='other-{policy}'"))
            || xml.contains(&format!("name=\"other-{policy}\"")),
        "{xml}"
    );
    assert_eq!(
        admin
            .post(
                "/api/v1/protect",
                json!({"domain": name, "policies": ["nope"]})
            )
            .0,
        400
    );
    let (s, v) = admin.post("/api/v1/unprotect", json!({"domain": name}));
    assert_eq!(s, 200, "{v}");
    assert!(!virsh(&["dumpxml", &name, "--inactive"]).contains(&policy));

    // A full restore through the API, compared bit for bit with the snapshot.
    let images = env.path("images");
    let new = testbed::unique_name("bw-webr");
    let _made = Restored(vec![new.clone()]);
    let (s, v) = c.post(
        "/api/v1/restore",
        json!({"vms": [{"snapshot": snap, "as": new, "storage_dir": images}]}),
    );
    assert_eq!(s, 202, "{v}");
    let id = v["task"].as_u64().unwrap();
    let t = c.wait_task(id, 300);
    assert_eq!(t["state"], "done", "{t}");
    assert_eq!(t["items"][0]["state"], "done");
    assert_eq!(t["items"][0]["bytes_done"], t["items"][0]["bytes_total"]);
    assert_eq!(
        t["items"][0]["bytes_total"].as_u64().unwrap(),
        image.disk_size()
    );
    assert!(t["lines"].as_array().unwrap().len() > 1, "{t}");
    assert_eq!(virsh(&["domstate", &new]).trim(), "shut off");
    let got = env.path("got.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(images.join(format!("{new}-vda.qcow2")))
        .arg(&got)
        .status()
        .unwrap();
    assert!(st.success());
    env.assert_restores_to(&snap, "vda", &got);
    // The same name again: refused at planning, nothing touched.
    let (_, v) = c.post(
        "/api/v1/restore",
        json!({"vms": [{"snapshot": snap, "as": new, "storage_dir": images}]}),
    );
    let t = c.wait_task(v["task"].as_u64().unwrap(), 120);
    assert_eq!(t["state"], "failed", "{t}");
    assert!(
        t["error"].as_str().unwrap().contains("exists already"),
        "{t}"
    );
    // Bad requests are refused before any task.
    assert_eq!(c.post("/api/v1/restore", json!({"vms": []})).0, 400);
    assert_eq!(
        c.post("/api/v1/restore", json!({"vms": [{"snapshot": snap}]}))
            .0,
        400
    );

    // Tasks: newest first; a finished one cannot be cancelled.
    let (_, tasks) = c.get("/api/v1/tasks");
    assert_eq!(tasks.as_array().unwrap().len(), 3, "{tasks}");
    assert_eq!(tasks[2]["kind"], "backup");
    assert_eq!(
        c.post(&format!("/api/v1/tasks/{id}/cancel"), json!({})).0,
        409
    );
    assert_eq!(c.get("/api/v1/tasks/999").0, 404);
    assert_eq!(c.get("/api/v1/live").1, json!([]));

    // Two more backups, then prune: simulated (anyone), then for real (admin).
    for _ in 0..2 {
        let (_, v) = c.post("/api/v1/backup", json!({"domain": name, "policy": policy}));
        assert_eq!(
            c.wait_task(v["task"].as_u64().unwrap(), 300)["state"],
            "done"
        );
    }
    let q = json!({"source": name, "policy": policy, "keep_last": 1});
    let (s, sim) = c.post("/api/v1/prune/simulate", q.clone());
    assert_eq!(s, 200, "{sim}");
    assert_eq!(
        (sim["kept"].as_u64(), sim["removed"].as_u64()),
        (Some(1), Some(2)),
        "{sim}"
    );
    assert_eq!(sim["snapshots"][0]["rule"], "keep-last");
    let kept = sim["snapshots"][0]["id"].clone();
    assert_eq!(c.post("/api/v1/prune", q.clone()).0, 403);
    let (s, v) = admin.post("/api/v1/prune", q);
    assert_eq!(s, 202, "{v}");
    let t = admin.wait_task(v["task"].as_u64().unwrap(), 120);
    assert_eq!(t["result"]["removed"], 2, "{t}");
    let ids = env.bw().snapshot_ids();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(json!(ids[0]), kept);
    // A synthetic schedule is simulated only.
    let (s, sim) = c.post(
        "/api/v1/prune/simulate",
        json!({"schedule": "every 6h", "days": 10, "keep_daily": 3}),
    );
    assert_eq!(s, 200, "{sim}");
    assert_eq!(sim["kept"], 3, "{sim}");
    assert_eq!(
        admin
            .post(
                "/api/v1/prune",
                json!({"schedule": "daily", "keep_daily": 1})
            )
            .0,
        400
    );

    // Repositories, verify and GC.
    let (_, v) = c.post("/api/v1/repositories/main/verify", json!({}));
    assert_eq!(
        c.wait_task(v["task"].as_u64().unwrap(), 300)["state"],
        "done"
    );
    let (_, v) = admin.post("/api/v1/repositories/main/gc", json!({}));
    assert_eq!(
        admin.wait_task(v["task"].as_u64().unwrap(), 300)["state"],
        "done"
    );
    let repos = wait_for("the repository's figures", 60, || {
        let (_, r) = c.get("/api/v1/repositories");
        (r[0]["snapshots"] == 1 && r[0]["usable"] == true).then_some(r)
    });
    let r = &repos[0];
    assert_eq!(r["name"], "main");
    assert_eq!(r["last_verify"]["ok"], true, "{r}");
    assert!(r["stored_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["total_bytes"].as_u64() > r["stored_bytes"].as_u64(),
        "{r}"
    );
    assert_eq!(r["logical_bytes"].as_u64().unwrap(), image.disk_size());
    assert!(r["dedup_ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(c.post("/api/v1/repositories/nope/verify", json!({})).0, 404);

    // Files: a real ext4 image's snapshot, listed and downloaded.
    let fs = fs_snapshot(&env);
    let (s, v) = c.get(&format!("/api/v1/files?snapshot={}", fs.id));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["volumes"][0]["path"], "vda", "{v}");
    assert_eq!(v["volumes"][0]["content"], "ext4", "{v}");
    let (s, v) = c.get(&format!("/api/v1/files?snapshot={}&path=vda/data", fs.id));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["entry"]["type"], "dir", "{v}");
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["blob.bin"], "{v}");
    assert_eq!(v["entries"][0]["size"], fs.blob.len(), "{v}");
    let (s, _, body) = c.bytes(&format!(
        "/api/v1/files/download?snapshot={}&path=vda/data/blob.bin",
        fs.id
    ));
    assert_eq!(s, 200);
    assert!(body == fs.blob, "the download differs from the file");
    // A tree as a zip: every file, byte for byte.
    let (s, refused, body) = c.bytes(&format!(
        "/api/v1/files/download?snapshot={}&path=vda&format=zip",
        fs.id
    ));
    assert_eq!((s, refused.as_deref()), (200, Some("0")));
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(body)).unwrap();
    let mut read = |name: &str| {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut z.by_name(name).unwrap(), &mut out).unwrap();
        out
    };
    assert!(read("vda/data/blob.bin") == fs.blob);
    assert_eq!(read("vda/etc/motd"), fs.motd.as_bytes());
    // Bad paths and snapshots: 404; a viewer may list, not download.
    assert_eq!(
        c.get(&format!("/api/v1/files?snapshot={}&path=vda/nope", fs.id))
            .0,
        404
    );
    assert_eq!(c.get("/api/v1/files?snapshot=ffffffffffff").0, 404);
    assert_eq!(c.get("/api/v1/files").0, 400);
    add_user(&env, &users, "vic", "viewer");
    let mut viewer = Client::new(&server.base);
    assert_eq!(viewer.login("vic", UPW).0, 200);
    assert_eq!(
        viewer
            .get(&format!("/api/v1/files?snapshot={}&path=vda/etc", fs.id))
            .0,
        200
    );
    assert_eq!(
        viewer
            .get(&format!(
                "/api/v1/files/download?snapshot={}&path=vda/etc/motd",
                fs.id
            ))
            .0,
        403
    );
    assert_eq!(c.get("/api/v1/nothing-here").0, 404);
    drop(vm);
}
