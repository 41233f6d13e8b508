//! Hostile and broken peers: garbage, truncated handshakes and requests,
//! oversized lengths, out-of-range offsets, unknown commands. Each gets an
//! error reply or loses its own connection, while a well-behaved client
//! keeps being served correctly the whole time. The same holds for the
//! STARTTLS path: options before TLS under `require`, STARTTLS twice or with
//! data, plain text injected behind STARTTLS, and garbage where the TLS
//! handshake should be.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::*;
use nbd_server::proto::transmission::*;
use nbd_server::{Client, ClientOptions, ClientTls, ServerConfig, ServerTls, TlsMode};
use rand::{Rng, SeedableRng};
use testbed::nbd::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_rustls::client::TlsStream;

const T: Duration = Duration::from_secs(5);

/// A hand-driven connection speaking raw protocol bytes, on a Unix socket
/// or, after STARTTLS, inside TLS on one.
struct Raw<S = UnixStream>(S);

impl Raw<UnixStream> {
    async fn connect(path: &Path) -> Self {
        let mut s = UnixStream::connect(path).await.unwrap();
        let mut g = [0u8; Greeting::LEN];
        s.read_exact(&mut g).await.unwrap();
        Greeting::parse(&g).unwrap();
        Raw(s)
    }

    /// Send STARTTLS, expect the ACK, and run the TLS handshake.
    async fn starttls(mut self, tls: &ClientTls) -> Raw<TlsStream<UnixStream>> {
        self.option(OPT_STARTTLS, &[]).await;
        assert_eq!(self.option_reply().await.0.reply_type, REP_ACK);
        let t = tokio_rustls::TlsConnector::from(tls.config())
            .connect(tls.server_name().clone(), self.0)
            .await
            .expect("TLS handshake");
        Raw(t)
    }

    /// Flags, structured replies, optional base:allocation, GO "vda".
    async fn go(path: &Path, structured: bool, meta: bool) -> Self {
        let mut r = Self::connect(path).await;
        r.flags().await;
        r.go_on(structured, meta).await;
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn send(&mut self, b: &[u8]) {
        // The server may already have hung up: that's what some tests want.
        // (Flushed: TLS may otherwise hold the record back.)
        if self.0.write_all(b).await.is_ok() {
            let _ = self.0.flush().await;
        }
    }

    async fn flags(&mut self) {
        self.send(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())
            .await;
    }

    async fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = OptionHeader {
            option: opt,
            length: data.len() as u32,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        self.send(&b).await;
    }

    async fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; OptionReplyHeader::LEN];
        tokio::time::timeout(T, self.0.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let mut d = vec![0u8; h.length as usize];
        self.0.read_exact(&mut d).await.unwrap();
        (h, d)
    }

    /// Structured replies, optional base:allocation, GO "vda".
    async fn go_on(&mut self, structured: bool, meta: bool) {
        let r = self;
        if structured {
            r.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
        }
        if meta {
            let q = MetaContextRequest {
                export: "vda".into(),
                queries: vec!["base:allocation".into()],
            };
            r.option(OPT_SET_META_CONTEXT, &q.encode()).await;
            assert_eq!(r.option_reply().await.0.reply_type, REP_META_CONTEXT);
            assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
        }
        let go = ExportRequest {
            name: "vda".into(),
            info: vec![],
        };
        r.option(OPT_GO, &go.encode()).await;
        loop {
            let (h, _) = r.option_reply().await;
            if h.reply_type == REP_ACK {
                break;
            }
            assert_eq!(h.reply_type, REP_INFO);
        }
    }

    async fn request(
        &mut self,
        command: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.send(&req.encode()).await;
    }

    /// Next reply: header plus payload (structured), or header (simple).
    async fn reply(&mut self) -> (ReplyHeader, Vec<u8>) {
        let mut b = [0u8; 20];
        tokio::time::timeout(T, self.0.read_exact(&mut b[..4]))
            .await
            .unwrap()
            .unwrap();
        let n = ReplyHeader::len_for_magic([b[0], b[1], b[2], b[3]]).unwrap();
        self.0.read_exact(&mut b[4..n]).await.unwrap();
        let h = ReplyHeader::parse(&b[..n]).unwrap();
        let mut p = Vec::new();
        if let ReplyHeader::Structured(c) = h {
            p.resize(c.length as usize, 0);
            self.0.read_exact(&mut p).await.unwrap();
        }
        (h, p)
    }

