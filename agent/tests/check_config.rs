//! `bulwark agent check-config` against real parts: a local repository, a
//! missing one, a real SMTP server with AUTH (python3-aiosmtpd on
//! loopback), and the host's libvirtd with a domain of the test's own that
//! names a policy. Local time is UTC for the command, so run counts are
//! exact.

#[path = "smtp_server/mod.rs"]
mod smtp_server;

use std::path::Path;

use smtp_server::{free_port, Server};
use testbed::cli::Runner;

const PW: &str = "check-config passphrase";

fn bw(dir: &Path) -> Runner {
    Runner::new(env!("CARGO_BIN_EXE_bulwark"))
        .env("TZ", "UTC")
        .env_remove("BULWARK_CONFIG")
        .env_remove("BULWARK_PASSWORD")
        .env("BULWARK_REPO", dir.join("repo"))
}

/// A diskless domain protected by `policy` (`bulwark protect`), undefined
/// on drop.
struct Domain(String);

impl Domain {
    fn define(dir: &Path, config: &Path, policy: &str) -> Domain {
        let lv = testbed::TestBed::ensure().unwrap();
        let name = testbed::unique_name("bw-checkcfg");
        let xml = dir.join(format!("{name}.xml"));
        std::fs::write(
            &xml,
            format!(
                "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
                 <os><type arch='x86_64'>hvm</type></os></domain>"
            ),
        )
        .unwrap();
        lv.virsh(["define".as_ref(), xml.as_os_str()]).unwrap();
        let dom = Domain(name);
        bw(dir).ok(&[
            "protect",
            &dom.0,
            "--policy",
            policy,
            "--config",
            config.to_str().unwrap(),
        ]);
        dom
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if let Ok(lv) = testbed::TestBed::ensure() {
            let _ = lv.virsh(["undefine", self.0.as_str()]);
        }
    }
}

fn config(dir: &Path, smtp_port: u16, extra: &str) -> std::path::PathBuf {
    let d = dir.display();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"state_dir = "{d}/state"
socket = "{d}/agent.sock"

[repositories.main]
path = "{d}/repo"
password_file = "{d}/pw"
gc_schedule = "*-*-* 03:00"

[policies.hourly]
repository = "main"
schedule = "hourly"
keep_last = 3
contacts = ["ops@example.com"]
drill = "*-*-* 04:00"
drill_console = "login:"

[policies.quarter]
repository = "main"
schedule = "*:0/15"

[host.hv]
repository = "main"
paths = ["/etc"]
schedule = "*-*-* 02:00"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
from = "bulwark@pve1.example.com"
username = "bulwark"
password_file = "{d}/smtp.pw"
{extra}"#
        ),
    )
    .unwrap();
    cfg
}

fn check<'a>(report: &'a serde_json::Value, what: &str, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == what && c["name"] == name)
        .unwrap_or_else(|| panic!("no {what} {name} in {report:#}"))
}

fn planned<'a>(report: &'a serde_json::Value, job: &str, name: &str) -> &'a serde_json::Value {
    report["next_24h"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["job"] == job && p["name"] == name)
        .unwrap_or_else(|| panic!("no {job} {name} in {report:#}"))
}

#[test]
fn check_config_reaches_every_part_and_lists_the_next_day() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("pw"), PW).unwrap();
    std::fs::write(dir.join("smtp.pw"), "s3cret\n").unwrap();
    bw(dir).env("BULWARK_PASSWORD", PW).ok(&["repo", "init"]);
    let port = free_port();
    let smtp = Server::start(dir, port, Some(("bulwark", "s3cret")));
    // Everything reachable: exit 0, each part ok, the day's runs.
    let cfg = config(dir, port, "");
    let dom = Domain::define(dir, &cfg, "hourly");
    let cfg_arg = cfg.to_str().unwrap();
    let out = bw(dir).run(&["agent", "check-config", cfg_arg, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", testbed::cli::stderr(&out)));
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(check(&report, "repository", "main")["ok"], true);
    let smtp_check = check(&report, "smtp", &format!("127.0.0.1:{port}"));
    assert_eq!(smtp_check["ok"], true, "{report:#}");
    assert_eq!(check(&report, "libvirt", "qemu:///system")["ok"], true);
    let hourly = planned(&report, "backup", "hourly");
    assert_eq!(hourly["runs"].as_array().unwrap().len(), 24, "{hourly:#}");
    assert!(
        hourly["domains"]
            .as_array()
            .unwrap()
            .contains(&dom.0.as_str().into()),
        "{hourly:#}"
    );
    let quarter = planned(&report, "backup", "quarter");
    assert_eq!(quarter["runs"].as_array().unwrap().len(), 96);
    assert!(!quarter["domains"]
        .as_array()
        .unwrap()
        .contains(&dom.0.as_str().into()));
    let gc = planned(&report, "gc", "main");
    let runs = gc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].as_str().unwrap().contains("T03:00:00"), "{gc:#}");
    let files = planned(&report, "files", "hv");
    assert_eq!(files["runs"].as_array().unwrap().len(), 1, "{files:#}");
    let drill = planned(&report, "drill", "hourly");
    assert_eq!(drill["runs"].as_array().unwrap().len(), 1, "{drill:#}");
    assert!(drill["domains"]
        .as_array()
        .unwrap()
        .contains(&dom.0.as_str().into()));
    // The SMTP server was greeted (AUTH included), no mail sent.
    assert!(smtp.messages().is_empty());

    // The same for a person.
    let text = bw(dir).ok(&["agent", "check-config", cfg_arg]);
    assert!(text.contains("ok   repository main"), "{text}");
    assert!(text.contains("backup hourly -> main"), "{text}");
    assert!(text.contains("restore drill hourly <- main"), "{text}");
    assert!(text.contains("file backup hv -> main"), "{text}");
    assert!(text.contains(&dom.0), "{text}");

    // A repository that is not there, a refused policy, a wrong SMTP
    // password: each said, exit 1.
    let refused = format!(
        "[repositories.gone]\npath = \"{}/gone\"\npassword_file = \"{}/pw\"\n\
         [policies.offsite]\nrepository = \"gone\"\nschedule = \"daily\"\n\
         [enforce]\nallowed_repositories = [\"main\"]\n",
        dir.display(),
        dir.display()
    );
    let cfg = config(dir, port, &refused);
    std::fs::write(dir.join("smtp.pw"), "wrong\n").unwrap();
    let out = bw(dir).run(&["agent", "check-config", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(check(&report, "repository", "main")["ok"], true);
    let gone = check(&report, "repository", "gone");
    assert_eq!(gone["ok"], false);
    assert!(
        gone["detail"].as_str().unwrap().contains("no_repository"),
        "{gone:#}"
    );
    let smtp_check = check(&report, "smtp", &format!("127.0.0.1:{port}"));
    assert_eq!(smtp_check["ok"], false);
    assert!(
        smtp_check["detail"].as_str().unwrap().contains("535"),
        "{smtp_check:#}"
    );
    let policy = check(&report, "policy", "offsite");
    assert!(policy["detail"]
        .as_str()
        .unwrap()
        .contains("allowed_repositories"));
    let offsite = planned(&report, "backup", "offsite");
    assert!(offsite["refused"].is_string(), "{offsite:#}");

    // A file the agent would refuse: the parse error, with the key.
    std::fs::write(&cfg, "state_dir = \"/x\"\nsoket = \"/y\"\n").unwrap();
    let out = bw(dir).run(&["agent", "check-config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = testbed::cli::stderr(&out);
    assert!(err.contains("unknown field `soket`"), "{err}");
    drop(dom);
}
