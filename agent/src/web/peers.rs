//! Other hosts' dashboards, shown beside this one: their `/api/v1/status`
//! read over HTTPS with a bearer token (`bulwark web token add` on that
//! host), every [`EVERY`], in the background, so a slow or dead host never
//! slows a page. Plain `http://` is refused but on loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::Peer;

/// How often each peer is asked.
pub const EVERY: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(8);
/// Largest status document taken from a peer.
const MAX_BODY: usize = 16 << 20;

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The last answer of one peer.
#[derive(Clone, Debug)]
pub struct Seen {
    pub name: String,
    pub url: String,
    /// Its status document, or why there is none.
    pub status: Result<Value, String>,
    /// Unix seconds of the answer.
    pub at: i64,
}

struct One {
    peer: Peer,
    uri: hyper::Uri,
    client: Client<Https, Empty<Bytes>>,
}

pub struct Peers {
    list: Vec<One>,
    seen: Mutex<Vec<Seen>>,
}

impl Peers {
    pub fn new(peers: &[Peer]) -> Result<Peers> {
        let list = peers
            .iter()
            .map(|p| one(p).with_context(|| format!("[[web.peers]] {}", p.name)))
            .collect::<Result<Vec<_>>>()?;
        let seen = peers
            .iter()
            .map(|p| Seen {
                name: p.name.clone(),
                url: p.url.clone(),
                status: Err("not asked yet".into()),
                at: 0,
            })
            .collect();
        Ok(Peers {
            list,
            seen: Mutex::new(seen),
        })
    }

    /// The last answer of every peer, in config order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks every peer once, all at once.
    pub async fn poll(&self) {
        let handles: Vec<_> = self.list.iter().map(|o| tokio::spawn(ask(o))).collect();
        let mut answers = Vec::with_capacity(handles.len());
        for h in handles {
            answers.push(
                h.await
                    .unwrap_or_else(|e| Err(format!("the poll failed: {e}"))),
            );
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (s, a) in seen.iter_mut().zip(answers) {
            if let Err(e) = &a {
                tracing::debug!("peer {}: {e}", s.name);
            }
            s.status = a;
            s.at = chrono::Utc::now().timestamp();
        }
    }
}

fn ask(o: &One) -> impl std::future::Future<Output = Result<Value, String>> + Send + 'static {
    let req = hyper::Request::get(o.uri.clone())
        .header("authorization", format!("Bearer {}", o.peer.token))
        .body(Empty::<Bytes>::new());
    let client = o.client.clone();
    async move {
        let req = req.map_err(|e| e.to_string())?;
        let work = async {
            let resp = client.request(req).await.map_err(|e| format!("{e:#}"))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
            }
            serde_json::from_slice(&body).map_err(|e| format!("not a status document: {e}"))
        };
        tokio::time::timeout(TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", TIMEOUT.as_secs())))
    }
}

fn one(p: &Peer) -> Result<One> {
    let base: hyper::Uri = p.url.parse().with_context(|| format!("url {:?}", p.url))?;
    let host = base.host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match base.scheme_str() {
        Some("https") => {}
        Some("http") if loopback => {}
        _ => bail!("url {:?}: another host is read over https:// only", p.url),
    }
    let uri: hyper::Uri = format!("{}/api/v1/status", p.url.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("url {:?}", p.url))?;
    let tls = client_tls(p.ca_file.as_deref())?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(One {
        peer: p.clone(),
        uri,
        client: Client::builder(TokioExecutor::new()).build(connector),
    })
}

/// rustls with ring, trusting `ca_file` or else the system's roots.
fn client_tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            for c in rustls_pki_types::CertificateDer::pem_file_iter(f)
                .with_context(|| format!("reading {}", f.display()))?
            {
                roots
                    .add(c.with_context(|| format!("reading {}", f.display()))?)
                    .with_context(|| format!("{}: certificate rejected", f.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                // A system root rustls cannot use is skipped, as browsers do.
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Polls every peer every [`EVERY`] for as long as the runtime runs.
pub fn keep_polling(web: Arc<super::Web>) {
    if web.peers.list.is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            web.peers.poll().await;
            tokio::time::sleep(EVERY).await;
        }
    });
}
