//! Test PKI made in code (rcgen), written in QEMU's `tls-creds-x509` layout
//! so our server, our client, libnbd and QEMU all read the same files.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Credential directories, all under one temp dir.
pub struct Pki {
    /// server-cert.pem, server-key.pem, ca-cert.pem: verifies clients.
    pub server: PathBuf,
    /// server-cert.pem and server-key.pem only: any client may connect.
    pub server_open: PathBuf,
    /// ca-cert.pem, client-cert.pem, client-key.pem (signed by the CA).
    pub client: PathBuf,
    /// ca-cert.pem only: trusts the server, has no certificate to show.
    pub anonymous: PathBuf,
    /// The right ca-cert.pem, but a client certificate from another CA.
    pub rogue: PathBuf,
    /// Trusts only the other CA (so not our server), with its certificate.
    pub foreign: PathBuf,
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(p, key))
}

/// A leaf certificate and its key, PEM. Key usages as GnuTLS's certtool
/// sets them for TLS peers (QEMU checks them when loading credentials).
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
    sans: &[&str],
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(sans).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for (name, pem) in files {
        fs::write(dir.join(name), pem).unwrap();
    }
    dir.to_owned()
}

/// Generate everything under `root`. The server certificate names
/// `localhost` and `127.0.0.1`, as clients check it for either.
pub fn make_pki(root: &Path) -> Pki {
    let (ca_pem, ca) = new_ca("bulwark test CA");
    let (rogue_ca_pem, rogue_ca) = new_ca("rogue CA");
    let (server_cert, server_key) = leaf(
        &ca,
        "bulwark-nbd test server",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        &ca,
        "bulwark test client",
        &["client.test"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (rogue_cert, rogue_key) = leaf(
        &rogue_ca,
        "rogue client",
        &["rogue.test"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    Pki {
        server: write(
            &root.join("server"),
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &server_cert),
                ("server-key.pem", &server_key),
            ],
        ),
        server_open: write(
            &root.join("server-open"),
            &[
                ("server-cert.pem", &server_cert),
                ("server-key.pem", &server_key),
            ],
        ),
        client: write(
            &root.join("client"),
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &client_cert),
                ("client-key.pem", &client_key),
            ],
        ),
        anonymous: write(&root.join("anonymous"), &[("ca-cert.pem", &ca_pem)]),
        rogue: write(
            &root.join("rogue"),
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &rogue_cert),
                ("client-key.pem", &rogue_key),
            ],
        ),
        foreign: write(
            &root.join("foreign"),
            &[
                ("ca-cert.pem", &rogue_ca_pem),
                ("client-cert.pem", &rogue_cert),
                ("client-key.pem", &rogue_key),
            ],
        ),
    }
}
