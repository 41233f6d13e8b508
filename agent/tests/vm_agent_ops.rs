//! The agent as an operator lives with it: calendar schedules kept on
//! time and across restarts, a VM backed up by two policies into two
//! repositories, enforcement (`[enforce]`), the status that reports all of
//! it, and the metrics textfile. Real libvirtd, real agent daemon, real
//! SMTP server on loopback.

mod vm_common;
use vm_common as common;
mod smtp_server;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;
use testbed::{Image, Vm, VmOptions};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn metadata(policies: &[&str]) -> String {
    let mut x =
        "<bulwark:policies xmlns:bulwark='https://bulwark.dev/xmlns/libvirt/1'>".to_string();
    for p in policies {
        x.push_str(&format!("<bulwark:policy name='{p}'/>"));
    }
    x + "</bulwark:policies>"
}

/// The run record of `key` in a status, if any.
fn run<'a>(status: &'a Value, key: &str) -> Option<&'a Value> {
    status["runs"].get(key)
}

fn snapshots(env: &Env, repo: &std::path::Path, source: &str) -> Vec<Value> {
    let v = env.json(&[
        "snapshots",
        "--json",
        "--repo",
        repo.to_str().unwrap(),
        "--source",
        source,
    ]);
    v.as_array().unwrap().clone()
}

