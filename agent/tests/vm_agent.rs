//! The agent daemon: config TOML, control socket, interval scheduler
//! running the policy a domain names in its metadata, CLI through the
//! socket, and hook events recorded.

#[path = "vm_common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use testbed::{Image, Vm, VmOptions};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(env: &Env, sock: &Path) -> serde_json::Value {
    env.json(&["agent", "status", "--socket", sock.to_str().unwrap()])
}

#[test]
fn agent_runs_policies_and_answers_on_its_socket() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let sock = env.path("agent.sock");
    let pw = env.path("pw");
    std::fs::write(&pw, PW).unwrap();
    let policy = format!("fast-{}", std::process::id());
    let cfg = env.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {state:?}\nsocket = {sock:?}\ntick_seconds = 1\n\
             [repositories.main]\npath = {repo:?}\npassword_file = {pw:?}\n\
             gc_schedule = \"every 1s\"\ngc_grace = \"0s\"\n\
             [policies.{policy}]\nrepository = \"main\"\nschedule = \"hourly\"\nkeep_last = 1\n\
             contacts = [\"ops@example.com\"]\n",
            state = env.state_dir(),
            repo = env.path("repo"),
        ),
    )
    .unwrap();
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
    let _agent = Agent(
        env.cmd(&["agent", "run", "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let key = format!("{name}/{policy}");
    let t = Instant::now();
    let run = loop {
        if sock.exists() {
            let s = status(&env, &sock);
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

    // Not due again within the hour: a manual run through the socket.
    let out = env.ok(&["agent", "backup", &name, "--socket", sock.to_str().unwrap()]);
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["mode"], "incremental", "{rep}");
    assert_eq!(u(&rep, "bytes_read"), 0, "nothing changed: {rep}");
    // keep_last = 1: the backup pruned the first snapshot of its group.
    let snaps = env.json(&["snapshots", "--json", "--source", &name]);
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_eq!(snaps[0]["id"], rep["snapshot"]);
    let s = status(&env, &sock);
    assert_eq!(s["runs"][&key]["pruned"], 1, "{s}");
    // And the repository's gc_schedule runs GC (grace 0s: repeatedly).
    let t = Instant::now();
    loop {
        let s = status(&env, &sock);
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
