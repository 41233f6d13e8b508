//! NBD over TLS (`NBD_OPT_STARTTLS`) against real peers: libnbd's nbdinfo
//! and nbdcopy, QEMU's NBD client (qemu-img with a `tls-creds-x509`
//! object), and our own client; and the refusals: no or a foreign client
//! certificate, plain text against `--tls require`.

use std::path::Path;
use std::sync::Arc;

use bulwark_nbd::FileExport;
use nbd_server::{Client, ClientError, ClientOptions, ClientTls, ServerConfig};
use testbed::nbd::certs::{make_pki, Pki};
use testbed::nbd::*;

fn pki_dir() -> (tempfile::TempDir, Pki) {
    let dir = tempfile::Builder::new()
        .prefix("nbd-tls-pki-")
        .tempdir()
        .unwrap();
    let pki = make_pki(dir.path());
    (dir, pki)
}

fn client_tls(dir: &Path, name: &str) -> ClientOptions {
    ClientOptions::new("vda")
        .meta_context("base:allocation")
        .tls(ClientTls::from_dir(dir, name).unwrap())
}

/// The refusal must come before any export data: at the TLS handshake, or
/// (TLS 1.3: the client finishes its side first) at the first read after it.
fn assert_tls_refused(res: Result<Client, ClientError>, what: &str) {
    match res {
        Err(ClientError::TlsHandshake(_)) | Err(ClientError::Io(_)) => {}
        Err(e) => panic!("{what}: unexpected error {e}"),
        Ok(_) => panic!("{what}: connected"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_over_tls_and_refusals() {
    let (_pki_dir, pki) = pki_dir();
    let export = mem_export();
    let data = export.data().to_vec();
    let (_, holes) = test_image();
    let unix = serve_with(vec![("vda", Arc::clone(&export))], tls_config(&pki.server));
    let tcp = serve_tcp_with(vec![("vda", export)], tls_config(&pki.server));
    let addr = tcp.tcp.unwrap();

    // Verified both ways: every byte and the allocation map arrive intact.
    for mut c in [
        Client::connect_unix(&unix.socket, &client_tls(&pki.client, "localhost"))
            .await
            .unwrap(),
        Client::connect_tcp(addr, &client_tls(&pki.client, "127.0.0.1"))
            .await
            .unwrap(),
    ] {
        assert_eq!(c.size(), data.len() as u64);
        let got = c.read(0, data.len()).await.unwrap();
        assert!(got == data, "data over TLS differs");
        let map = c
            .block_status(0, data.len() as u64, "base:allocation")
            .await
            .unwrap();
        let holes_seen: Vec<(u64, u64, bool)> = map
            .iter()
            .map(|e| (e.offset, e.length, e.flags & 1 != 0))
            .collect();
        assert_eq!(holes_seen, expected_map(data.len() as u64, &holes));
        c.disconnect().await.unwrap();
    }

    // Plain text against a server requiring TLS: NBD_REP_ERR_TLS_REQD.
    let plain = Client::connect_unix(&unix.socket, &ClientOptions::new("vda")).await;
    assert!(
        matches!(plain, Err(ClientError::TlsRequired)),
        "plain client: {:?}",
        plain.err()
    );
    // No client certificate, or one from another CA.
    assert_tls_refused(
        Client::connect_unix(&unix.socket, &client_tls(&pki.anonymous, "localhost")).await,
        "client without certificate",
    );
    assert_tls_refused(
        Client::connect_unix(&unix.socket, &client_tls(&pki.rogue, "localhost")).await,
        "client with a foreign certificate",
    );
    // The server's certificate is not for this name: our client refuses.
    let wrong_name = Client::connect_tcp(addr, &client_tls(&pki.client, "nbd.example")).await;
    assert!(
        matches!(wrong_name, Err(ClientError::TlsHandshake(_))),
        "wrong server name: {:?}",
        wrong_name.err()
    );
    // A client trusting another CA refuses our server.
    let distrust = Client::connect_unix(&unix.socket, &client_tls(&pki.foreign, "localhost")).await;
    assert!(
        matches!(distrust, Err(ClientError::TlsHandshake(_))),
        "client trusting another CA: {:?}",
        distrust.err()
    );

    // STARTTLS against a server without TLS is refused, never ignored.
    let no_tls = serve(vec![("vda", mem_export())]);
    let res = Client::connect_unix(&no_tls.socket, &client_tls(&pki.client, "localhost")).await;
    assert!(
        matches!(res, Err(ClientError::TlsRefused { .. })),
        "STARTTLS to a plain server: {:?}",
        res.err()
    );

    // Without a CA in the server's directory, any TLS client may connect.
    let open = serve_with(vec![("vda", mem_export())], tls_config(&pki.server_open));
    let mut c = Client::connect_unix(&open.socket, &client_tls(&pki.anonymous, "localhost"))
        .await
        .unwrap();
    assert!(c.read(0, 4096).await.unwrap()[..] == data[..4096]);
    c.disconnect().await.unwrap();

    for s in [unix, tcp, no_tls, open] {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_reads_over_tls() {
    let (pki_dir, pki) = pki_dir();
    let (src, data, _) = source_image(pki_dir.path());
    let file = Arc::new(FileExport::open(&src).unwrap());
    let unix = serve_with(vec![("vda", Arc::clone(&file))], tls_config(&pki.server));
    let tcp = serve_tcp_with(vec![("vda", file)], tls_config(&pki.server));

    for served in [&unix, &tcp] {
        // The export list is only given inside TLS.
        let list = stdout(&run("nbdinfo", &["--list", &served.tls_uri("", &pki.client)]).await);
        assert!(list.contains("export=\"vda\""), "{list}");
        assert!(
            list.contains(&format!("export-size: {}", data.len())),
            "{list}"
        );
        let copy = pki_dir.path().join("copy.raw");
        run(
            "nbdcopy",
            &[&served.tls_uri("vda", &pki.client), copy.to_str().unwrap()],
        )
        .await;
        assert!(
            std::fs::read(&copy).unwrap() == data,
            "nbdcopy over TLS differs"
        );
        std::fs::remove_file(&copy).unwrap();
    }

    // Refused before any export is listed: no client certificate, a
    // certificate from another CA, and plain text.
    for (what, dir) in [("anonymous", &pki.anonymous), ("rogue", &pki.rogue)] {
        let out = run_failing("nbdinfo", &["--list", &unix.tls_uri("", dir)]).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("vda"), "{what} client saw exports: {text}");
    }
    // (libnbd reports NBD_REP_ERR_TLS_REQD to LIST as "not supported"; the
    // reply itself is checked byte for byte in robustness.rs.)
    let out = run_failing("nbdinfo", &["--list", &unix.uri("")]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("vda"), "plain client saw exports: {text}");

    unix.shutdown().await;
    tcp.shutdown().await;
}

/// QEMU's NBD client (the one live restore uses) reads the export through
/// a `tls-creds-x509` object, checked against the source byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reads_over_tls() {
    let (pki_dir, pki) = pki_dir();
    let (src, data, _) = source_image(pki_dir.path());
    let tcp = serve_tcp_with(
        vec![("vda", Arc::new(FileExport::open(&src).unwrap()))],
        tls_config(&pki.server),
    );
    let addr = tcp.tcp.unwrap();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.client.display()
    );
    let nbd = format!(
        "driver=nbd,server.type=inet,server.host={},server.port={},export=vda,tls-creds=tls0",
        addr.ip(),
        addr.port()
    );
    let local = format!(
        "driver=raw,file.driver=file,file.filename={}",
        src.display()
    );
    let cmp = run(
        "qemu-img",
        &["compare", "--object", &object, "--image-opts", &local, &nbd],
    )
    .await;
    assert!(stdout(&cmp).contains("identical"), "{}", stdout(&cmp));

    // qemu-img convert out of the TLS export: bit-identical file.
    let copy = pki_dir.path().join("qemu-copy.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &nbd,
            "-O",
            "raw",
            copy.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "qemu-img convert differs"
    );

    // Without a client certificate QEMU is turned away.
    let anon = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.anonymous.display()
    );
    run_failing(
        "qemu-img",
        &["info", "--object", &anon, "--image-opts", &nbd],
    )
    .await;
    tcp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_allow_serves_both() {
    let (_pki_dir, pki) = pki_dir();
    let config = ServerConfig {
        tls: Some(
            nbd_server::ServerTls::from_dir(&pki.server, nbd_server::TlsMode::Allow).unwrap(),
        ),
        ..ServerConfig::default()
    };
    let served = serve_with(vec![("vda", mem_export())], config);
    for opts in [
        ClientOptions::new("vda"),
        client_tls(&pki.client, "localhost"),
    ] {
        let mut c = Client::connect_unix(&served.socket, &opts).await.unwrap();
        c.read(0, 4096).await.unwrap();
        c.disconnect().await.unwrap();
    }
    served.shutdown().await;
}

/// Broken credential directories fail with errors naming the file.
#[test]
fn credential_errors_name_the_file() {
    use nbd_server::{ServerTls, TlsError, TlsMode};
    let (dir, pki) = pki_dir();
    let e = ServerTls::from_dir(dir.path(), TlsMode::Require).unwrap_err();
    assert!(e.to_string().contains("server-cert.pem"), "{e}");
    let e = ClientTls::from_dir(&pki.server_open, "localhost").unwrap_err();
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    // A certificate without its key.
    let half = dir.path().join("half");
    std::fs::create_dir(&half).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem"] {
        std::fs::copy(pki.client.join(f), half.join(f)).unwrap();
    }
    let e = ClientTls::from_dir(&half, "localhost").unwrap_err();
    assert!(matches!(e, TlsError::Incomplete { .. }), "{e}");
    // A key where the certificate should be.
    let swapped = dir.path().join("swapped");
    std::fs::create_dir(&swapped).unwrap();
    std::fs::copy(
        pki.server.join("server-key.pem"),
        swapped.join("server-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        pki.server.join("server-key.pem"),
        swapped.join("server-key.pem"),
    )
    .unwrap();
    let e = ServerTls::from_dir(&swapped, TlsMode::Require).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate(_)), "{e}");
    assert!(ClientTls::from_dir(&pki.client, "not a name!").is_err());
}

