//! NBD test helpers, shared by the protocol's tests (`nbd-server`) and the
//! store-backed exports' (`bulwark-nbd`): test images, a served export in a
//! private temp dir, external tools, and a test PKI ([`certs`]).

pub mod certs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use nbd_server::{Export, MemExport, Server, ServerConfig, ServerHandle, ServerTls, TlsMode};
use rand::{Rng, SeedableRng};

/// A 16 MiB image: random data, text, and holes at 64 KiB-aligned places.
/// Returns the bytes and the hole list `(offset, len)`.
pub fn test_image() -> (Vec<u8>, Vec<(u64, u64)>) {
    const MIB: usize = 1 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut data = vec![0u8; 16 * MIB];
    rng.fill(&mut data[..4 * MIB]);
    let text = b"The quick brown fox jumps over the lazy dog. ";
    for (i, b) in data[6 * MIB..9 * MIB].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
    rng.fill(&mut data[12 * MIB..12 * MIB + 192 * 1024]);
    rng.fill(&mut data[15 * MIB..16 * MIB - 4096]);
    let holes = vec![
        (4 * MIB as u64, 2 * MIB as u64),
        (9 * MIB as u64, 3 * MIB as u64),
        (
            (12 * MIB + 192 * 1024) as u64,
            (3 * MIB - 192 * 1024) as u64,
        ),
    ];
    (data, holes)
}

/// [`test_image`] written sparsely to `dir/source.raw`: its path, data
/// and holes.
pub fn source_image(dir: &Path) -> (std::path::PathBuf, Vec<u8>, Vec<(u64, u64)>) {
    let (data, holes) = test_image();
    let src = dir.join("source.raw");
    write_sparse(&src, &data, &holes);
    (src, data, holes)
}

/// Write `data` to `path` as a sparse file: the given holes are skipped.
pub fn write_sparse(path: &Path, data: &[u8], holes: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    let mut pos = 0u64;
    let mut sorted = holes.to_vec();
    sorted.sort_unstable();
    for (ho, hl) in sorted.into_iter().chain([(data.len() as u64, 0)]) {
        if ho > pos {
            f.write_all_at(&data[pos as usize..ho as usize], pos)
                .unwrap();
        }
        pos = pos.max(ho + hl);
    }
    f.sync_all().unwrap();
}

/// A server on a Unix socket in its own temp dir (or on a loopback TCP
/// port, then `tcp` is set); shut down explicitly.
pub struct Served {
    /// The private temp dir (the socket is in it).
    pub dir: tempfile::TempDir,
    /// The Unix socket (unused when serving over TCP).
    pub socket: PathBuf,
    /// The TCP address, when serving on loopback TCP.
    pub tcp: Option<SocketAddr>,
    /// The running server; taken by [`Served::shutdown`].
    pub handle: Option<ServerHandle>,
}

impl Served {
    /// libnbd URI of `export` on the Unix socket.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// libnbd URI over TLS with the credentials in `certs`.
    pub fn tls_uri(&self, export: &str, certs: &Path) -> String {
        match self.tcp {
            Some(a) => format!("nbds://{a}/{export}?tls-certificates={}", certs.display()),
            None => format!(
                "nbds+unix:///{export}?socket={}&tls-certificates={}",
                self.socket.display(),
                certs.display()
            ),
        }
    }

    /// Shut the server down, failing the test if that hangs.
    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), h.shutdown())
                .await
                .expect("server shutdown hangs");
        }
    }
}

/// Serve `exports` on a Unix socket with the default config.
pub fn serve<E: Export>(exports: Vec<(&str, Arc<E>)>) -> Served {
    serve_with(exports, ServerConfig::default())
}

/// Serve `exports` on a Unix socket with `config`.
pub fn serve_with<E: Export>(exports: Vec<(&str, Arc<E>)>, config: ServerConfig) -> Served {
    let dir = tempfile::Builder::new()
        .prefix("nbd-test-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    let mut server = Server::new(config);
    for (name, e) in exports {
        server = server.add_export(name, e, Some(format!("test export {name}")));
    }
    let handle = server.bind_unix(&socket).unwrap();
    Served {
        dir,
        socket,
        tcp: None,
        handle: Some(handle),
    }
}

/// Like [`serve_with`], on 127.0.0.1 at a free port (QEMU checks the
/// server certificate against the host it connects to).
pub fn serve_tcp_with<E: Export>(exports: Vec<(&str, Arc<E>)>, config: ServerConfig) -> Served {
    let dir = tempfile::Builder::new()
        .prefix("nbd-test-")
        .tempdir()
        .unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let mut server = Server::new(config);
    for (name, e) in exports {
        server = server.add_export(name, e, Some(format!("test export {name}")));
    }
    let handle = server.serve_tcp(tokio::net::TcpListener::from_std(l).unwrap());
    Served {
        socket: dir.path().join("unused.sock"),
        dir,
        tcp: Some(addr),
        handle: Some(handle),
    }
}

/// A server config requiring TLS with the credentials in `dir`.
pub fn tls_config(dir: &Path) -> ServerConfig {
    ServerConfig {
        tls: Some(ServerTls::from_dir(dir, TlsMode::Require).unwrap()),
        ..ServerConfig::default()
    }
}

/// Run an external tool that is expected to fail; returns its output.
pub async fn run_failing(cmd: &str, args: &[&str]) -> Output {
    let out = output(cmd, args).await;
    assert!(
        !out.status.success(),
        "{cmd} {args:?} succeeded but should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// An external tool's output (async, so the in-process server keeps
/// serving), within a minute.
async fn output(cmd: &str, args: &[&str]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(cmd)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{cmd} timed out"))
    .unwrap_or_else(|e| {
        panic!("cannot run {cmd} (install libnbd-bin nbdkit nbdfuse qemu-utils): {e}")
    })
}

/// [`test_image`] as a [`MemExport`].
pub fn mem_export() -> Arc<MemExport> {
    let (data, holes) = test_image();
    Arc::new(MemExport::new(data, holes))
}

/// Run an external tool (async, so the in-process server keeps serving),
/// failing the test with its stderr if it fails.
pub async fn run(cmd: &str, args: &[&str]) -> Output {
    let out = output(cmd, args).await;
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command's stdout, lossily as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Expected `base:allocation` map (offset, length, is_hole) for an image
/// of `size` bytes with `holes`.
pub fn expected_map(size: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut sorted = holes.to_vec();
    sorted.sort_unstable();
    let mut pos = 0;
    for (o, l) in sorted {
        if o > pos {
            out.push((pos, o - pos, false));
        }
        out.push((o, l, true));
        pos = o + l;
    }
    if pos < size {
        out.push((pos, size - pos, false));
    }
    out
}
