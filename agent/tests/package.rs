//! The host packages: `scripts/build-deb.sh` on the debug binaries; lintian
//! (Debian's own checker) with no error and no warning; contents, control
//! fields, stripped binaries and their debug symbols; every man page
//! rendered by `man`, every completion script loaded by its shell; the unit
//! under `systemd-analyze verify`; then install, upgrade, remove and purge
//! in throwaway roots with the real dpkg (maintainer scripts run
//! chrootless, confined to `$DPKG_ROOT`), one of them with a `policy-rc.d`
//! that denies every start.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;

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

/// The debug binaries: the agent's from cargo, its siblings (and the
/// generator of man pages and completions) brought up to date (a stale
/// generator would package last week's man pages).
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_bulwark"))
        .parent()
        .unwrap()
        .to_path_buf();
    let siblings = ["bulwark-nbd", "bulwark-hook", "bulwark-docgen"];
    eprintln!(
        "package test: building {} into {}",
        siblings.join(", "),
        dir.display()
    );
    // The whole workspace's binaries, so features resolve as `cargo test
    // --workspace` resolved them and nothing is rebuilt twice.
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--workspace", "--bins"])
            .env("CARGO_TARGET_DIR", dir.parent().unwrap())
            .current_dir(workspace()),
    );
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

/// An empty root with its own dpkg database.
fn throwaway_root(at: &Path) -> PathBuf {
    let admin = at.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();
    at.to_path_buf()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// `[workspace.package]`'s `key = "value"` or `key = ["value"]`.
fn workspace_field(key: &str) -> String {
    let toml: toml::Value =
        toml::from_str(&std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap()).unwrap();
    let v = &toml["workspace"]["package"][key];
    v.as_str()
        .or_else(|| v.as_array().and_then(|a| a[0].as_str()))
        .unwrap()
        .to_string()
}

/// Debian's version: the latest entry of the package's changelog.
fn deb_version() -> String {
    stdout(Command::new("dpkg-parsechangelog").args([
        "-l",
        workspace().join("scripts/deb/changelog").to_str().unwrap(),
        "-S",
        "Version",
    ]))
    .trim()
    .to_string()
}

#[test]
fn deb_is_lintian_clean_installs_upgrades_removes_and_purges() {
    for tool in ["dpkg", "dpkg-deb", "dpkg-shlibdeps", "lintian", "man"] {
        assert!(
            have(tool),
            "{tool} missing: scripts/setup-test-host.sh installs it"
        );
    }
    let bins = bin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_string();
    let version = deb_version();
    assert_eq!(
        version.rsplit_once('-').map(|(u, _)| u),
        Some(env!("CARGO_PKG_VERSION")),
        "the changelog's latest entry is not this version"
    );

    // From the debug binaries; gzip (lintian rejects uncompressed members).
    let t = std::time::Instant::now();
    let built = stdout(
        Command::new(workspace().join("scripts/build-deb.sh"))
            .args(["--profile", "dev", "--no-build", "--compression", "gzip"])
            .arg("--out")
            .arg(&out)
            .env("CARGO_TARGET_DIR", bins.parent().unwrap()),
    );
    let built: Vec<PathBuf> = built.lines().map(PathBuf::from).collect();
    let deb = out.join(format!("bulwark_{version}_{arch}.deb"));
    let dbgsym = out.join(format!("bulwark-dbgsym_{version}_{arch}.deb"));
    assert_eq!(built, [deb.clone(), dbgsym.clone()]);
    eprintln!("built {} in {:.1?}", deb.display(), t.elapsed());

    lintian_is_clean(&[&deb, &dbgsym]);
    let tree = tmp.path().join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree));
    contents_are_exactly(&deb);
    control_fields(&deb, &version, &arch);
    binaries_are_stripped_with_symbols_in_dbgsym(&tree, &dbgsym, tmp.path());
    man_renders_every_page(&tree);
    shells_load_every_completion(&tree);
    copyright_lists_the_linked_crates(&tree);
    let changelog = stdout(
        Command::new("gzip")
            .arg("-dc")
            .arg(tree.join("usr/share/doc/bulwark/changelog.Debian.gz")),
    );
    assert!(
        changelog.starts_with(&format!("bulwark ({version}) ")),
        "{changelog}"
    );
    unit_verifies(&tree, tmp.path());

    install_upgrade_remove_purge(&deb, &throwaway_root(&tmp.path().join("root")));
    policy_rc_d_denies_every_start(&deb, &throwaway_root(&tmp.path().join("denied")));
    tmp.close().unwrap();
}

