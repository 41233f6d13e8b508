//! `bulwark-nbd serve` on a real repository, read by real NBD peers, in
//! plain text on a Unix socket and over TLS on loopback TCP.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use bulwark_store::{
    BackupOptions, BackupSession, ChunkerParams, ImageFile, KdfParams, LocalBackend, Mode,
    RepoConfig, Repository, Secret, SnapshotMeta,
};
use testbed::nbd::certs::make_pki;
use testbed::nbd::{expected_map, source_image};

const PW: &str = "nbd test";

/// Backs up `image` into a new repository under `dir`; returns the snapshot id.
fn make_repo(dir: &Path, image: &Path) -> String {
    let cfg = RepoConfig {
        chunker: ChunkerParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        },
        pack_size: 2 << 20,
        ..RepoConfig::default()
    };
    let kdf = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let backend = Arc::new(LocalBackend::new(dir.join("repo")));
    let repo = Repository::init(backend, &Secret::Passphrase(PW.into()), &kdf, cfg).unwrap();
    let mut s = BackupSession::new(&repo, &BackupOptions::default()).unwrap();
    s.backup_disk("vda", &mut ImageFile::open(image).unwrap(), Mode::Full)
        .unwrap();
    let snap = s
        .finish(SnapshotMeta {
            source: "t".into(),
            ..Default::default()
        })
        .unwrap();
    snap.id.to_hex()
}

