//! Listening and routing: plain HTTP on loopback, HTTPS (rustls with ring)
//! with a certificate anywhere; beyond loopback without one only with
//! `--insecure`, as `bulwark-nbd` refuses plain NBD. Every answer carries
//! a strict Content-Security-Policy (no inline script, nothing from
//! elsewhere) and is never cached, but for the embedded assets.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::{api, files, pages, Web};

/// Every route: the pages, the assets, the JSON API.
pub fn router(web: Arc<Web>) -> Router {
    let api = Router::new()
        .route("/", get(api::index))
        .route("/login", post(api::login))
        .route("/logout", post(api::logout))
        .route("/status", get(api::status))
        .route("/hosts", get(api::hosts))
        .route("/snapshots", get(api::snapshots))
        .route("/backup", post(api::backup))
        .route("/protect", post(api::protect))
        .route("/unprotect", post(api::unprotect))
        .route("/restore", post(api::restore))
        .route("/tasks", get(api::tasks))
        .route("/tasks/{id}", get(api::task))
        .route("/tasks/{id}/cancel", post(api::cancel_task))
        .route("/live", get(api::live))
        .route("/live/{name}/cancel", post(api::cancel_live))
        .route("/prune/simulate", post(api::simulate))
        .route("/prune", post(api::prune))
        .route("/repositories", get(api::repositories))
        .route("/repositories/{name}/verify", post(api::verify))
        .route("/repositories/{name}/gc", post(api::gc))
        .route("/files", get(files::api_list))
        .route("/files/download", get(files::download))
        .fallback(api::not_found);
    Router::new()
        .route("/", get(pages::overview::page))
        .route("/login", get(pages::login))
        .route("/vm/{name}", get(pages::vm::page))
        .route("/restore", get(pages::restore::page))
        .route("/live", get(pages::live::page))
        .route("/prune", get(pages::prune::page))
        .route("/tasks", get(pages::tasks::list))
        .route("/tasks/{id}", get(pages::tasks::one))
        .route("/repositories", get(pages::repos::page))
        .route("/files", get(pages::files::page))
        .route("/assets/{file}", get(pages::asset))
        .nest("/api/v1", api)
        .layer(axum::middleware::from_fn(headers))
        .with_state(web)
}

/// Security headers on every answer; no caching but of assets.
async fn headers(req: Request, next: Next) -> Response {
    let asset = req.uri().path().starts_with("/assets/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Addresses of `listen` that are not loopback.
fn exposed(listen: &str) -> Result<Vec<SocketAddr>> {
    Ok(listen
        .to_socket_addrs()
        .with_context(|| format!("listen {listen:?}: expected ADDR:PORT"))?
        .filter(|a| !a.ip().is_loopback())
        .collect())
}

/// Refuses plain HTTP beyond loopback unless the operator insists.
pub fn check_exposure(listen: &str, tls: bool, insecure: bool) -> Result<()> {
    let exposed = exposed(listen)?;
    if exposed.is_empty() || tls || insecure {
        return Ok(());
    }
    bail!(
        "refusing to serve the dashboard over plain HTTP on {} (not loopback): passwords and \
         session cookies would cross the network in clear. Set tls_cert and tls_key in [web], \
         listen on 127.0.0.1 (and reach it through an SSH tunnel or a proxy), or add \
         --insecure if the network is trusted",
        exposed
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The server's TLS from a PEM certificate chain and key.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cert.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in the file", cert.display());
    }
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not go together")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts connections until the process ends, each served on a task of
/// its own (a TLS handshake first when `tls` is set).
pub async fn serve(listener: TcpListener, app: Router, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("web: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app
            .clone()
            .map_request(move |mut r: hyper::Request<hyper::body::Incoming>| {
                r.extensions_mut().insert(ConnectInfo(peer));
                r.map(axum::body::Body::new)
            });
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let r = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), service).await,
                    Err(e) => {
                        tracing::debug!("web: TLS handshake with {peer}: {e}");
                        return;
                    }
                },
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = r {
                tracing::debug!("web: connection from {peer}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_beyond_loopback_needs_tls_or_insecure() {
        check_exposure("127.0.0.1:8440", false, false).unwrap();
        check_exposure("[::1]:8440", false, false).unwrap();
        let e = check_exposure("0.0.0.0:8440", false, false).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        check_exposure("0.0.0.0:8440", true, false).unwrap();
        check_exposure("0.0.0.0:8440", false, true).unwrap();
        assert!(check_exposure("nonsense", true, false).is_err());
    }
}