/// No error and no warning, for either package; overrides only from the
/// package's own file (each with a comment saying why).
fn lintian_is_clean(debs: &[&Path]) {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .args(debs)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("lintian:\n{text}");
    assert!(
        out.status.success(),
        "lintian: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines() {
        assert!(
            !line.starts_with("E: ") && !line.starts_with("W: "),
            "lintian: {line}"
        );
    }
}

/// Exactly these paths (man pages: the top page, one per command group of
/// `bulwark` and `bulwark-nbd`'s), all root-owned.
fn contents_are_exactly(deb: &Path) {
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
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
        } else if !f[0].starts_with('d') {
            assert!(f[0].ends_with("rw-r--r--"), "{line}");
        }
    }
    let mut expected: BTreeSet<String> = [
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
        "./usr/share/bash-completion",
        "./usr/share/bash-completion/completions",
        "./usr/share/bash-completion/completions/bulwark",
        "./usr/share/bash-completion/completions/bulwark-nbd",
        "./usr/share/doc",
        "./usr/share/doc/bulwark",
        "./usr/share/doc/bulwark/README.md",
        "./usr/share/doc/bulwark/agent.toml.example",
        "./usr/share/doc/bulwark/changelog.Debian.gz",
        "./usr/share/doc/bulwark/copyright",
        "./usr/share/doc/bulwark/hook.conf",
        "./usr/share/doc/bulwark/nbd.md",
        "./usr/share/fish",
        "./usr/share/fish/vendor_completions.d",
        "./usr/share/fish/vendor_completions.d/bulwark.fish",
        "./usr/share/fish/vendor_completions.d/bulwark-nbd.fish",
        "./usr/share/lintian",
        "./usr/share/lintian/overrides",
        "./usr/share/lintian/overrides/bulwark",
        "./usr/share/man",
        "./usr/share/man/man1",
        "./usr/share/man/man1/bulwark.1.gz",
        "./usr/share/man/man1/bulwark-nbd.1.gz",
        "./usr/share/man/man5",
        "./usr/share/man/man5/bulwark-agent.toml.5.gz",
        "./usr/share/zsh",
        "./usr/share/zsh/vendor-completions",
        "./usr/share/zsh/vendor-completions/_bulwark",
        "./usr/share/zsh/vendor-completions/_bulwark-nbd",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for group in groups() {
        expected.insert(format!("./usr/share/man/man1/bulwark-{group}.1.gz"));
    }
    for doc in operator_docs() {
        expected.insert(format!("./usr/share/doc/bulwark/{doc}"));
    }
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
}

/// The documents under `docs/` (all of them ship).
fn operator_docs() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut docs: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .collect();
    docs.sort();
    assert!(docs.len() >= 5, "docs/ has {docs:?}");
    docs
}

/// `bulwark`'s command groups, as its clap definition has them.
fn groups() -> Vec<String> {
    bulwark::Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect()
}

fn field(deb: &Path, name: &str) -> String {
    stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
        .trim()
        .to_string()
}

fn control_fields(deb: &Path, version: &str, arch: &str) {
    assert_eq!(field(deb, "Package"), "bulwark");
    assert_eq!(field(deb, "Version"), version);
    assert_eq!(field(deb, "Architecture"), arch);
    // The workspace's authors, a real address (lintian checks the host).
    assert_eq!(field(deb, "Maintainer"), workspace_field("authors"));
    let depends = field(deb, "Depends");
    for dep in ["libc6", "libvirt0", "qemu-utils"] {
        assert!(
            depends.split(", ").any(|d| d.starts_with(dep)),
            "Depends lacks {dep}: {depends}"
        );
    }
    let size: u64 = field(deb, "Installed-Size").parse().unwrap();
    eprintln!("Depends: {depends}\nInstalled-Size: {size} KiB (debug profile, stripped)");
    let info = stdout(Command::new("dpkg-deb").arg("-I").arg(deb));
    for member in ["control", "md5sums", "postinst", "prerm", "postrm"] {
        assert!(
            info.lines()
                .any(|l| l.split_whitespace().last() == Some(member)
                    || l.contains(&format!(" {member} "))),
            "no {member} in:\n{info}"
        );
    }
}