struct Served {
    child: Child,
    uri: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bulwark-nbd serve` of `snapshot` in `dir`'s repository with `args`.
fn bulwark_nbd<I, A>(dir: &Path, snapshot: &str, args: I) -> Command
where
    I: IntoIterator<Item = A>,
    A: AsRef<OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulwark-nbd"));
    cmd.args(["serve", "--snapshot", snapshot, "--repo"])
        .arg(dir.join("repo"))
        .args(args)
        .env("BULWARK_PASSWORD", PW);
    cmd
}

/// Start the server and wait for its "ready" line.
fn start(mut cmd: Command, uri: String) -> Served {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let served = Served { child, uri };
    assert_eq!(line.trim(), "ready", "bulwark-nbd did not start");
    served
}

fn serve(dir: &Path, snapshot: &str) -> Served {
    let socket = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///vda?socket={}", socket.display());
    start(
        bulwark_nbd(dir, snapshot, [OsStr::new("--socket"), socket.as_os_str()]),
        uri,
    )
}

/// A free loopback port (the listener is dropped; a race with another
/// process taking it in between is possible but harmless: the start fails).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install libnbd-bin qemu-utils): {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn real_peers_read_a_snapshot() {
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-")
        .tempdir()
        .unwrap();
    let (src, data, holes) = source_image(dir.path());
    let snap = make_repo(dir.path(), &src);
    let served = serve(dir.path(), &snap[..10]);

    let list = ok("nbdinfo", &["--list", &served.uri]);
    assert!(
        list.contains("export=\"vda\"") && list.contains(&format!("export-size: {}", data.len())),
        "{list}"
    );
    let map = ok("nbdinfo", &["--map", &served.uri]);
    let got: Vec<(u64, u64, bool)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse::<u32>().unwrap() & 1 != 0,
            )
        })
        .collect();
    assert_eq!(got, expected_map(data.len() as u64, &holes), "{map}");

    let copy = dir.path().join("copy.raw");
    ok("nbdcopy", &[&served.uri, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == data, "nbdcopy differs");
    let cmp = ok(
        "qemu-img",
        &["compare", "-f", "raw", src.to_str().unwrap(), &served.uri],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");

    if Path::new("/dev/fuse").exists() {
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut fuse = Command::new("nbdfuse")
            .arg(&mnt)
            .arg(&served.uri)
            .spawn()
            .unwrap();
        let file = mnt.join("nbd");
        let mut content = None;
        for _ in 0..100 {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() == data.len() as u64) {
                content = std::fs::read(&file).ok();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = Command::new("fusermount3").arg("-uz").arg(&mnt).status();
        let _ = fuse.wait();
        assert!(content.expect("nbdfuse exposes the export") == data);
    } else {
        eprintln!("SKIP nbdfuse: /dev/fuse missing");
    }
}

#[test]
fn damaged_chunk_is_eio_and_server_stays_up() {
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-")
        .tempdir()
        .unwrap();
    let (src, _, _) = source_image(dir.path());
    let snap = make_repo(dir.path(), &src);
    // Damage every pack a little.
    let mut packs = vec![];
    for e in walkdir(&dir.path().join("repo/data")) {
        packs.push(e);
    }
    let p = &packs[0];
    let mut b = std::fs::read(p).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(p, &b).unwrap();
    let served = serve(dir.path(), &snap);
    let copy = dir.path().join("copy.raw");
    let o = run("nbdcopy", &[&served.uri, copy.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "nbdcopy of a damaged snapshot must fail"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    // Still serving.
    let list = ok("nbdinfo", &["--list", &served.uri]);
    assert!(list.contains("export=\"vda\""));
}

fn walkdir(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The snapshot over TLS on loopback TCP (`--tls-creds`, `require` by
/// default): libnbd and QEMU read it bit-identical with a client
/// certificate; without one, or in plain text, they get nothing.
#[test]
fn snapshot_over_tls() {
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-tls-")
        .tempdir()
        .unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let (src, data, holes) = source_image(dir.path());
    let snap = make_repo(dir.path(), &src);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let served = start(
        bulwark_nbd(
            dir.path(),
            &snap,
            [
                OsStr::new("--listen"),
                OsStr::new(&listen),
                OsStr::new("--tls-creds"),
                pki.server.as_os_str(),
            ],
        ),
        format!("nbd://{listen}/vda"),
    );
    let tls_uri =
        |certs: &Path| format!("nbds://{listen}/vda?tls-certificates={}", certs.display());

    let map = ok("nbdinfo", &["--map", &tls_uri(&pki.client)]);
    assert_eq!(
        map.lines().count(),
        expected_map(data.len() as u64, &holes).len(),
        "{map}"
    );
    let copy = dir.path().join("copy.raw");
    ok("nbdcopy", &[&tls_uri(&pki.client), copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "nbdcopy over TLS differs"
    );

    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.client.display()
    );
    let nbd = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vda,tls-creds=tls0"
    );
    let local = format!(
        "driver=raw,file.driver=file,file.filename={}",
        src.display()
    );
    let cmp = ok(
        "qemu-img",
        &["compare", "--object", &object, "--image-opts", &local, &nbd],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // Refused: plain text, and TLS without a client certificate.
    for uri in [served.uri.clone(), tls_uri(&pki.anonymous)] {
        let o = run("nbdinfo", &["--list", &uri]);
        assert!(!o.status.success(), "{uri} was served");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("vda"));
    }
}

/// `--listen` beyond loopback without required TLS is refused up front,
/// before the repository is even opened; `--insecure` lets it through
/// (here to fail later, at the missing repository, so nothing listens).
#[test]
fn listen_beyond_loopback_needs_tls() {
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-listen-")
        .tempdir()
        .unwrap();
    let snap = "0123456789";
    let exposed = format!("0.0.0.0:{}", free_port());
    let refused = |args: &[&str]| -> String {
        let mut cmd = bulwark_nbd(dir.path(), snap, args);
        let o = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} started");
        assert!(o.stdout.is_empty(), "{args:?} printed ready");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = refused(&["--listen", &exposed]);
    assert!(
        err.contains("refusing to serve NBD without TLS") && err.contains("--insecure"),
        "{err}"
    );
    // TLS offered but optional is still plain text for whoever wants it.
    let pki = make_pki(&dir.path().join("pki"));
    let creds = pki.server.to_str().unwrap();
    let err = refused(&["--listen", &exposed, "--tls-creds", creds, "--tls", "allow"]);
    assert!(err.contains("refusing to serve NBD without TLS"), "{err}");
    // --insecure passes the check; the missing repository stops it.
    let err = refused(&["--listen", &exposed, "--insecure"]);
    assert!(!err.contains("refusing to serve NBD"), "{err}");
    // Missing credentials are named.
    let missing = dir.path().join("no-such-creds");
    let err = refused(&[
        "--socket",
        "/nonexistent/x.sock",
        "--tls-creds",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("server-cert.pem"), "{err}");
}

/// A pending export (`StoreExport::pending`, how the server answers a
/// client before its disks are open): a read waits until the reader is in
/// its slot and then gets the snapshot's bytes; an export whose disk never
/// opens fails its reads with an error, never with bytes.
#[tokio::test]
async fn a_pending_export_reads_once_its_disk_is_open_and_fails_if_it_never_is() {
    use bulwark_nbd::StoreExport;
    use nbd_server::Export;
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-")
        .tempdir()
        .unwrap();
    let (src, data, _) = source_image(dir.path());
    let snap = make_repo(dir.path(), &src);
    let backend = Arc::new(LocalBackend::new(dir.path().join("repo")));
    let repo = Arc::new(Repository::open(backend, &Secret::Passphrase(PW.into())).unwrap());
    let snap = repo.find_snapshot(&snap).unwrap();

    let (export, slot) = StoreExport::pending(data.len() as u64);
    assert_eq!(export.size(), data.len() as u64);
    let export = Arc::new(export);
    let reading = {
        let e = export.clone();
        tokio::spawn(async move { e.read(4096, 65536).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !reading.is_finished(),
        "a read answered before the disk opened"
    );
    let (_, reader) = bulwark_store::read::reader::open_disks(repo, &snap, 8 << 20)
        .unwrap()
        .pop()
        .unwrap();
    slot.fill(Arc::new(reader));
    let got = reading.await.unwrap().unwrap();
    assert!(got[..] == data[4096..4096 + 65536], "wrong bytes");
    let got = export.read(0, 512).await.unwrap();
    assert!(got[..] == data[..512]);

    let (never, slot) = StoreExport::pending(data.len() as u64);
    let never = Arc::new(never);
    let reading = {
        let e = never.clone();
        tokio::spawn(async move { e.read(0, 512).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(slot);
    let e = reading.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("could not be opened"), "{e}");
    assert!(never.read(0, 512).await.is_err());
}

/// `serve --plan-on-stdin` (a live restore's server, started before the
/// command read the snapshot): it serves at once, then takes its backfill
/// from the plan and restores the disk into the file bit for bit, and
/// serves what the backfill wrote from the file (the packs gone, every
/// byte still reads right); a plan for another snapshot, or none, ends it
/// with an error that says so.
#[test]
fn a_plan_on_stdin_backfills_and_another_snapshots_plan_is_refused() {
    use std::io::Write;
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-")
        .tempdir()
        .unwrap();
    let (src, data, _) = source_image(dir.path());
    let snap = make_repo(dir.path(), &src);
    let socket = dir.path().join("nbd.sock");
    let stats = dir.path().join("stats.json");
    let planned = |plan: Option<String>| {
        let mut child = bulwark_nbd(
            dir.path(),
            &snap[..12],
            [
                OsStr::new("--socket"),
                socket.as_os_str(),
                OsStr::new("--plan-on-stdin"),
                OsStr::new("--stats"),
                stats.as_os_str(),
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(p) = plan {
            stdin.write_all(p.as_bytes()).unwrap();
        }
        (child, stdin)
    };

    let base = dir.path().join("vda.base.raw");
    let plan = serde_json::json!({
        "snapshot": snap,
        "backfill": [format!("vda={}", base.display())],
    });
    let (child, stdin) = planned(Some(format!("{plan}\n")));
    let served = Served {
        child,
        uri: format!("nbd+unix:///vda?socket={}", socket.display()),
    };
    for _ in 0..200 {
        if base.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        std::fs::read(&base).unwrap() == data,
        "the backfill differs"
    );
    // No pack left to fetch from: whatever the guest reads now comes from
    // the backfill's file.
    let packs = dir.path().join("repo").join("data");
    let moved = dir.path().join("repo").join("data.moved");
    std::fs::rename(&packs, &moved).unwrap();
    let copy = dir.path().join("copy.raw");
    ok("nbdcopy", &[&served.uri, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == data);
    let mut from_backfill = 0;
    for _ in 0..60 {
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats).unwrap_or_default()).unwrap_or_default();
        from_backfill = st["bytes_from_backfill"].as_u64().unwrap_or(0);
        if from_backfill > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        from_backfill > 0,
        "nothing counted as served from the backfill"
    );
    std::fs::rename(&moved, &packs).unwrap();
    drop((served, stdin));

    let other = serde_json::json!({ "snapshot": "00".repeat(32) });
    let (child, stdin) = planned(Some(format!("{other}\n")));
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the command planned snapshot 0000"), "{err}");

    let (child, stdin) = planned(None);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no plan on stdin"), "{err}");
}
