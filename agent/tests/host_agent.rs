//! The agent on a host with no VMs: a `[host.NAME]` entry backs up its
//! paths on schedule as file snapshots of source NAME, prunes them by its
//! retention, and shows each run in `agent status` and the metrics.

mod vm_common;
use vm_common as common;

use common::*;

#[test]
fn a_host_entry_backs_up_its_files_on_schedule_and_keeps_its_retention() {
    let env = Env::new();
    let tree = env.path("tree");
    std::fs::create_dir_all(tree.join("etc/app")).unwrap();
    std::fs::write(tree.join("etc/app/app.conf"), b"answer = 42\n").unwrap();
    std::fs::write(tree.join("etc/skip.tmp"), b"left out").unwrap();
    let metrics = env.path("bulwark.prom");
    let agent = Agent::start_full(
        &env,
        30,
        &format!("metrics_textfile = {metrics:?}"),
        &format!(
            "[host.web-host]\nrepository = \"main\"\npaths = [{tree:?}]\n\
             exclude = [\"*.tmp\"]\nschedule = \"*:*:0/5\"\nkeep_last = 2\n"
        ),
        Vec::new(),
    );
    // Three runs, five seconds apart (the first at once: never run).
    let mut seen = Vec::new();
    let last = wait_for("three host backups", 90, || {
        let s = agent.status(&env);
        let h = s["hosts"]["web-host"].clone();
        if let Some(at) = h["at"].as_u64() {
            if !seen.contains(&at) {
                seen.push(at);
            }
        }
        (seen.len() >= 3).then_some(s)
    });
    let h = &last["hosts"]["web-host"];
    assert_eq!(h["ok"], true, "{last}");
    assert!(last["problems"].as_array().unwrap().is_empty(), "{last}");
    // No libvirt on this host: no domains.
    assert!(last["domains"].as_array().unwrap().is_empty(), "{last}");
    // Retention: the newest two file snapshots of the source are kept.
    let snaps = env.json(&["snapshots", "--source", "web-host", "--json"]);
    assert_eq!(snaps.as_array().unwrap().len(), 2, "{snaps}");
    assert_eq!(snaps[1]["policy"], "files");
    // The latest restores, without what was excluded.
    let out = env.path("out");
    env.ok(&[
        "restore",
        "files",
        "web-host@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    let restored = out.join(tree.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(restored.join("etc/app/app.conf")).unwrap(),
        b"answer = 42\n"
    );
    assert!(!restored.join("etc/skip.tmp").exists());
    let m = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        m.contains("bulwark_backup_last_ok{host=\"web-host\",policy=\"files\"} 1"),
        "{m}"
    );
}