/// Two policies of one VM, on calendar schedules at different seconds,
/// back up into two repositories, each when its schedule says. A restarted
/// agent remembers the last runs (nothing runs again early), and a run
/// missed while it was down runs once.
#[test]
fn calendar_schedules_keep_time_across_restarts_into_two_repositories() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let id = std::process::id();
    let (p1, p2) = (format!("ten-{id}"), format!("twenty-{id}"));
    let vm = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(metadata(&[&p1, &p2])),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let name = vm.name().to_string();
    let second = env.path("second-repo");
    env.ok(&["repo", "init", "--repo", second.to_str().unwrap()]);
    let (k1, k2) = (format!("{name}/{p1}"), format!("{name}/{p2}"));
    // Both "ran" just now: the first runs are the schedules' own.
    let seed = |at1: u64, at2: u64| {
        std::fs::create_dir_all(env.state_dir()).unwrap();
        let s = serde_json::json!({"runs": {
            &k1: {"at": at1, "ok": true},
            &k2: {"at": at2, "ok": true},
        }});
        std::fs::write(env.state_dir().join("schedule.json"), s.to_string()).unwrap();
    };
    seed(now(), now());
    let config = |s1: &str, s2: &str| {
        format!(
            "[repositories.second]\npath = {second:?}\npassword_file = {pw:?}\n\
             [policies.{p1}]\nrepository = \"main\"\nschedule = \"{s1}\"\n\
             [policies.{p2}]\nrepository = \"second\"\nschedule = \"{s2}\"\n",
            pw = env.path("pw"),
        )
    };
    // p1 at :00, :10, :20 ...; p2 at :05, :25, :45: they never meet.
    // The shipped `tick_seconds` (30): the agent wakes at each due time,
    // not at its ticks.
    let agent = Agent::start(&env, 30, &config("*:*:0/10", "*:*:5/20"));
    // Each new run started on its second: p1 at a multiple of 10, p2 at 5
    // past a multiple of 20.
    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    wait_for("two runs of each policy", 120, || {
        let s = agent.status(&env);
        for (key, period, phase) in [(&k1, 10u64, 0u64), (&k2, 20, 5)] {
            let Some(r) = run(&s, key).filter(|r| r["snapshot"].is_string()) else {
                continue;
            };
            let at = r["at"].as_u64().unwrap();
            let runs = seen.entry(key.clone()).or_default();
            if runs.last() == Some(&at) {
                continue;
            }
            runs.push(at);
            assert_eq!(r["ok"], true, "{r}");
            // (`at` is in whole seconds: the start may seem a second early.)
            let started = at as f64 - r["seconds"].as_f64().unwrap();
            let late = (started - phase as f64).rem_euclid(period as f64);
            assert!(
                late <= 3.5 || late >= period as f64 - 1.0,
                "{key} started {late:.1}s after its time: {r}"
            );
        }
        seen.values()
            .filter(|v| v.len() >= 2)
            .count()
            .eq(&2)
            .then_some(())
    });
    // Each policy's snapshots are in its own repository, and only there.
    let main = env.path("repo");
    let in_main = snapshots(&env, &main, &name);
    let in_second = snapshots(&env, &second, &name);
    assert!(
        in_main.iter().all(|s| s["policy"] == p1.as_str()),
        "{in_main:?}"
    );
    assert!(
        in_second.iter().all(|s| s["policy"] == p2.as_str()),
        "{in_second:?}"
    );
    assert!(in_main.len() >= 2 && in_second.len() >= 2);
    drop(agent);

    // Restarted with schedules not due for months: the last runs are
    // remembered and nothing runs.
    let before = serde_json::from_slice::<Value>(
        &std::fs::read(env.state_dir().join("schedule.json")).unwrap(),
    )
    .unwrap();
    let agent = Agent::start(&env, 1, &config("yearly", "yearly"));
    std::thread::sleep(Duration::from_secs(4));
    let s = agent.status(&env);
    for k in [&k1, &k2] {
        assert_eq!(
            run(&s, k).unwrap()["at"],
            before["runs"][k]["at"],
            "{k} ran again: {s}"
        );
    }
    let p = s["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name.as_str())
        .unwrap()["policies"]
        .clone();
    let next = p[0]["next_run"].as_u64().unwrap();
    assert!(next > now() + 3600, "next run of a yearly policy: {p}");
    drop(agent);

    // p1's run of last year was missed (the agent was down): it runs once
    // at start, p2 (run this year) does not.
    let count = snapshots(&env, &main, &name).len();
    let count2 = snapshots(&env, &second, &name).len();
    let at2 = before["runs"][&k2]["at"].as_u64().unwrap();
    seed(now() - 400 * 86400, at2);
    let agent = Agent::start(&env, 1, &config("yearly", "yearly"));
    wait_for("the missed run", 60, || {
        let s = agent.status(&env);
        run(&s, &k1)
            .filter(|r| r["at"].as_u64().unwrap() > now() - 60 && r["snapshot"].is_string())
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        snapshots(&env, &main, &name).len(),
        count + 1,
        "exactly one run"
    );
    assert_eq!(snapshots(&env, &second, &name).len(), count2);
}

/// A freshly started agent backs up a (domain, policy) that never ran as
/// soon as it has listed the domains, not at its first tick after that
/// (`tick_seconds` is the shipped 30 s).
#[test]
fn a_fresh_agent_runs_a_never_run_policy_once_it_has_listed_the_domains() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let policy = format!("fresh-{}", std::process::id());
    let vm = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(metadata(&[&policy])),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let key = format!("{}/{policy}", vm.name());
    let begun = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let agent = Agent::start(
        &env,
        30,
        &format!("[policies.{policy}]\nrepository = \"main\"\nschedule = \"yearly\"\n"),
    );
    let r = wait_for("the first run", 60, || {
        let s = agent.status(&env);
        run(&s, &key).filter(|r| r["snapshot"].is_string()).cloned()
    });
    assert_eq!(r["ok"], true, "{r}");
    // (`at` is in whole seconds: the start may seem a second early.)
    let started = r["at"].as_u64().unwrap() as f64 - r["seconds"].as_f64().unwrap();
    assert!(
        started - begun < 8.0,
        "first backup began {:.1}s after the agent: {r}",
        started - begun
    );
    let snaps = snapshots(&env, &env.path("repo"), vm.name());
    assert_eq!(snaps.len(), 1, "{snaps:?}");
}

