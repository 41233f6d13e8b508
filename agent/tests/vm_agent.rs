//! The agent daemon: config TOML, control socket, interval scheduler
//! running the policy a domain names in its metadata, CLI through the
//! socket, and hook events recorded.

mod vm_common;
use vm_common as common;
mod smtp_server;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use testbed::{Image, Vm, VmOptions};

#[test]
fn agent_runs_policies_and_answers_on_its_socket() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let policy = format!("fast-{}", std::process::id());
    // A stopped domain that names the policy: the first tick backs it up.
    let vm = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(format!(
                "<bulwark:policies xmlns:bulwark='https://bulwark.dev/xmlns/libvirt/1'>\
                 <bulwark:policy name='{policy}'/></bulwark:policies>"
            )),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let name = vm.name().to_string();
    let agent = Agent::start(
        &env,
        1,
        &format!(
            "gc_schedule = \"every 1s\"\ngc_grace = \"0s\"\n\
             [policies.{policy}]\nrepository = \"main\"\nschedule = \"yearly\"\nkeep_last = 1\n\
             contacts = [\"ops@example.com\"]\n"
        ),
    );
    let sock = agent.socket.clone();
    let key = format!("{name}/{policy}");
    let t = Instant::now();
    let run = loop {
        if sock.exists() {
            let s = agent.status(&env);
            if let Some(r) = s["runs"].get(&key) {
                break r.clone();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no scheduled run");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(run["ok"], true, "{run}");
    assert_eq!(run["mode"], "full");
    let snaps = env.json(&["snapshots", "--json", "--source", &name]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["policy"], policy.as_str());

    // Not due again this year: a manual run through the socket.
    let out = env.ok(&["agent", "backup", &name, "--socket", sock.to_str().unwrap()]);
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["mode"], "incremental", "{rep}");
    assert_eq!(u(&rep, "bytes_read"), 0, "nothing changed: {rep}");
    // keep_last = 1: the backup pruned the first snapshot of its group.
    let snaps = env.json(&["snapshots", "--json", "--source", &name]);
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_eq!(snaps[0]["id"], rep["snapshot"]);
    let s = agent.status(&env);
    assert_eq!(s["runs"][&key]["pruned"], 1, "{s}");
    // And the repository's gc_schedule runs GC (grace 0s: repeatedly).
    let t = Instant::now();
    loop {
        let s = agent.status(&env);
        if s["gcs"]["main"]["ok"] == true {
            break;
        }
        assert!(s["gcs"]["main"]["ok"] != false, "gc failed: {s}");
        assert!(t.elapsed() < Duration::from_secs(30), "no gc ran: {s}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let v = env.json(&["verify", "--json"]);
    assert!(v["damaged"].as_array().unwrap().is_empty(), "{v}");

    // A hook event lands in the domain's state.
    let uuid = virsh(&["domuuid", &name]).trim().to_string();
    let conf = env.path("hook.conf");
    std::fs::write(&conf, format!("socket = {}\n", sock.display())).unwrap();
    let hook = Path::new(env!("CARGO_BIN_EXE_bulwark")).with_file_name("bulwark-hook");
    if hook.exists() {
        let xml = virsh(&["dumpxml", &name, "--inactive"]);
        let mut child = Command::new(&hook)
            .args([&name, "release", "end", "-"])
            .env("BULWARK_HOOK_CONF", &conf)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(xml.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        let st = env.state_dir().join("domains").join(format!("{uuid}.json"));
        let t = Instant::now();
        loop {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&st).unwrap()).unwrap();
            if v["last_event"] == "release end" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        eprintln!("bulwark-hook not built: hook event part skipped");
    }
}

/// With no hook installed, the agent still notices a protected VM from
/// libvirt's define event: it puts Bulwark's bitmap on the qcow2 disk and,
/// the policy never having run, backs the VM up at once (the scheduler
/// wakes on the event); later backups through the agent chain on it;
/// undefining the VM archives its record.
#[test]
fn agent_notices_a_protected_vm_from_the_define_event() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let policy = format!("ev-{}", std::process::id());
    // Ticks an hour apart: only the event can start the first backup.
    let agent = Agent::start(
        &env,
        3600,
        &format!("[policies.{policy}]\nrepository = \"main\"\nschedule = \"hourly\"\n"),
    );
    // Let the agent's first scan happen before the VM exists.
    wait_for("the agent's first scan", 30, || {
        (agent.status(&env)["libvirt_connections"] == 1).then_some(())
    });
    let vm = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(policy_xml(&policy)),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let name = vm.name().to_string();
    let key = format!("{name}/{policy}");
    let r1 = wait_for("the first backup, started by the define event", 60, || {
        let s = agent.status(&env);
        s["runs"]
            .get(&key)
            .filter(|r| r["snapshot"].is_string())
            .cloned()
    });
    assert_eq!(
        (&r1["ok"], &r1["mode"]),
        (&true.into(), &"full".into()),
        "{r1}"
    );
    let s = agent.status(&env);
    assert_eq!(s["protected"][&name], serde_json::json!([policy]), "{s}");
    // The event's bitmap became the first backup's checkpoint.
    let names = bitmap_names(vm.disk_path());
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(!names.contains(&"bw-hook".to_string()), "{names:?}");
    let r2 = agent.backup(&env, &name);
    assert_eq!(r2["mode"], "incremental", "{r2}");
    assert_eq!(u(&r2, "bytes_read"), 0, "{r2}");
    let names = bitmap_names(vm.disk_path());
    assert!(
        names.contains(&r2["checkpoint"].as_str().unwrap().to_string()),
        "{names:?}"
    );

    // Undefined: the record moves to the archive.
    let uuid = virsh(&["domuuid", &name]).trim().to_string();
    let record = env.state_dir().join("domains").join(format!("{uuid}.json"));
    assert!(record.exists());
    drop(vm);
    let archived = wait_for("the archived record", 30, || {
        testbed::files_under(&env.state_dir().join("archive"))
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.to_string_lossy().contains(&uuid))
    });
    assert!(!record.exists());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(archived).unwrap()).unwrap();
    assert_eq!(v["domain"], name.as_str());
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 2, "{v}");
    let s = agent.status(&env);
    assert!(s["protected"].get(&name).is_none(), "{s}");
}

