//! The server's option haggling with STARTTLS, end to end: a server that
//! requires TLS (and client certificates) gets the input as a client's
//! bytes in one of three places, picked by the first byte: right after the
//! client flags (plain-text options under `require`), right after an
//! acknowledged STARTTLS (where the TLS handshake belongs), or inside an
//! established TLS session. Whatever arrives, the server must answer or hang
//! up, never panic, hang or stop serving others.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::*;
use nbd_server::{ClientTls, MemExport, Server, ServerConfig, ServerHandle, ServerTls, TlsMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use testbed::nbd::certs;

struct Env {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
    tls: ClientTls,
    _handle: ServerHandle,
    _dir: tempfile::TempDir,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn setup() -> Env {
    // libFuzzer's main, not Rust's, runs this binary: ignore SIGPIPE as
    // Rust programs (bulwark-nbd) do, so a write to a socket the other side
    // closed is an EPIPE error, not the death of the process.
    // SAFETY: called once, before any thread of ours exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make_pki(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    let config = ServerConfig {
        tls: Some(ServerTls::from_dir(&pki.server, TlsMode::Require).unwrap()),
        handshake_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let export = Arc::new(MemExport::new(vec![0x5a; 1 << 20], vec![]));
    let handle = rt.block_on(async {
        Server::new(config)
            .add_export("vda", export, None)
            .bind_unix(&socket)
            .unwrap()
    });
    Env {
        rt,
        socket,
        tls: ClientTls::from_dir(&pki.client, "localhost").unwrap(),
        _handle: handle,
        _dir: dir,
    }
}

/// Send the input, close our side, read until the server closes.
async fn feed<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, input: &[u8]) {
    let _ = s.write_all(input).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
        .await
        .expect("server neither answered nor hung up")
        .ok();
}

fuzz_target!(|data: &[u8]| {
    let env = ENV.get_or_init(setup);
    let Some((&place, input)) = data.split_first() else {
        return;
    };
    env.rt.block_on(async {
        let mut s = UnixStream::connect(&env.socket).await.unwrap();
        let mut g = [0u8; Greeting::LEN];
        s.read_exact(&mut g).await.unwrap();
        let flags = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
        s.write_all(&flags.to_be_bytes()).await.unwrap();
        if place % 3 == 0 {
            return feed(s, input).await;
        }
        s.write_all(&OptionRequest::StartTls.to_bytes())
            .await
            .unwrap();
        let mut h = [0u8; OptionReplyHeader::LEN];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(OptionReplyHeader::parse(&h).unwrap().reply_type, REP_ACK);
        if place % 3 == 1 {
            return feed(s, input).await;
        }
        let t = tokio_rustls::TlsConnector::from(env.tls.config())
            .connect(env.tls.server_name().clone(), s)
            .await
            .unwrap();
        feed(t, input).await
    });
});