/// Each shipped binary has no symbol table and no debug sections, and
/// points (debuglink) to a file in bulwark-dbgsym named by its build id,
/// which holds its debug sections; the dbgsym's Build-Ids say the same.
fn binaries_are_stripped_with_symbols_in_dbgsym(tree: &Path, dbgsym: &Path, tmp: &Path) {
    let dbg_tree = tmp.join("dbgsym-tree");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(dbgsym)
        .arg(&dbg_tree));
    assert_eq!(field(dbgsym, "Package"), "bulwark-dbgsym");
    assert_eq!(
        field(dbgsym, "Depends"),
        format!("bulwark (= {})", deb_version())
    );
    let listed: BTreeSet<String> = field(dbgsym, "Build-Ids")
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut ids = BTreeSet::new();
    for b in [
        "usr/bin/bulwark",
        "usr/bin/bulwark-nbd",
        "usr/lib/bulwark/bulwark-hook",
    ] {
        let sections = stdout(Command::new("readelf").arg("-SW").arg(tree.join(b)));
        assert!(!sections.contains(".symtab"), "{b} has a symbol table");
        // (`.debug_gdb_scripts` is loaded code, rustc's pretty-printers.)
        for debug in [".debug_info", ".debug_line", ".debug_str"] {
            assert!(!sections.contains(debug), "{b} has {debug}");
        }
        assert!(sections.contains(".gnu_debuglink"), "{b}: no debuglink");
        let notes = stdout(Command::new("readelf").arg("-n").arg(tree.join(b)));
        let id = notes
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .unwrap_or_else(|| panic!("{b}: no build id"))
            .to_string();
        let debug = dbg_tree.join(format!(
            "usr/lib/debug/.build-id/{}/{}.debug",
            &id[..2],
            &id[2..]
        ));
        let dsections = stdout(Command::new("readelf").arg("-SW").arg(&debug));
        assert!(dsections.contains(".debug_line"), "{}", debug.display());
        ids.insert(id);
    }
    assert_eq!(ids, listed);
}