/// A policy whose backups fail mails its contacts once per failure streak
/// (VM and error named) through a real SMTP server, and once on recovery.
#[test]
fn failing_backups_mail_the_contacts_once_and_recovery_once() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let port = smtp_server::free_port();
    let smtp = smtp_server::Server::start(&env.path(""), port, None);
    let policy = format!("mail-{}", std::process::id());
    // The policy's repository does not exist yet: its backups fail.
    let broken = env.path("later-repo");
    let agent = Agent::start(
        &env,
        3600,
        &format!(
            "[repositories.later]\npath = {broken:?}\npassword_file = {pw:?}\n\
             [policies.{policy}]\nrepository = \"later\"\nschedule = \"yearly\"\n\
             contacts = [\"ops@example.com\", \"dba@example.com\"]\n\
             [smtp]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\
             from = \"bulwark@example.com\"\n",
            pw = env.path("pw"),
        ),
    );
    let vm = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(policy_xml(&policy)),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let name = vm.name().to_string();
    let sock = agent.socket.to_str().unwrap().to_string();
    for _ in 0..2 {
        let out = env.run(&["agent", "backup", &name, "--socket", &sock]);
        assert!(!out.status.success(), "the repository is missing");
    }
    let mails = wait_for("the failure mail", 60, || {
        let m = smtp.messages();
        (!m.is_empty()).then_some(m)
    });
    // The second failure of the streak sends nothing.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(smtp.messages().len(), 1, "{mails:?}");
    // (Undo quoted-printable soft line breaks.)
    let m = &mails[0].replace("=\r\n", "").replace("=\n", "");
    assert!(
        m.contains(&format!(
            "Subject: bulwark: backup of {name}/{policy} failed"
        )),
        "{m}"
    );
    assert!(
        m.contains("ops@example.com") && m.contains("dba@example.com"),
        "{m}"
    );
    assert!(
        m.contains("later-repo"),
        "the error names the repository: {m}"
    );
    // With the job's own log lines (at least the logged error).
    assert!(m.contains("Last log lines:"), "{m}");

    // The repository appears: the next backup succeeds and says so.
    env.ok(&["repo", "init", "--repo", broken.to_str().unwrap()]);
    let r = agent.backup(&env, &name);
    assert_eq!(r["mode"], "full", "{r}");
    let mails = wait_for("the recovery mail", 60, || {
        let m = smtp.messages();
        (m.len() == 2).then_some(m)
    });
    assert!(
        mails[1].contains(&format!(
            "Subject: bulwark: backup of {name}/{policy} recovered"
        )),
        "{}",
        mails[1]
    );
}