/// `[enforce]`: an unprotected VM is reported and mailed (and the
/// protection mailed when it comes), a new VM gets the default policy, a
/// policy to a repository the host does not allow is refused by `protect`
/// and by the agent; a repository that cannot be used shows in the status,
/// as does a failing policy; the metrics textfile tells the same.
#[test]
fn enforcement_and_status_show_what_is_wrong() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let id = std::process::id();
    let (good, offsite, broken) = (
        format!("good-{id}"),
        format!("offsite-{id}"),
        format!("broken-{id}"),
    );
    let port = smtp_server::free_port();
    let smtp = smtp_server::Server::start(&env.path(""), port, None);
    let wrong_pw = env.path("wrong-pw");
    std::fs::write(&wrong_pw, "not the passphrase").unwrap();
    let metrics = env.path("bulwark.prom");
    let rest = format!(
        "[repositories.offsite]\npath = {missing:?}\npassword_file = {pw:?}\n\
         [repositories.locked]\npath = {main:?}\npassword_file = {wrong_pw:?}\n\
         [policies.{good}]\nrepository = \"main\"\nschedule = \"yearly\"\n\
         contacts = [\"ops@example.com\"]\n\
         [policies.{offsite}]\nrepository = \"offsite\"\nschedule = \"yearly\"\n\
         [policies.{broken}]\nrepository = \"locked\"\nschedule = \"yearly\"\n\
         contacts = [\"ops@example.com\"]\n\
         [enforce]\nrequire_protection = true\ndefault_policies = [\"{good}\"]\n\
         allowed_repositories = [\"main\", \"locked\"]\ncontacts = [\"boss@example.com\"]\n\
         [smtp]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\
         from = \"bulwark@example.com\"\n",
        missing = env.path("no-such-repo"),
        pw = env.path("pw"),
        main = env.path("repo"),
    );
    // Defined before the agent: no default policy for it.
    let bare = Vm::define(&image, VmOptions::default()).unwrap();
    let refused = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(metadata(&[&offsite])),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let failing = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(metadata(&[&broken])),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let agent = Agent::start_full(
        &env,
        1,
        &format!("metrics_textfile = {metrics:?}"),
        &rest,
        Vec::new(),
    );
    let sock = agent.socket.to_str().unwrap().to_string();
    let cfg = env.path("agent.toml");

    // protect refuses a disallowed repository's policy and an unknown one.
    let out = env
        .cmd(&["protect", bare.name(), "--policy", &offsite])
        .env("BULWARK_CONFIG", &cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("allowed_repositories"),
        "{err}"
    );
    let out = env
        .cmd(&["protect", bare.name(), "--policy", "no-such-policy"])
        .env("BULWARK_CONFIG", &cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no policy"), "{err}");
    // So does the agent.
    let out = env.run(&[
        "agent",
        "backup",
        refused.name(),
        "--policy",
        &offsite,
        "--socket",
        &sock,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("allowed_repositories"),
        "{err}"
    );

    // A VM defined now gets the default policy and its first backup.
    let fresh = Vm::define(&image, VmOptions::default()).unwrap();
    let fresh_key = format!("{}/{good}", fresh.name());
    let r = wait_for("the default policy's first backup", 90, || {
        let s = agent.status(&env);
        run(&s, &fresh_key).filter(|r| r["ok"] == true).cloned()
    });
    assert!(r["snapshot"].is_string(), "{r}");
    let xml = virsh(&["dumpxml", fresh.name(), "--inactive"]);
    assert!(
        xml.contains(&format!("name='{good}'")) || xml.contains(&format!("name=\"{good}\"")),
        "{xml}"
    );

    // The status tells every problem, by domain and repository.
    let s = wait_for("the failing policy and the target checks", 60, || {
        let s = agent.status(&env);
        let failed =
            run(&s, &format!("{}/{broken}", failing.name())).is_some_and(|r| r["ok"] == false);
        (failed && s["targets"]["offsite"].is_object()).then_some(s)
    });
    let dom = |n: &str| -> Value {
        s["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} not in {s}"))
    };
    let problems = |n: &str| dom(n)["problems"].to_string();
    assert_eq!(dom(bare.name())["protected"], false);
    assert!(problems(bare.name()).contains("unprotected"), "{s}");
    assert!(
        problems(refused.name()).contains("allowed_repositories"),
        "{s}"
    );
    assert!(problems(refused.name()).contains("unprotected"), "{s}");
    assert!(problems(failing.name()).contains("failing since"), "{s}");
    let fp = &dom(failing.name())["policies"][0];
    assert!(
        fp["failing_since"].is_u64() && fp["last_result"] == "failed",
        "{fp}"
    );
    assert!(fp["last_error"].as_str().unwrap().contains("key"), "{fp}");
    assert_eq!(dom(fresh.name())["problems"], serde_json::json!([]), "{s}");
    assert_eq!(dom(fresh.name())["policies"][0]["last_result"], "ok");
    assert_eq!(s["targets"]["offsite"]["ok"], false, "{s}");
    assert_eq!(s["targets"]["offsite"]["kind"], "no_repository", "{s}");
    assert_eq!(s["targets"]["main"]["ok"], true, "{s}");
    assert_eq!(s["targets"]["locked"]["kind"], "wrong_key", "{s}");
    assert!(s["refused_policies"][&offsite].is_string(), "{s}");
    // The human table and the exit code say the same.
    let out = env.run(&["agent", "status", "--socket", &sock]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "problems: exit 1: {table}");
    assert!(
        table.contains(fresh.name()) && table.contains("problems:"),
        "{table}"
    );
    assert!(table.contains("NOT usable (no_repository)"), "{table}");

    // Mail: the unprotected VM once to the enforcement contacts; the
    // failing policy once to its own.
    let mail_about = |vm: &str, what: &str| -> Vec<String> {
        smtp.messages()
            .into_iter()
            .map(|m| m.replace("=\r\n", "").replace("\r\n ", " "))
            .filter(|m| m.contains(vm) && m.contains(what))
            .collect()
    };
    let m = wait_for("the unprotected mail", 60, || {
        let m = mail_about(bare.name(), "is not protected");
        (!m.is_empty()).then_some(m)
    });
    assert!(m[0].contains("boss@example.com"), "{}", m[0]);
    wait_for("the failure mail", 60, || {
        let m = mail_about(failing.name(), "failed on");
        (!m.is_empty()).then_some(m)
    });
    // Protected now: one more mail, and no problem left for it.
    env.ok(&["protect", bare.name(), "--policy", &good]);
    wait_for("the protection mail", 60, || {
        let m = mail_about(bare.name(), "is protected now");
        (!m.is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(mail_about(bare.name(), "is not protected").len(), 1);
    assert_eq!(mail_about(failing.name(), "failed on").len(), 1);
    let s = agent.status(&env);
    let d = s["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == bare.name())
        .cloned()
        .unwrap();
    assert!(!d["problems"].to_string().contains("unprotected"), "{d}");

    // The metrics textfile.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let fresh_ok = format!(
        "bulwark_backup_last_ok{{vm=\"{}\",policy=\"{good}\"}} 1",
        fresh.name()
    );
    let failing_ok = format!(
        "bulwark_backup_last_ok{{vm=\"{}\",policy=\"{broken}\"}} 0",
        failing.name()
    );
    for want in [
        fresh_ok.as_str(),
        failing_ok.as_str(),
        "bulwark_target_up{repository=\"offsite\"} 0",
        "bulwark_target_up{repository=\"main\"} 1",
        "# TYPE bulwark_backup_last_success_timestamp_seconds gauge",
    ] {
        assert!(text.contains(want), "{want} not in:\n{text}");
    }
}