/// QEMU boots the tiny test image from a TLS export, a `tls-creds-x509`
/// object with a client certificate on its command line: a local qcow2
/// overlay whose backing is the export over `nbds` takes the guest's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_boots_from_a_tls_export() {
    use testbed::{DiskFormat, Image, QemuVm, VmOptions};
    let image = Image::tiny().expect("build the tiny test image");
    let (pki_dir, pki) = pki_dir();
    let tcp = serve_tcp_with(
        vec![(
            "vda",
            Arc::new(FileExport::open(image.disk(DiskFormat::Raw)).unwrap()),
        )],
        tls_config(&pki.server),
    );
    let addr = tcp.tcp.unwrap();
    let mut vm = QemuVm::new(&image, VmOptions::default()).unwrap();
    let overlay = vm.disk_path().to_path_buf();
    std::fs::remove_file(&overlay).unwrap();
    let backing = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"{}","port":"{}"}},"export":"vda","tls-creds":"tls0"}}}}"#,
        addr.ip(),
        addr.port()
    );
    let o = std::process::Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", &backing,
        ])
        .arg(&overlay)
        .arg(image.disk_size().to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.client.display()
    );
    vm.add_args(&["-object", &object]);
    let ready = tokio::task::spawn_blocking(move || {
        vm.start().unwrap();
        let r = vm.wait_ready(std::time::Duration::from_secs(120));
        drop(vm);
        r
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(ready.marker, image.marker());
    drop(pki_dir);
    tcp.shutdown().await;
}
