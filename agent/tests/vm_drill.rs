//! Restore drills end to end: a VM snapshot boots as an isolated,
//! throw-away domain served from the repository, its console checked;
//! a damaged snapshot fails and names the read; a killed drill leaves
//! nothing behind once the agent starts; the agent's scheduled drills mail
//! a failing streak once.

mod smtp_server;
mod vm_common;
use vm_common as common;

use std::path::Path;
use std::process::Stdio;

use common::*;
use testbed::{Image, Vm, VmOptions};

const READY: &str = "bulwark-guest: ready";

/// A NIC the drill must not give its domain (libvirt's default network
/// need not exist: the source VM is never started).
const NIC: &str =
    "<interface type='network'><source network='default'/><model type='virtio'/></interface>";

/// Drill domains (running) of this test: `bulwark-drill-<source>-...`.
fn drill_domains(source: &str) -> Vec<String> {
    let short: String = source
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    virsh(&["list", "--name"])
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(&format!("bulwark-drill-{short}-")))
        .map(str::to_string)
        .collect()
}

fn labs(env: &Env) -> Vec<String> {
    match std::fs::read_dir(env.state_dir().join("drills")) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Flips a byte every 32 KiB of every pack: every chunk of the snapshot is
/// damaged, the first one the boot reads too.
fn damage_every_pack(repo: &Path) {
    let mut n = 0;
    for dir in std::fs::read_dir(repo.join("data")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let mut b = std::fs::read(&p).unwrap();
            for i in (4096..b.len()).step_by(32 * 1024) {
                b[i] ^= 0x5a;
            }
            std::fs::write(&p, b).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "no packs to damage");
}

fn backup_with_nic(env: &Env, image: &Image) -> (Vm, String) {
    let vm = Vm::define(
        image,
        VmOptions {
            devices_xml: Some(NIC.into()),
            ..VmOptions::default()
        },
    )
    .unwrap();
    let snap = env.backup(vm.name(), &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    (vm, snap)
}

#[test]
fn a_drill_boots_an_isolated_copy_and_a_damaged_snapshot_fails_naming_the_read() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let (vm, snap) = backup_with_nic(&env, &image);
    let source = vm.name().to_string();

    let child = env
        .cmd(&[
            "drill",
            &format!("{source}@latest"),
            "--console",
            READY,
            "--timeout",
            "90s",
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs: the domain is there, without a network interface,
    // its disk an overlay over the drill's NBD server.
    let dom = wait_for("the drill's domain", 60, || drill_domains(&source).pop());
    let xml = virsh(&["dumpxml", &dom]);
    assert!(!xml.contains("<interface"), "{xml}");
    assert!(xml.contains("protocol='nbd'"), "{xml}");
    assert!(xml.contains("<serial type='file'>"), "{xml}");
    let out = child.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(out.status.success(), "{r}");
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["snapshot"], snap.as_str());
    let checks = r["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1, "{r}");
    assert_eq!(checks[0]["name"], "console");
    assert_eq!(checks[0]["passed"], true);
    let to_ready = checks[0]["seconds"].as_f64().unwrap();
    assert!(to_ready > 0.0 && to_ready < 90.0, "{r}");
    assert!(r["seconds"].as_f64().unwrap() >= to_ready, "{r}");
    // It read the boot path through the repository, and not the whole disk.
    let fetched = u(&r, "bytes_fetched");
    let boot_set = u(&r["boot_set"][0], "bytes");
    assert_eq!(r["boot_set"][0]["disk"], "vda");
    assert!(boot_set > 0 && boot_set < image.disk_size(), "{r}");
    assert!(fetched > 0, "{r}");
    let first = &r["boot_set"][0]["ranges"][0];
    assert_eq!(first[0], 0, "the boot starts at the MBR: {r}");
    // Gone afterwards: the domain, the lab; the report is kept locally and
    // in the repository.
    assert!(drill_domains(&source).is_empty());
    assert!(labs(&env).is_empty(), "{:?}", labs(&env));
    let snaps = env.json(&["snapshots", "--json"]);
    assert_eq!(snaps[0]["drill"]["passed"], true, "{snaps}");
    let reports = env.state_dir().join("drill-reports").join(&source);
    assert_eq!(std::fs::read_dir(&reports).unwrap().count(), 1);
    let text = env.ok(&["snapshots"]);
    assert!(text.contains(", proven bootable "), "{text}");

    // A screenshot (the drill adds a VGA display the source lacked) and
    // the guest agent, which the test image does not have: that check
    // fails, and says why.
    let out = env.run(&[
        "drill",
        &snap,
        "--screenshot",
        "--guest-agent",
        "--timeout",
        "15s",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert_eq!(r["passed"], false, "{r}");
    let check = |name: &str| {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {r}"))
            .clone()
    };
    assert_eq!(check("screenshot")["passed"], true, "{r}");
    assert_eq!(check("guest-agent")["passed"], false, "{r}");
    assert!(
        check("guest-agent")["detail"]
            .as_str()
            .unwrap()
            .contains("agent"),
        "{r}"
    );
    let png = std::fs::read(r["screenshot"].as_str().unwrap()).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // The same snapshot with every pack damaged: the boot fails, and the
    // drill names the read that failed.
    damage_every_pack(&env.path("repo"));
    let out = env.run(&["drill", &snap, "--console", READY, "--timeout", "20s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("console      FAILED"), "{text}");
    assert!(text.contains("read failed: vda at offset "), "{text}");
    assert!(text.contains("damaged chunk"), "{text}");
    assert!(drill_domains(&source).is_empty());
    assert!(labs(&env).is_empty());
}

#[test]
fn a_killed_drill_leaves_nothing_once_the_agent_starts() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let (vm, _snap) = backup_with_nic(&env, &image);
    let source = vm.name().to_string();
    let mut child = env
        .cmd(&[
            "drill",
            &format!("{source}@latest"),
            "--console",
            "never matches",
            "--timeout",
            "10m",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let dom = wait_for("the drill's domain", 60, || drill_domains(&source).pop());
    // Killed once the guest is up and idle (it reads nothing more, so it
    // keeps running without its server).
    let console = env
        .state_dir()
        .join("drills")
        .join(&dom)
        .join("console-0.log");
    wait_for("the guest to boot", 60, || {
        std::fs::read_to_string(&console)
            .is_ok_and(|c| c.contains(READY))
            .then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // Killed: its domain and lab are left behind...
    assert_eq!(drill_domains(&source), vec![dom.clone()]);
    assert_eq!(labs(&env), vec![dom.clone()]);
    // ...until the agent starts (no policies at all: it still cleans up).
    let _agent = Agent::start(&env, 3600, "");
    wait_for("the leftovers to go", 30, || {
        (drill_domains(&source).is_empty() && labs(&env).is_empty()).then_some(())
    });
}

/// A policy's scheduled drills: the first runs once the VM has a backup;
/// each failing one is recorded in `agent status`, and the streak is
/// mailed once, naming the VM and the check.
#[test]
fn scheduled_drills_from_the_agent_mail_a_failing_streak_once() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let port = smtp_server::free_port();
    let smtp = smtp_server::Server::start(&env.path(""), port, None);
    let policy = format!("drill-{}", std::process::id());
    let agent = Agent::start(
        &env,
        1,
        &format!(
            "[policies.{policy}]\nrepository = \"main\"\nschedule = \"yearly\"\n\
             drill = \"*:*:0/10\"\ndrill_console = \"no such line\"\ndrill_timeout = \"6s\"\n\
             contacts = [\"ops@example.com\"]\n\
             [smtp]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\
             from = \"bulwark@example.com\"\n"
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
    // The yearly backup runs at once (never run); the drill follows it.
    let first = wait_for("the first drill", 120, || {
        let s = agent.status(&env);
        s["drills"].get(&name).filter(|d| d["at"].is_u64()).cloned()
    });
    assert_eq!(first["ok"], false, "{first}");
    assert_eq!(first["policy"], policy.as_str());
    let error = first["error"].as_str().unwrap();
    assert!(
        error.contains("console") && error.contains("no such line"),
        "{first}"
    );
    assert!(first["snapshot"].is_string(), "{first}");
    // A second failure of the streak: recorded, not mailed.
    wait_for("the second drill", 60, || {
        let s = agent.status(&env);
        (s["drills"][&name]["at"].as_u64() > first["at"].as_u64()).then_some(())
    });
    let s = agent.status(&env);
    assert!(
        s["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["problem"]
                .as_str()
                .unwrap()
                .contains("restore drill failed")),
        "{s}"
    );
    let mails = wait_for("the failure mail", 30, || {
        let m = smtp.messages();
        (!m.is_empty()).then_some(m)
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(smtp.messages().len(), 1, "{mails:?}");
    let m = &mails[0].replace("=\r\n", "").replace("=\n", "");
    assert!(
        m.contains(&format!("Subject: bulwark: restore drill of {name} failed")),
        "{m}"
    );
    assert!(m.contains("no such line"), "{m}");
    // Stopped, mid-drill or between drills, the agent leaves no drill
    // domain or lab behind.
    drop(agent);
    assert!(drill_domains(&name).is_empty());
    assert!(labs(&env).is_empty(), "{:?}", labs(&env));
}

/// A live restore of a VM that passed a drill queues the drill's boot set
/// first (counted in `restore status`); one without a drill has none. The
/// bucket is an S3 server behind the test bed's fault proxy, 20 ms away.
#[test]
fn a_live_restore_fetches_a_recorded_boot_set_first() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("bootset");
    bucket.ok(&env, &["repo", "init"]);
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&bucket.ok(&env, &["backup", "vm", vm.name(), "--json"])).unwrap();
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let near = testbed::s3::Faults {
        delay: std::time::Duration::from_millis(20),
        ..Default::default()
    };
    let proxy = testbed::s3::FaultProxy::start(bucket.server.port(), near).unwrap();
    let endpoint = proxy.endpoint();
    let images = env.path("images");
    let live = |name: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "restore",
            "vm",
            &snap,
            "--as",
            name,
            "--storage-dir",
            images.to_str().unwrap(),
            "--live",
            "--wait",
            "--s3-endpoint",
            &endpoint,
        ];
        args.extend_from_slice(extra);
        bucket.ok(&env, &args);
        env.json(&["restore", "status", name, "--json"])[0].clone()
    };
    let first = testbed::unique_name("bw-boot0");
    let second = testbed::unique_name("bw-boot1");
    let third = testbed::unique_name("bw-boot2");
    let fourth = testbed::unique_name("bw-boot3");
    let _domains = Restored(vec![
        first.clone(),
        second.clone(),
        third.clone(),
        fourth.clone(),
    ]);
    // The first live restore has nothing to fetch first; a slow backfill
    // keeps its guest reading from the server while it boots, and the
    // server records what it read.
    let s = live(&first, &["--stream-mib-per-sec", "2"]);
    assert_eq!(s["phase"], "done", "{s}");
    let through_proxy = proxy
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        through_proxy > 0,
        "the restore did not read through the proxy"
    );
    assert_eq!(s["boot_set"], false, "{s}");
    assert!(s["demand_misses"].as_u64().unwrap() > 0, "{s}");
    assert!(s["stall_seconds"].as_f64().is_some(), "{s}");
    let log = env
        .state_dir()
        .join("live")
        .join(format!("{first}.nbd.log"));
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("boot set recorded"), "{log}");

    // The next one fetches that set first, from the pack ranges recorded
    // with it, while its disks open.
    let s = live(&second, &[]);
    assert_eq!(s["phase"], "done", "{s}");
    assert_eq!(s["boot_set"], true, "{s}");
    assert!(s["boot_set_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["boot_set_ahead_bytes"].as_u64().unwrap() > 0, "{s}");
    let first_set = s["boot_set_bytes"].as_u64().unwrap();

    // That one was independent within a second, long before its guest was
    // up: the set it recorded keeps what the first boot read later, so the
    // next restore fetches no less first.
    let s = live(&fourth, &[]);
    assert_eq!(s["boot_set"], true, "{s}");
    assert!(
        s["boot_set_bytes"].as_u64().unwrap() >= first_set,
        "{s}: the set recorded first had {first_set} B"
    );

    // After a passed drill (whose set the lookup takes before a recorded
    // one) a live restore still starts with a set.
    let r: serde_json::Value = serde_json::from_str(&bucket.ok(
        &env,
        &[
            "drill",
            &snap,
            "--console",
            READY,
            "--timeout",
            "90s",
            "--json",
            "--s3-endpoint",
            &endpoint,
        ],
    ))
    .unwrap();
    assert_eq!(r["passed"], true, "{r}");
    let s = live(&third, &[]);
    assert_eq!(s["phase"], "done", "{s}");
    assert_eq!(s["boot_set"], true, "{s}");
    assert!(s["boot_set_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["boot_set_ahead_bytes"].as_u64().unwrap() > 0, "{s}");
}