    /// The error carried by the next reply (0 for success).
    async fn reply_errno(&mut self, cookie: u64) -> u32 {
        let (h, p) = self.reply().await;
        assert_eq!(h.cookie(), cookie);
        match h {
            ReplyHeader::Simple(s) => s.error,
            ReplyHeader::Structured(c) => match Chunk::parse(c.reply_type, &p).unwrap() {
                Chunk::Error { error, .. } => error,
                _ => 0,
            },
        }
    }

    /// Assert the server closes the connection (anything sent before EOF
    /// is ignored).
    async fn expect_closed(mut self) {
        let mut sink = Vec::new();
        tokio::time::timeout(T, self.0.read_to_end(&mut sink))
            .await
            .expect("server kept a broken connection open")
            .ok();
    }
}

async fn handshake_abuse(path: &Path) {
    // Garbage instead of client flags (unknown flag bits).
    let mut r = Raw::connect(path).await;
    r.send(&[0xff; 64]).await;
    r.expect_closed().await;

    // Truncated handshake: two bytes, then hang up on our side.
    let mut r = Raw::connect(path).await;
    r.send(&[0, 0]).await;
    let _ = r.0.shutdown().await;
    r.expect_closed().await;

    // Bad option magic.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    r.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await;
    r.expect_closed().await;

    // Oversized option data.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    r.send(
        &OptionHeader {
            option: OPT_GO,
            length: 1 << 30,
        }
        .encode(),
    )
    .await;
    r.expect_closed().await;

    // Unknown export via EXPORT_NAME cannot be refused politely.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    r.option(OPT_EXPORT_NAME, b"nope").await;
    r.expect_closed().await;

    // Errors that keep the session alive, then a normal GO.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    r.option(99, b"0123456789").await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_UNSUP);
    r.option(OPT_INFO, &[0, 0, 0, 9, b'v']).await; // name length lies
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_INVALID);
    r.option(OPT_LIST, b"x").await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_INVALID);
    let q = MetaContextRequest {
        export: "vda".into(),
        queries: vec![],
    };
    r.option(OPT_SET_META_CONTEXT, &q.encode()).await; // before structured replies
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_INVALID);
    r.option(OPT_STARTTLS, &[]).await;
    assert!(r.option_reply().await.0.is_error());
    let unknown = ExportRequest {
        name: "nope".into(),
        info: vec![],
    };
    r.option(OPT_GO, &unknown.encode()).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_UNKNOWN);
    r.option(OPT_LIST, &[]).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_SERVER);
    assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
    r.option(OPT_ABORT, &[]).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
    r.expect_closed().await;
}

