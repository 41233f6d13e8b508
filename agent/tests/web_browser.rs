//! The dashboard in Debian's headless Chromium, driven over WebDriver:
//! log in, restore a real VM through the wizard (full, then live) and see
//! each boot, run the prune simulator on a crafted history and read its
//! kept/removed marks; browse a snapshot's files and download one; a
//! screenshot of every page in target/screenshots/.

#[path = "vm_common/mod.rs"]
mod common;
#[path = "web_common/mod.rs"]
mod web;

use std::collections::BTreeMap;

use common::*;
use serde_json::json;
use testbed::{Console, Image, BOOT_TIMEOUT};
use web::*;

#[test]
fn browser_logs_in_restores_full_and_live_simulates_prune_and_browses_files() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let policy = format!("wb-{}", std::process::id());
    let users = env.path("users.toml");
    add_user(&env, &users, "ops", "operator");
    let vm = protected_vm(&image, &policy);
    let name = vm.name().to_string();
    // Backups here come from the test only, not from the schedule.
    env.seed_runs(&[format!("{name}/{policy}")]);
    let agent = Agent::start(
        &env,
        3600,
        &format!(
            "[policies.{policy}]\nrepository = \"main\"\nschedule = \"yearly\"\n{}",
            web_section(&users)
        ),
    );
    let snap = agent.backup(&env, &name)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // A crafted history: a snapshot a day at noon for ten days, and one
    // more in the evening of the last.
    let small = env.path("small.raw");
    testbed::cli::sparse_image(&small, 1, 7);
    let mut times: Vec<String> = (1..=10)
        .map(|d| format!("2026-01-{d:02}T12:00:00Z"))
        .collect();
    times.push("2026-01-10T18:00:00Z".into());
    for t in &times {
        env.ok(&[
            "backup",
            "image",
            small.to_str().unwrap(),
            "--source",
            "crafted",
            "--time",
            t,
        ]);
    }
    let server = WebServer::start(&env, &env.path("agent.toml"), vec![]);
    let base = server.base.clone();
    let b = Browser::start();

    // Any page sends a stranger to the login form.
    b.goto(&format!("{base}/"));
    b.find("form#login");
    assert!(b.current_url().contains("/login"), "{}", b.current_url());
    b.screenshot("login");
    b.fill("#user", "ops");
    b.fill("#password", "wrong password");
    b.click("form#login button");
    b.wait_for("the refusal", 10, || {
        b.text("form#login .msg")
            .contains("wrong user or password")
            .then_some(())
    });
    b.fill("#password", UPW);
    b.click("form#login button");
    b.find("#overview");
    let row = b.wait_for("the VM in the overview", 30, || {
        b.try_find(&format!("a[href=\"/vm/{name}\"]"))
    });
    assert!(!row.is_empty());
    // The overview's whole load (document, CSS, JS) stays small.
    let bytes =
        b.script("return performance.getEntries().reduce((n, e) => n + (e.transferSize || 0), 0);");
    assert!(bytes.as_u64().unwrap() < 200_000, "{bytes}");
    b.screenshot("overview");

    // The VM page lists the snapshot.
    b.goto(&format!("{base}/vm/{name}"));
    b.find(&format!("tr[data-snapshot=\"{snap}\"]"));
    b.screenshot("vm");

    // The wizard, full restore: pick the VM, name it, start it, launch.
    let images = env.path("images");
    let full = testbed::unique_name("bw-webfull");
    let live = testbed::unique_name("bw-weblive");
    let _made = Restored(vec![full.clone(), live.clone()]);
    b.goto(&format!("{base}/restore"));
    b.click(&format!("input[name=vm][value=\"{name}\"]"));
    b.screenshot("restore-1");
    b.click("form#pick button[type=submit]");
    b.find("form#wizard");
    b.fill("tr.vm input[name=as]", &full);
    b.fill("tr.vm input[name=storage_dir]", images.to_str().unwrap());
    b.click("tr.vm input[name=start]");
    b.screenshot("restore-2");
    b.click("form#wizard button[type=submit]");
    b.wait_for("the task page", 30, || {
        b.current_url().contains("/tasks/").then_some(())
    });
    b.wait_for("the full restore", 300, || {
        let s =
            b.script("var e = document.querySelector('#task-state'); return e && e.dataset.state;");
        assert_ne!(s, json!("failed"), "{}", b.text("main"));
        (s == json!("done")).then_some(())
    });
    assert!(b.text("#items").contains(&full));
    b.screenshot("restore-3-task");
    let ready = Console::new(images.join(format!("{full}-serial0.log")))
        .wait_ready(BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(ready.marker, image.marker());

    // Live: the VM boots from the backup while the agent streams it in.
    b.goto(&format!("{base}/restore?vm={name}"));
    b.fill("tr.vm input[name=as]", &live);
    b.fill("tr.vm input[name=storage_dir]", images.to_str().unwrap());
    b.script("document.querySelector('tr.vm select[name=mode]').value = 'live'; return 1;");
    b.click("form#wizard button[type=submit]");
    b.wait_for("the task page", 30, || {
        b.current_url().contains("/tasks/").then_some(())
    });
    b.wait_for("the live restore's start", 120, || {
        let s = b.script(&format!(
            "var e = document.querySelector('tr[data-name=\"{live}\"]'); return e && e.dataset.state;"
        ));
        assert_ne!(s, json!("failed"), "{}", b.text("main"));
        (s == json!("live")).then_some(())
    });
    let ready = Console::new(images.join(format!("{live}-serial0.log")))
        .wait_ready(BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(ready.marker, image.marker());
    b.goto(&format!("{base}/live"));
    b.find(&format!("tr[data-name=\"{live}\"]"));
    b.screenshot("live");
    b.wait_for("the end of the stream", 300, || {
        b.try_find(&format!("tr[data-name=\"{live}\"][data-phase=\"done\"]"))
    });

    // The prune simulator on the crafted history, through its form.
    b.goto(&format!("{base}/prune"));
    b.script("document.querySelector('select[name=group]').value = 'crafted'; return 1;");
    b.fill("input[name=keep_last]", "2");
    b.fill("input[name=keep_daily]", "3");
    b.fill("input[name=keep_weekly]", "2");
    b.click("form#simulate button[type=submit]");
    b.find("#calendar");
    b.screenshot("prune");
    let marks = b.script(
        "return Array.from(document.querySelectorAll('#calendar li'))\
         .map(e => [e.dataset.t, e.className, e.dataset.rule]);",
    );
    let page: BTreeMap<String, (String, String)> = marks
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let t = chrono::DateTime::parse_from_rfc3339(m[0].as_str().unwrap()).unwrap();
            (
                t.to_utc().to_rfc3339(),
                (m[1].as_str().unwrap().into(), m[2].as_str().unwrap().into()),
            )
        })
        .collect();
    assert_eq!(page.len(), times.len(), "{marks}");
    // The same decisions as `bulwark prune --dry-run`.
    let cli = env.json(&[
        "prune",
        "--source",
        "crafted",
        "--keep-last",
        "2",
        "--keep-daily",
        "3",
        "--keep-weekly",
        "2",
        "--dry-run",
        "--json",
    ]);
    for d in cli.as_array().unwrap() {
        let t = chrono::DateTime::parse_from_rfc3339(d["time"].as_str().unwrap())
            .unwrap()
            .to_utc()
            .to_rfc3339();
        let (class, rule) = &page[&t];
        match d["rule"].as_str() {
            Some(r) => {
                assert_eq!(class, "k", "{t}: {d}");
                assert_eq!(format!("keep-{rule}"), r, "{t}");
            }
            None => assert_eq!((class.as_str(), rule.as_str()), ("r", "removed"), "{t}"),
        }
    }
    // By hand: the two newest by keep-last; days 9, 8, 7 by keep-daily.
    let rule_of = |t: &str| {
        page[&chrono::DateTime::parse_from_rfc3339(t)
            .unwrap()
            .to_utc()
            .to_rfc3339()]
            .1
            .clone()
    };
    assert_eq!(rule_of("2026-01-10T18:00:00Z"), "last");
    assert_eq!(rule_of("2026-01-10T12:00:00Z"), "last");
    assert_eq!(rule_of("2026-01-09T12:00:00Z"), "daily");
    assert_eq!(rule_of("2026-01-07T12:00:00Z"), "daily");
    let kept = cli
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .count();
    assert_eq!(
        b.script("return document.querySelector('#summary').dataset.kept;"),
        json!(kept.to_string())
    );
    // Nothing was deleted by simulating.
    assert_eq!(env.bw().snapshot_ids().len(), 1 + times.len());

    // The other pages.
    for (path, shot, css, says) in [
        ("/tasks", "tasks", "#tasks", "restore of"),
        ("/repositories", "repositories", "#repositories", "main"),
    ] {
        b.goto(&format!("{base}{path}"));
        assert!(b.text(css).contains(says), "{path}: {}", b.text(css));
        b.screenshot(shot);
    }

    // Files: walk a real ext4 snapshot to a file and download it.
    let fs = fs_snapshot(&env);
    // The picker lists it once the dashboard's cache has seen it.
    b.wait_for("the snapshot in the picker", 60, || {
        b.goto(&format!("{base}/files"));
        b.try_find(&format!("#snapshot option[value=\"{}\"]", fs.id))
    });
    b.script(&format!(
        "document.querySelector('#snapshot').value = '{}'; return 1;",
        fs.id
    ));
    b.click("form#pick-snapshot button[type=submit]");
    b.click("#volumes tr[data-path=\"vda\"] a");
    b.click("#entries tr[data-path=\"vda/etc\"] a");
    b.find("#entries tr[data-path=\"vda/etc/motd\"]");
    b.screenshot("files");
    b.click("#entries tr[data-path=\"vda/etc/motd\"] a");
    assert_eq!(
        b.text("#entry dd[data-bytes]"),
        format!("{} B", fs.motd.len())
    );
    let got = b.script(
        "var x = new XMLHttpRequest(); x.open('GET', document.querySelector('#download').href, false); \
         x.send(); return [x.status, x.responseText];",
    );
    assert_eq!(got, json!([200, fs.motd]));
    drop(vm);
}