/// `man -l` renders each page with no warning from groff (what lintian
/// runs too), under its name; a group's page holds each of its commands.
fn man_renders_every_page(tree: &Path) {
    let man = tree.join("usr/share/man");
    let mut pages: Vec<PathBuf> = ["man1", "man5"]
        .iter()
        .flat_map(|s| std::fs::read_dir(man.join(s)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    assert_eq!(pages.len(), groups().len() + 3, "{pages:?}");
    for page in &pages {
        let check = run(Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(page)
            .env("MANWIDTH", "80"));
        let warnings = String::from_utf8_lossy(&check.stderr);
        assert!(warnings.trim().is_empty(), "{}: {warnings}", page.display());
        let text = rendered(page);
        let name = page
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(".gz");
        let (name, _section) = name.rsplit_once('.').unwrap();
        assert!(
            text.contains("NAME") && text.contains(&format!("{name} - ")),
            "{}:\n{text}",
            page.display()
        );
    }
    let restore = rendered(&man.join("man1/bulwark-restore.1.gz"));
    for c in ["bulwark restore vm", "bulwark restore status", "--live"] {
        assert!(
            restore.contains(c),
            "bulwark-restore(1) lacks {c}:\n{restore}"
        );
    }
    let agent = rendered(&man.join("man1/bulwark-agent.1.gz"));
    assert!(agent.contains("bulwark agent check-config"), "{agent}");
}

/// `man -l PAGE` as text, runs of white space (justification) as one.
fn rendered(page: &Path) -> String {
    let text = stdout(
        Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "80"),
    );
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Each script parses in its shell (`-n`) and is what `bulwark completions`
/// prints; bash and fish also complete `bulwark re` to the commands that
/// start so.
fn shells_load_every_completion(tree: &Path) {
    let share = tree.join("usr/share");
    for (shell, dir, names) in [
        (
            "bash",
            "bash-completion/completions",
            ["bulwark", "bulwark-nbd"],
        ),
        (
            "zsh",
            "zsh/vendor-completions",
            ["_bulwark", "_bulwark-nbd"],
        ),
        (
            "fish",
            "fish/vendor_completions.d",
            ["bulwark.fish", "bulwark-nbd.fish"],
        ),
    ] {
        assert!(
            have(shell),
            "{shell} missing: scripts/setup-test-host.sh installs it"
        );
        for n in names {
            run(Command::new(shell).arg("-n").arg(share.join(dir).join(n)));
        }
        // `bulwark completions SHELL` prints the same, for other systems.
        let printed = run(Command::new(env!("CARGO_BIN_EXE_bulwark")).args(["completions", shell]));
        let packaged = std::fs::read(share.join(dir).join(names[0])).unwrap();
        assert!(
            printed.stdout == packaged,
            "{shell}: bulwark completions differs"
        );
    }
    let bash = share.join("bash-completion/completions/bulwark");
    let words = stdout(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(bulwark re); COMP_CWORD=1; COMP_LINE='bulwark re'; \
         COMP_POINT=10; _bulwark bulwark re bulwark; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bash.display()
    )));
    let words: BTreeSet<&str> = words.lines().collect();
    assert_eq!(words, BTreeSet::from(["repo", "restore"]), "bash");
    let fish = share.join("fish/vendor_completions.d/bulwark.fish");
    let words = stdout(Command::new("fish").arg("-c").arg(format!(
        "source {}; complete -C 'bulwark re'",
        fish.display()
    )));
    let words: BTreeSet<&str> = words.lines().filter_map(|l| l.split('\t').next()).collect();
    assert_eq!(words, BTreeSet::from(["repo", "restore"]), "fish");
}

/// DEP-5: the project's own paragraph, and one per linked crate with its
/// licence; licences Debian ships pointed to, the others in full.
fn copyright_lists_the_linked_crates(tree: &Path) {
    let c = std::fs::read_to_string(tree.join("usr/share/doc/bulwark/copyright")).unwrap();
    assert!(
        c.starts_with("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"),
        "{c}"
    );
    assert!(c.contains(
        "\nFiles: *\nCopyright: 2026 The Bulwark developers\nLicense: AGPL-3.0-or-later\n"
    ));
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).unwrap();
    let locked = |name: &str| {
        let at = lock
            .find(&format!("\nname = \"{name}\"\nversion = \""))
            .unwrap_or_else(|| panic!("{name} not in Cargo.lock"));
        lock[at..].lines().nth(2).unwrap()[11..]
            .trim_end_matches('"')
            .to_string()
    };
    for (name, license) in [
        ("clap", "MIT or Apache-2.0"),
        ("virt", "LGPL-2.1"),
        ("zstd-sys", "BSD-3-Clause and BSD-2-Clause"),
    ] {
        let para = format!("Files: vendor/{name}-{}/*\n", locked(name));
        let at = c
            .find(&para)
            .unwrap_or_else(|| panic!("no {para} in:\n{c}"));
        let lic = c[at..]
            .lines()
            .find(|l| l.starts_with("License: "))
            .unwrap();
        assert_eq!(lic, format!("License: {license}"), "{name}");
    }
    // Proc-macros run in the compiler: not linked, not listed.
    assert!(!c.contains("Files: vendor/clap_derive-"), "{c}");
    assert!(c.contains("\nLicense: LGPL-2.1\n On Debian systems"), "{c}");
    assert!(
        c.contains("\nLicense: MIT\n The MIT License (MIT)\n .\n Permission"),
        "{c}"
    );
    assert!(
        c.contains("\nLicense: AGPL-3.0-or-later\n                    GNU AFFERO"),
        "{c}"
    );
}