async fn transmission_abuse(path: &Path, data: &[u8]) {
    let size = data.len() as u64;
    let mut r = Raw::go(path, true, false).await;
    r.request(Command::Unknown(42), 0, 1, 0, 0).await;
    assert_eq!(r.reply_errno(1).await, EINVAL);
    r.request(Command::Read, 0, 2, 0, 64 << 20).await;
    assert_eq!(r.reply_errno(2).await, EINVAL);
    r.request(Command::Read, 0, 3, size - 10, 4096).await;
    assert_eq!(r.reply_errno(3).await, EINVAL);
    r.request(Command::Read, 0, 4, u64::MAX - 10, 4096).await;
    assert_eq!(r.reply_errno(4).await, EINVAL);
    r.request(Command::BlockStatus, 0, 5, 0, 4096).await; // no context
    assert_eq!(r.reply_errno(5).await, EINVAL);
    r.request(Command::Read, 0x8000, 6, 0, 4096).await; // unknown flag
    assert_eq!(r.reply_errno(6).await, EINVAL);
    r.request(Command::Trim, 0, 7, 0, 4096).await;
    assert_eq!(r.reply_errno(7).await, EPERM);
    r.request(Command::Write, 0, 8, 0, 4096).await;
    r.send(&[0x55; 4096]).await;
    assert_eq!(r.reply_errno(8).await, EPERM);
    r.request(Command::Flush, 0, 9, 0, 0).await;
    assert_eq!(r.reply_errno(9).await, 0);
    r.request(Command::Cache, 0, 10, 0, 1 << 20).await;
    assert_eq!(r.reply_errno(10).await, 0);
    r.request(Command::Cache, 0, 11, size, 1).await;
    assert_eq!(r.reply_errno(11).await, EINVAL);

    // Still in sync after the write payload: pipeline 64 DF reads (one data
    // chunk each) and check every reply, in whatever order they come.
    for i in 0..64u64 {
        r.request(Command::Read, CMD_FLAG_DF, 100 + i, i * 65536, 65536)
            .await;
    }
    let mut seen = 0;
    for _ in 0..64 {
        let (h, p) = r.reply().await;
        let i = h.cookie() - 100;
        match h {
            ReplyHeader::Structured(c) if c.is_done() => {
                match Chunk::parse(c.reply_type, &p).unwrap() {
                    Chunk::OffsetData { offset, data: d } => {
                        assert_eq!(offset, i * 65536);
                        assert!(d == &data[offset as usize..offset as usize + 65536]);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
        seen |= 1u64 << i;
    }
    assert_eq!(seen, u64::MAX);

    // A write announcing more payload than we'd ever buffer: hang up.
    r.request(Command::Write, 0, 12, 0, u32::MAX).await;
    r.expect_closed().await;

    // Without structured replies (the Linux kernel's way): simple errors.
    let mut r = Raw::go(path, false, false).await;
    r.request(Command::Read, 0, 1, size, 1).await;
    assert_eq!(r.reply_errno(1).await, EINVAL);
    r.request(Command::Read, CMD_FLAG_DF, 2, 0, 512).await; // DF not offered
    assert_eq!(r.reply_errno(2).await, EINVAL);
    r.request(Command::Read, 0, 3, 512, 512).await;
    let (h, _) = r.reply().await;
    assert_eq!(
        h,
        ReplyHeader::Simple(SimpleReply {
            error: 0,
            cookie: 3
        })
    );
    let mut buf = [0u8; 512];
    r.0.read_exact(&mut buf).await.unwrap();
    assert!(buf[..] == data[512..1024]);

    // Block status past the end, with a context.
    let mut r = Raw::go(path, true, true).await;
    r.request(Command::BlockStatus, 0, 1, size - 512, 1024)
        .await;
    assert_eq!(r.reply_errno(1).await, EINVAL);
    r.request(Command::BlockStatus, CMD_FLAG_REQ_ONE, 2, 0, 1 << 20)
        .await;
    assert_eq!(r.reply_errno(2).await, 0);

    // Bad request magic: framing is lost, so the connection goes.
    let mut r = Raw::go(path, true, false).await;
    r.send(&[0xaa; Request::LEN]).await;
    r.expect_closed().await;

    // Truncated request, then hang up: nothing to answer, nothing to crash.
    let mut r = Raw::go(path, true, false).await;
    r.send(
        &Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .encode()[..10],
    )
    .await;
    drop(r);
}

async fn random_garbage(path: &Path, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..30 {
        let after_go = i % 2 == 0;
        let mut r = if after_go {
            Raw::go(path, i % 4 == 0, false).await
        } else {
            Raw::connect(path).await
        };
        let n = rng.gen_range(1..2048);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        r.send(&junk).await;
        let _ = r.0.shutdown().await;
        r.expect_closed().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_do_not_disturb_good_client() {
    let export = mem_export();
    let data = export.data().to_vec();
    let config = ServerConfig {
        max_in_flight: 16,
        ..ServerConfig::default()
    };
    let served = serve_with(vec![("vda", export)], config);

    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let stop = Arc::clone(&stop);
        let data = data.clone();
        let path = served.socket.clone();
        tokio::spawn(async move {
            let opts = ClientOptions::new("vda").meta_context("base:allocation");
            let mut c = Client::connect_unix(&path, &opts).await.unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) || n < 10 {
                let off = rng.gen_range(0..data.len());
                let len = rng.gen_range(1..=(data.len() - off).min(1 << 20));
                let got = c.read(off as u64, len).await.unwrap();
                assert!(got[..] == data[off..off + len], "good client got bad data");
                c.block_status(off as u64, len as u64, "base:allocation")
                    .await
                    .unwrap();
                n += 1;
            }
            c.disconnect().await.unwrap();
            n
        })
    };

    handshake_abuse(&served.socket).await;
    transmission_abuse(&served.socket, &data).await;
    random_garbage(&served.socket, 3).await;

    stop.store(true, Ordering::Relaxed);
    let n = tokio::time::timeout(Duration::from_secs(30), good)
        .await
        .expect("good client stalled")
        .expect("good client failed");
    assert!(n >= 10);

    // A fresh client still works, and shutdown completes with an idle
    // connection still open.
    let mut c = Client::connect_unix(&served.socket, &ClientOptions::new("vda"))
        .await
        .unwrap();
    assert!(c.read(0, 4096).await.unwrap()[..] == data[..4096]);
    let idle = Raw::go(&served.socket, true, false).await;
    served.shutdown().await;
    idle.expect_closed().await;
    assert!(c.read(0, 4096).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshake_times_out() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let served = serve_with(vec![("vda", mem_export())], config);
    let r = Raw::connect(&served.socket).await;
    r.expect_closed().await;
    served.shutdown().await;
}

/// Options before STARTTLS under `require`, EXPORT_NAME before TLS, STARTTLS
/// with data and twice, plain text pipelined behind STARTTLS, garbage in
/// place of (and inside) the TLS handshake.
async fn starttls_abuse(path: &Path, tls: &ClientTls, data: &[u8]) {
    // Every option but STARTTLS and ABORT: NBD_REP_ERR_TLS_REQD, whatever
    // its data (even invalid data is not parsed before TLS).
    let mut r = Raw::connect(path).await;
    r.flags().await;
    let go = ExportRequest {
        name: "vda".into(),
        info: vec![],
    };
    let meta = MetaContextRequest {
        export: "vda".into(),
        queries: vec!["base:allocation".into()],
    };
    for (opt, payload) in [
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_GO, go.encode()),
        (OPT_INFO, vec![0, 0, 0, 9, b'v']),
        (OPT_SET_META_CONTEXT, meta.encode()),
        (99, b"0123456789".to_vec()),
    ] {
        r.option(opt, &payload).await;
        let (h, _) = r.option_reply().await;
        assert_eq!(h.option, opt);
        assert_eq!(h.reply_type, REP_ERR_TLS_REQD, "option {opt} before TLS");
    }
    // STARTTLS with data is invalid, and the session goes on.
    r.option(OPT_STARTTLS, b"x").await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_INVALID);
    r.option(OPT_ABORT, &[]).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
    r.expect_closed().await;

    // EXPORT_NAME cannot be refused: the server hangs up, sending nothing.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    r.option(OPT_EXPORT_NAME, b"vda").await;
    let mut rest = Vec::new();
    tokio::time::timeout(T, r.0.read_to_end(&mut rest))
        .await
        .expect("EXPORT_NAME before TLS left open")
        .ok();
    assert!(
        rest.is_empty(),
        "export data before TLS: {} bytes",
        rest.len()
    );

    // Garbage where the ClientHello should be.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    r.option(OPT_STARTTLS, &[]).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
    r.send(&[0x16, 3, 1, 0xff, 0xff, 0, 0, 0]).await;
    r.send(&[0xee; 512]).await;
    r.expect_closed().await;

    // Plain text pipelined behind STARTTLS is not an option: it is a
    // (broken) TLS handshake.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    let mut both = OptionHeader {
        option: OPT_STARTTLS,
        length: 0,
    }
    .encode()
    .to_vec();
    both.extend_from_slice(&OptionRequest::List.to_bytes());
    r.send(&both).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
    r.expect_closed().await;

    // A truncated ClientHello, then hang up.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    r.option(OPT_STARTTLS, &[]).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
    r.send(&[0x16, 3, 1, 0, 200, 1, 0, 0]).await;
    let _ = r.0.shutdown().await;
    r.expect_closed().await;

    // Inside TLS: STARTTLS again is invalid, the session goes on; the
    // export is served read-only.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    let mut t = r.starttls(tls).await;
    t.option(OPT_STARTTLS, &[]).await;
    assert_eq!(t.option_reply().await.0.reply_type, REP_ERR_INVALID);
    t.option(OPT_LIST, &[]).await;
    assert_eq!(t.option_reply().await.0.reply_type, REP_SERVER);
    assert_eq!(t.option_reply().await.0.reply_type, REP_ACK);
    t.go_on(true, true).await;
    t.request(Command::Read, CMD_FLAG_DF, 1, 4096, 4096).await;
    let (h, p) = t.reply().await;
    assert_eq!(h.cookie(), 1);
    match h {
        ReplyHeader::Structured(c) => match Chunk::parse(c.reply_type, &p).unwrap() {
            Chunk::OffsetData { offset, data: d } => {
                assert_eq!(offset, 4096);
                assert!(d == &data[4096..8192]);
            }
            other => panic!("unexpected {other:?}"),
        },
        other => panic!("unexpected {other:?}"),
    }
    t.request(Command::Write, 0, 2, 0, 4096).await;
    t.send(&[0x55; 4096]).await;
    assert_eq!(t.reply_errno(2).await, EPERM);
    t.request(Command::WriteZeroes, 0, 3, 0, 4096).await;
    assert_eq!(t.reply_errno(3).await, EPERM);
    t.request(Command::Trim, 0, 4, 0, 4096).await;
    assert_eq!(t.reply_errno(4).await, EPERM);
    t.request(Command::Read, CMD_FLAG_DF, 5, 0, 16).await;
    let (h, _) = t.reply().await;
    assert_eq!(h.cookie(), 5);
    t.request(Command::Disc, 0, 6, 0, 0).await;
    t.expect_closed().await;

    // Inside TLS, garbage instead of an option: that connection goes.
    let mut r = Raw::connect(path).await;
    r.flags().await;
    let mut t = r.starttls(tls).await;
    t.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await;
    t.expect_closed().await;

    // Random junk after the ACK, and random junk inside TLS.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for i in 0..20 {
        let n = rng.gen_range(1..2048);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        let mut r = Raw::connect(path).await;
        r.flags().await;
        if i % 2 == 0 {
            r.option(OPT_STARTTLS, &[]).await;
            assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
            r.send(&junk).await;
            let _ = r.0.shutdown().await;
            r.expect_closed().await;
        } else {
            let mut t = r.starttls(tls).await;
            t.send(&junk).await;
            let _ = t.0.shutdown().await;
            t.expect_closed().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_abuse_does_not_disturb_good_client() {
    let pki_dir = tempfile::Builder::new()
        .prefix("nbd-tls-robust-")
        .tempdir()
        .unwrap();
    let pki = testbed::nbd::certs::make_pki(pki_dir.path());
    let tls = ClientTls::from_dir(&pki.client, "localhost").unwrap();
    let export = mem_export();
    let data = export.data().to_vec();
    let served = serve_with(vec![("vda", export)], tls_config(&pki.server));

    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let stop = Arc::clone(&stop);
        let data = data.clone();
        let path = served.socket.clone();
        let opts = ClientOptions::new("vda")
            .meta_context("base:allocation")
            .tls(tls.clone());
        tokio::spawn(async move {
            let mut c = Client::connect_unix(&path, &opts).await.unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(2);
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) || n < 10 {
                let off = rng.gen_range(0..data.len());
                let len = rng.gen_range(1..=(data.len() - off).min(1 << 20));
                let got = c.read(off as u64, len).await.unwrap();
                assert!(got[..] == data[off..off + len], "good client got bad data");
                n += 1;
            }
            c.disconnect().await.unwrap();
            n
        })
    };

    starttls_abuse(&served.socket, &tls, &data).await;

    stop.store(true, Ordering::Relaxed);
    let n = tokio::time::timeout(Duration::from_secs(30), good)
        .await
        .expect("good client stalled")
        .expect("good client failed");
    assert!(n >= 10);
    served.shutdown().await;
}

/// With TLS optional (`allow`), what was negotiated in plain text does not
/// survive STARTTLS: an attacker could have injected it (nbdkit's
/// CVE-2021-3716).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_state_is_dropped_at_starttls() {
    let pki_dir = tempfile::Builder::new()
        .prefix("nbd-tls-reset-")
        .tempdir()
        .unwrap();
    let pki = testbed::nbd::certs::make_pki(pki_dir.path());
    let tls = ClientTls::from_dir(&pki.client, "localhost").unwrap();
    let config = ServerConfig {
        tls: Some(ServerTls::from_dir(&pki.server, TlsMode::Allow).unwrap()),
        ..ServerConfig::default()
    };
    let served = serve_with(vec![("vda", mem_export())], config);
    let mut r = Raw::connect(&served.socket).await;
    r.flags().await;
    r.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ACK);
    let mut t = r.starttls(&tls).await;
    let q = MetaContextRequest {
        export: "vda".into(),
        queries: vec!["base:allocation".into()],
    };
    t.option(OPT_SET_META_CONTEXT, &q.encode()).await;
    assert_eq!(
        t.option_reply().await.0.reply_type,
        REP_ERR_INVALID,
        "structured replies from before TLS still in force"
    );
    // GO without structured replies inside TLS: simple replies only.
    t.go_on(false, false).await;
    t.request(Command::Read, 0, 1, 0, 512).await;
    let (h, _) = t.reply().await;
    assert!(matches!(h, ReplyHeader::Simple(_)), "{h:?}");
    served.shutdown().await;
}
