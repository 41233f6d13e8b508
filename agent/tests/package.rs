//! The host package: `scripts/build-deb.sh` on the debug binaries, its
//! contents and control fields, the unit under `systemd-analyze verify`,
//! then install, upgrade, remove and purge in a throwaway root with the real
//! dpkg (maintainer scripts run chrootless, confined to `$DPKG_ROOT`).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd`, asserts success, returns its output.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// The debug binaries: the agent's from cargo, its siblings built if missing.
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_bulwark"))
        .parent()
        .unwrap()
        .to_path_buf();
    if !dir.join("bulwark-nbd").exists() || !dir.join("bulwark-hook").exists() {
        eprintln!(
            "package test: bulwark-nbd or bulwark-hook missing in {}: building them \
             (cargo build -p bulwark-nbd -p bulwark-hook --bins)",
            dir.display()
        );
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "-p", "bulwark-nbd", "-p", "bulwark-hook", "--bins"])
                .env("CARGO_TARGET_DIR", dir.parent().unwrap())
                .current_dir(workspace()),
        );
    }
    dir
}

/// `dpkg` on the throwaway root, never the host's database or files.
fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display())).args([
        "--force-not-root",
        "--force-script-chrootless",
        "--force-depends",
        "--log=/dev/null",
    ]);
    c
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn deb_builds_installs_upgrades_and_keeps_etc_bulwark() {
    for tool in ["dpkg", "dpkg-deb", "dpkg-shlibdeps"] {
        assert!(
            have(tool),
            "{tool} missing: scripts/setup-test-host.sh installs dpkg-dev"
        );
    }
    let bins = bin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_string();
    let version = env!("CARGO_PKG_VERSION");

    // Build from the debug binaries, uncompressed: this is about layout.
    let t = std::time::Instant::now();
    let deb = stdout(
        Command::new(workspace().join("scripts/build-deb.sh"))
            .args(["--profile", "dev", "--no-build", "--compression", "none"])
            .arg("--out")
            .arg(&out)
            .env("CARGO_TARGET_DIR", bins.parent().unwrap()),
    );
    let deb = PathBuf::from(deb.trim());
    assert_eq!(deb, out.join(format!("bulwark_{version}_{arch}.deb")));
    assert!(deb.is_file());
    eprintln!("built {} in {:.1?}", deb.display(), t.elapsed());

    // Contents: exactly these paths, all root-owned.
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut paths = BTreeSet::new();
    let mut link = None;
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[1], "root/root", "{line}");
        paths.insert(f[5].trim_end_matches('/').to_string());
        if f[0].starts_with('l') {
            assert_eq!(f.len(), 8, "{line}");
            link = Some((f[5].to_string(), f[7].to_string()));
        } else if f[5].starts_with("./usr/bin/") || f[5].starts_with("./usr/lib/bulwark/") {
            assert!(f[0].ends_with("rwxr-xr-x"), "{line}");
        }
    }
    let expected: BTreeSet<String> = [
        ".",
        "./etc",
        "./etc/libvirt",
        "./etc/libvirt/hooks",
        "./etc/libvirt/hooks/qemu.d",
        "./etc/libvirt/hooks/qemu.d/bulwark",
        "./lib",
        "./lib/systemd",
        "./lib/systemd/system",
        "./lib/systemd/system/bulwark-agent.service",
        "./usr",
        "./usr/bin",
        "./usr/bin/bulwark",
        "./usr/bin/bulwark-nbd",
        "./usr/lib",
        "./usr/lib/bulwark",
        "./usr/lib/bulwark/bulwark-hook",
        "./usr/share",
        "./usr/share/doc",
        "./usr/share/doc/bulwark",
        "./usr/share/doc/bulwark/README.md",
        "./usr/share/doc/bulwark/agent.toml.example",
        "./usr/share/doc/bulwark/copyright",
        "./usr/share/doc/bulwark/gc.md",
        "./usr/share/doc/bulwark/hook.conf",
        "./usr/share/doc/bulwark/nbd.md",
        "./usr/share/doc/bulwark/s3.md",
        "./usr/share/doc/bulwark/vm.md",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths, expected, "{listing}");
    assert!(
        !paths.iter().any(|p| p.starts_with("./etc/bulwark")),
        "nothing may be shipped under /etc/bulwark"
    );
    assert_eq!(
        link,
        Some((
            "./etc/libvirt/hooks/qemu.d/bulwark".into(),
            "/usr/lib/bulwark/bulwark-hook".into()
        ))
    );

    // Control fields.
    let field = |name: &str| {
        stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "bulwark");
    assert_eq!(field("Version"), version);
    assert_eq!(field("Architecture"), arch);
    let depends = field("Depends");
    for dep in ["libc6", "libvirt0", "qemu-utils"] {
        assert!(
            depends.split(", ").any(|d| d.starts_with(dep)),
            "Depends lacks {dep}: {depends}"
        );
    }
    eprintln!("Depends: {depends}");
    let info = stdout(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for member in ["control", "postinst", "prerm", "postrm"] {
        assert!(
            info.lines()
                .any(|l| l.split_whitespace().last() == Some(member)
                    || l.contains(&format!(" {member} "))),
            "no {member} in:\n{info}"
        );
    }

    // Install into a throwaway root with its own dpkg database.
    let root = tmp.path().join("root");
    let admin = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();
    let first = run(dpkg(&root).arg("-i").arg(&deb));
    let first_out = String::from_utf8_lossy(&first.stdout);
    for p in [
        "usr/bin/bulwark",
        "usr/bin/bulwark-nbd",
        "usr/lib/bulwark/bulwark-hook",
        "lib/systemd/system/bulwark-agent.service",
        "usr/share/doc/bulwark/agent.toml.example",
    ] {
        assert!(root.join(p).is_file(), "{p} not installed");
    }
    let hook = root.join("etc/libvirt/hooks/qemu.d/bulwark");
    assert_eq!(
        std::fs::read_link(&hook).unwrap(),
        Path::new("/usr/lib/bulwark/bulwark-hook")
    );
    assert_eq!(mode(&root.join("etc/bulwark")), 0o700);
    assert!(
        first_out.contains("restart libvirtd once"),
        "first hook: no libvirtd note in:\n{first_out}"
    );
    let status = stdout(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", admin.display()))
            .args(["-W", "-f=${Status} ${Version}", "bulwark"]),
    );
    assert_eq!(status, format!("install ok installed {version}"));
    let v = stdout(Command::new(root.join("usr/bin/bulwark")).arg("--version"));
    assert_eq!(v.trim(), format!("bulwark {version}"));
    let wants = root.join("etc/systemd/system/multi-user.target.wants/bulwark-agent.service");
    let enabled = have("systemctl");
    if enabled {
        assert!(
            wants.symlink_metadata().is_ok(),
            "postinst did not enable the unit in the root"
        );
    } else {
        eprintln!("no systemctl: enabling not checked");
    }

    // The installed unit, its ExecStart pointed into the root (verify needs
    // the binary there; `--root` would need a whole systemd tree in it).
    if have("systemd-analyze") {
        let dir = tmp.path().join("units");
        std::fs::create_dir(&dir).unwrap();
        let unit =
            std::fs::read_to_string(root.join("lib/systemd/system/bulwark-agent.service")).unwrap();
        assert!(
            unit.contains("ExecStart=/usr/bin/bulwark agent run"),
            "{unit}"
        );
        assert!(unit.contains("\nKillMode=process\n"), "{unit}");
        let unit = unit.replace(
            "ExecStart=/usr/bin/bulwark ",
            &format!("ExecStart={}/usr/bin/bulwark ", root.display()),
        );
        std::fs::write(dir.join("bulwark-agent.service"), unit).unwrap();
        let v = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.join("bulwark-agent.service")));
        let err = String::from_utf8_lossy(&v.stderr);
        assert!(
            !err.contains("bulwark-agent.service"),
            "systemd-analyze verify complains:\n{err}"
        );
        eprintln!("systemd-analyze verify: unit ok");
    } else {
        eprintln!("systemd-analyze not found: unit verification skipped");
    }

    // Upgrade over an operator's config: untouched, no first-hook note.
    let cfg = root.join("etc/bulwark/agent.toml");
    let pass = root.join("etc/bulwark/main.pass");
    let operator = "# the operator's own\nstate_dir = \"/srv/state\"\n";
    std::fs::write(&cfg, operator).unwrap();
    std::fs::write(&pass, "secret\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(
        root.join("etc/bulwark"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let again = run(dpkg(&root).arg("-i").arg(&deb));
    let again_out = String::from_utf8_lossy(&again.stdout);
    assert!(!again_out.contains("restart libvirtd"), "{again_out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), operator);
    assert_eq!(std::fs::read_to_string(&pass).unwrap(), "secret\n");
    assert_eq!(mode(&pass), 0o600);
    assert_eq!(mode(&root.join("etc/bulwark")), 0o750, "dir mode changed");
    assert!(root.join("usr/bin/bulwark").is_file());

    // Remove: the package's files go, the operator's stay.
    run(dpkg(&root).arg("-r").arg("bulwark"));
    assert!(!root.join("usr/bin/bulwark").exists());
    assert!(hook.symlink_metadata().is_err(), "hook link left behind");
    assert!(wants.symlink_metadata().is_err(), "unit still enabled");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), operator);
    assert_eq!(std::fs::read_to_string(&pass).unwrap(), "secret\n");

    // Purge: still the operator's; only an empty /etc/bulwark goes.
    let purge = run(dpkg(&root).arg("--purge").arg("bulwark"));
    let purge_out = String::from_utf8_lossy(&purge.stdout);
    assert!(purge_out.contains("kept /etc/bulwark"), "{purge_out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), operator);
    assert_eq!(std::fs::read_to_string(&pass).unwrap(), "secret\n");
    let q = Command::new("dpkg-query")
        .arg(format!("--admindir={}", admin.display()))
        .args(["-W", "bulwark"])
        .output()
        .unwrap();
    assert!(
        !q.status.success() && String::from_utf8_lossy(&q.stderr).contains("no packages found"),
        "bulwark still known to dpkg after purge: {q:?}"
    );
    std::fs::remove_file(&cfg).unwrap();
    std::fs::remove_file(&pass).unwrap();
    run(dpkg(&root).arg("-i").arg(&deb));
    run(dpkg(&root).arg("--purge").arg("bulwark"));
    assert!(
        !root.join("etc/bulwark").exists(),
        "empty /etc/bulwark kept"
    );

    tmp.close().unwrap();
}
