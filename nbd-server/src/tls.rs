//! TLS for NBD (`NBD_OPT_STARTTLS`): x509 credentials for the server and
//! the client half, loaded from a directory laid out the way QEMU's
//! `tls-creds-x509` object and libnbd's `tls-certificates=DIR` expect it,
//! so one directory of certificates serves every tool:
//!
//! | file | server | client |
//! | --- | --- | --- |
//! | `ca-cert.pem` | if present: client certificates are required and verified against it | required: verifies the server |
//! | `server-cert.pem`, `server-key.pem` | required | - |
//! | `client-cert.pem`, `client-key.pem` | - | if present: presented to the server |
//!
//! rustls with the ring provider does the TLS (the store's S3 client links
//! the same, so the build carries one TLS stack). The provider is named
//! explicitly rather than taken from the process default: a default that
//! depends on which crypto features happen to be unified into the build
//! could panic at run time.
//!
//! PSK (`qemu-nbd --tls-creds` with a `tls-creds-psk` object) is not offered:
//! rustls has no external pre-shared-key support (rustls issue #174), and
//! carrying OpenSSL or GnuTLS bindings for it would add a second, C TLS
//! stack. See `nbd-server/README.md`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use thiserror::Error;

// The types this module's constructors take, so callers need no rustls
// dependency of their own.
pub use rustls::RootCertStore;
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// File names, as QEMU's `tls-creds-x509` (and libnbd) use them.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Why TLS credentials could not be set up. Each message carries its cause
/// (and `source()` stays empty), so the cause is printed once, also in
/// `anyhow`'s `{:#}` chains.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{}: {error}", path.display())]
    Pem {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: {what} but no {missing} beside it", dir.display())]
    Incomplete {
        dir: PathBuf,
        what: &'static str,
        missing: &'static str,
    },
    #[error("{}: CA certificate rejected: {error}", path.display())]
    BadCa { path: PathBuf, error: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid DNS name or IP address for certificate checks")]
    ServerName(String),
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        Self::Config(e)
    }
}

impl From<rustls::server::VerifierBuilderError> for TlsError {
    fn from(e: rustls::server::VerifierBuilderError) -> Self {
        Self::Verifier(e)
    }
}

/// What a server with TLS does with clients that don't start it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// The spec's FORCEDTLS, as `qemu-nbd --tls-creds` does: every option
    /// but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` gets
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up; `NBD_OPT_EXPORT_NAME`, which
    /// cannot be refused, closes the connection.
    Require,
    /// The spec's SELECTIVETLS with no TLS-only export: TLS for clients that
    /// ask, plain text for the rest. Only for trusted networks.
    Allow,
}

/// Server-side TLS: certificate, key, optional client verification, mode.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    mode: TlsMode,
    verifies_clients: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3, and 1.2 because the NBD spec makes it the one every
/// implementation MUST support.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |error| TlsError::Pem {
        path: path.to_owned(),
        error,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| TlsError::Pem {
        path: path.to_owned(),
        error,
    })
}

fn roots(certs: Vec<CertificateDer<'static>>, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|error| TlsError::BadCa {
            path: path.to_owned(),
            error,
        })?;
    }
    Ok(roots)
}

impl ServerTls {
    /// Load `server-cert.pem` and `server-key.pem` from `dir`; with a
    /// `ca-cert.pem` there too, clients must present a certificate signed by
    /// that CA (QEMU's `verify-peer=on`, its default for servers).
    pub fn from_dir(dir: impl AsRef<Path>, mode: TlsMode) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        let certs = load_certs(&dir.join(SERVER_CERT))?;
        let key = load_key(&dir.join(SERVER_KEY))?;
        let ca_path = dir.join(CA_CERT);
        let client_ca = if ca_path.exists() {
            Some(roots(load_certs(&ca_path)?, &ca_path)?)
        } else {
            None
        };
        Self::new(certs, key, client_ca, mode)
    }

    /// From certificates in memory. `client_ca`: require client certificates
    /// signed by one of these roots; `None` accepts any client (the TLS
    /// session then only encrypts and authenticates the server).
    pub fn new(
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        client_ca: Option<RootCertStore>,
        mode: TlsMode,
    ) -> Result<Self, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?;
        let verifies_clients = client_ca.is_some();
        let builder = match client_ca {
            Some(roots) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?,
            ),
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(cert_chain, key)?;
        Ok(Self {
            config: Arc::new(config),
            mode,
            verifies_clients,
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether clients must present a certificate signed by the CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}

/// Client-side TLS: the CA that signed the server's certificate, the name
/// the certificate must carry, and optionally a client certificate.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Load `ca-cert.pem` (required) and, if present, `client-cert.pem`
    /// with `client-key.pem` from `dir`. `server_name` is the DNS name or IP
    /// address the server's certificate must be issued for (for a Unix
    /// socket, whatever name the certificate carries, e.g. `localhost`).
    pub fn from_dir(dir: impl AsRef<Path>, server_name: &str) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        let ca_path = dir.join(CA_CERT);
        let ca = roots(load_certs(&ca_path)?, &ca_path)?;
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let identity = match (cert.exists(), key.exists()) {
            (true, true) => Some((load_certs(&cert)?, load_key(&key)?)),
            (false, false) => None,
            (true, false) => {
                return Err(TlsError::Incomplete {
                    dir: dir.to_owned(),
                    what: CLIENT_CERT,
                    missing: CLIENT_KEY,
                })
            }
            (false, true) => {
                return Err(TlsError::Incomplete {
                    dir: dir.to_owned(),
                    what: CLIENT_KEY,
                    missing: CLIENT_CERT,
                })
            }
        };
        Self::new(ca, identity, server_name)
    }

    /// From certificates in memory; `identity` is the client's certificate
    /// chain and key, for servers that verify clients.
    pub fn new(
        ca: RootCertStore,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?
            .with_root_certificates(ca);
        let config = match identity {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The same credentials, checking the server's certificate for
    /// `server_name` instead.
    pub fn with_server_name(mut self, server_name: &str) -> Result<Self, TlsError> {
        self.server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        Ok(self)
    }

    /// The rustls configuration, for callers driving a TLS session
    /// themselves (tests of hostile peers do).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }

    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
    }
}