/// The installed unit under `systemd-analyze verify`, its ExecStart
/// pointed into the tree (verify needs the binary there; `--root` would
/// need a whole systemd tree in it). It keeps systemd's default kill mode:
/// live restore servers run in units of their own.
fn unit_verifies(tree: &Path, tmp: &Path) {
    let unit =
        std::fs::read_to_string(tree.join("lib/systemd/system/bulwark-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/bulwark agent run"),
        "{unit}"
    );
    assert!(!unit.contains("\nKillMode="), "{unit}");
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze not found: unit verification skipped");
        return;
    }
    let dir = tmp.join("units");
    std::fs::create_dir(&dir).unwrap();
    let unit = unit.replace(
        "ExecStart=/usr/bin/bulwark ",
        &format!("ExecStart={}/usr/bin/bulwark ", tree.display()),
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
}

const UNIT: &str = "bulwark-agent.service";

fn wants(root: &Path) -> PathBuf {
    root.join("etc/systemd/system/multi-user.target.wants")
        .join(UNIT)
}

fn mask(root: &Path) -> PathBuf {
    root.join("etc/systemd/system").join(UNIT)
}

fn installed_version(root: &Path) -> Option<String> {
    let q = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Status} ${Version}", "bulwark"])
        .output()
        .unwrap();
    q.status
        .success()
        .then(|| String::from_utf8(q.stdout).unwrap())
}

/// As today: first install, upgrade over an operator's config, remove
/// (the unit masked, its enablement kept), purge (forgotten; only an empty
/// /etc/bulwark goes).
fn install_upgrade_remove_purge(deb: &Path, root: &Path) {
    let version = deb_version();
    let first = run(dpkg(root).arg("-i").arg(deb));
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
    assert!(
        first_out.contains("bulwark agent check-config"),
        "no config yet: no hint in:\n{first_out}"
    );
    assert_eq!(
        installed_version(root).as_deref(),
        Some(format!("install ok installed {version}").as_str())
    );
    let v = stdout(Command::new(root.join("usr/bin/bulwark")).arg("--version"));
    assert_eq!(v.trim(), format!("bulwark {}", env!("CARGO_PKG_VERSION")));
    // deb-systemd-helper enabled it in the root, and recorded that.
    assert_eq!(
        std::fs::read_link(wants(root)).unwrap(),
        Path::new("/lib/systemd/system/bulwark-agent.service")
    );
    assert!(root
        .join("var/lib/systemd/deb-systemd-helper-enabled")
        .join(format!("{UNIT}.dsh-also"))
        .is_file());

    // Upgrade over an operator's config: untouched, no first-time notes.
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
    let again = run(dpkg(root).arg("-i").arg(deb));
    let again_out = String::from_utf8_lossy(&again.stdout);
    assert!(!again_out.contains("restart libvirtd"), "{again_out}");
    assert!(!again_out.contains("check-config"), "{again_out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), operator);
    assert_eq!(std::fs::read_to_string(&pass).unwrap(), "secret\n");
    assert_eq!(mode(&pass), 0o600);
    assert_eq!(mode(&root.join("etc/bulwark")), 0o750, "dir mode changed");
    assert!(
        wants(root).symlink_metadata().is_ok(),
        "upgrade disabled it"
    );

    // An operator's disable (`systemctl disable` removes the link)
    // survives an upgrade.
    let link = std::fs::read_link(wants(root)).unwrap();
    std::fs::remove_file(wants(root)).unwrap();
    run(dpkg(root).arg("-i").arg(deb));
    assert!(
        wants(root).symlink_metadata().is_err(),
        "upgrade re-enabled it"
    );
    std::os::unix::fs::symlink(link, wants(root)).unwrap();

    // Remove: the package's files go, the operator's stay; the unit is
    // masked (a dangling enablement must not start anything).
    run(dpkg(root).arg("-r").arg("bulwark"));
    assert!(!root.join("usr/bin/bulwark").exists());
    assert!(hook.symlink_metadata().is_err(), "hook link left behind");
    assert_eq!(
        std::fs::read_link(mask(root)).unwrap(),
        Path::new("/dev/null")
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), operator);
    assert_eq!(std::fs::read_to_string(&pass).unwrap(), "secret\n");

    // Purge: the unit forgotten; the operator's files still there, so
    // /etc/bulwark stays.
    let purge = run(dpkg(root).arg("--purge").arg("bulwark"));
    let purge_out = String::from_utf8_lossy(&purge.stdout);
    assert!(purge_out.contains("kept /etc/bulwark"), "{purge_out}");
    assert!(wants(root).symlink_metadata().is_err(), "still enabled");
    assert!(mask(root).symlink_metadata().is_err(), "still masked");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), operator);
    assert_eq!(std::fs::read_to_string(&pass).unwrap(), "secret\n");
    assert_eq!(installed_version(root), None, "still known to dpkg");
    std::fs::remove_file(&cfg).unwrap();
    std::fs::remove_file(&pass).unwrap();
    run(dpkg(root).arg("-i").arg(deb));
    run(dpkg(root).arg("--purge").arg("bulwark"));
    assert!(
        !root.join("etc/bulwark").exists(),
        "empty /etc/bulwark kept"
    );
}

/// A root set up as chroot builders do, with a policy-rc.d that denies
/// every start: install, upgrade and remove still succeed and enable the
/// unit; nothing runs from the root.
fn policy_rc_d_denies_every_start(deb: &Path, root: &Path) {
    let policy = root.join("usr/sbin/policy-rc.d");
    std::fs::create_dir_all(policy.parent().unwrap()).unwrap();
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n").unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755)).unwrap();
    run(dpkg(root).arg("-i").arg(deb));
    assert!(wants(root).symlink_metadata().is_ok(), "not enabled");
    std::fs::write(root.join("etc/bulwark/agent.toml"), "").unwrap();
    run(dpkg(root).arg("-i").arg(deb));
    let ours = root.join("usr/bin/bulwark");
    let started = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path().join("exe")).ok())
        .any(|exe| exe == ours);
    assert!(!started, "a process runs {}", ours.display());
    run(dpkg(root).arg("-r").arg("bulwark"));
    assert_eq!(std::fs::read(&policy).unwrap(), b"#!/bin/sh\nexit 101\n");
}

/// Every field of the agent's config is described in
/// bulwark-agent.toml(5), and the page describes no key the config lacks.
/// The fields come from serde's own list (its unknown-field error).
#[test]
fn config_man_page_describes_every_field() {
    let page = std::fs::read_to_string(workspace().join("docs/man/bulwark-agent.toml.5")).unwrap();
    // `.TP` then `\fBkey\fR = ...`, under each table's `.SH` heading.
    let mut documented: BTreeSet<(String, String)> = BTreeSet::new();
    let mut section = String::new();
    let mut lines = page.lines().peekable();
    while let Some(l) = lines.next() {
        if let Some(h) = l.strip_prefix(".SH ") {
            section = h.trim_matches('"').to_string();
            // A table is a top-level key too: `[repositories.NAME]`.
            if let Some(table) = section.strip_prefix('[') {
                let key = table.split(['.', ']']).next().unwrap_or_default();
                documented.insert(("TOP-LEVEL KEYS".into(), key.to_string()));
            }
        }
        if l == ".TP" {
            let next = lines.peek().copied().unwrap_or_default();
            if let Some(key) = next
                .strip_prefix("\\fB")
                .and_then(|k| k.split_once("\\fR = "))
                .map(|(k, _)| k.to_string())
            {
                documented.insert((section.clone(), key));
            }
        }
    }
    let mut fields = BTreeSet::new();
    for (section, table) in [
        ("TOP-LEVEL KEYS", ""),
        ("[repositories.NAME]", "[repositories.x]\n"),
        ("[policies.NAME]", "[policies.x]\n"),
        ("[enforce]", "[enforce]\n"),
        ("[smtp]", "[smtp]\n"),
        ("[sync.NAME]", "[sync.x]\n"),
        ("[host.NAME]", "[host.x]\n"),
        ("[web]", "[web]\n"),
        ("[web.peers]", "[[web.peers]]\n"),
    ] {
        let doc = format!("{table}no_such_key_at_all = 1\n");
        let e = toml::from_str::<bulwark::config::Config>(&doc)
            .unwrap_err()
            .to_string();
        let expected = e
            .split_once("expected one of ")
            .unwrap_or_else(|| panic!("{section}: {e}"))
            .1;
        for f in expected.split(", ") {
            let f = f.trim().trim_matches(|c| c == '`' || c == '\n');
            fields.insert((section.to_string(), f.to_string()));
        }
    }
    assert_eq!(documented, fields);
}
