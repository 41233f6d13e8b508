//! The tokio NBD server: accepts connections on a Unix socket or TCP
//! listener and serves a fixed set of named read-only exports.
//!
//! Each connection negotiates (`negotiate`) and then runs its request loop
//! (`conn`): requests are spawned as tasks (bounded per connection) and
//! their replies are serialized through one `writer::ReplyWriter`. A bad
//! peer only ever loses its own connection.
//!
//! With [`ServerConfig::tls`] set, clients upgrade with `NBD_OPT_STARTTLS`
//! and haggle the rest inside TLS; [`TlsMode::Require`] (the default to
//! pick for anything beyond one host) refuses everything else first.

mod conn;
mod negotiate;
mod writer;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::export::Export;
use crate::proto::ProtoError;
use crate::stream::Stream;
use crate::tls::ServerTls;
#[cfg(doc)]
use crate::tls::TlsMode;

/// Tunables; the defaults suit a host serving a handful of clients.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections beyond this are closed right after accept.
    pub max_connections: usize,
    /// Requests served concurrently per connection; further requests wait
    /// in the socket (back-pressure on the client).
    pub max_in_flight: usize,
    /// A client must reach the transmission phase within this time (the
    /// TLS handshake included).
    pub handshake_timeout: Duration,
    /// TLS credentials and policy; `None` serves plain text only and
    /// answers `NBD_OPT_STARTTLS` with `NBD_REP_ERR_POLICY`.
    pub tls: Option<ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

struct NamedExport<E> {
    export: Arc<E>,
    description: Option<String>,
}

/// Exports and configuration shared by all connections.
pub(crate) struct Shared<E> {
    exports: BTreeMap<String, NamedExport<E>>,
    config: ServerConfig,
}

impl<E: Export> Shared<E> {
    /// Resolve a client-supplied name. The empty name means "default": an
    /// export literally named "", else the only export if there is one.
    fn resolve(&self, name: &str) -> Option<(&str, &NamedExport<E>)> {
        if let Some((k, v)) = self.exports.get_key_value(name) {
            return Some((k.as_str(), v));
        }
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.iter().next().map(|(k, v)| (k.as_str(), v));
        }
        None
    }
}

/// Why a connection ended abnormally (logged, never propagated to others).
#[derive(Debug, Error)]
pub(crate) enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Refused(String),
    #[error("handshake timed out")]
    Timeout,
    /// The TLS handshake failed: wrong or missing client certificate, a
    /// client that distrusts ours, or bytes that are not TLS.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// A set of named read-only exports, ready to be served.
pub struct Server<E: Export> {
    exports: BTreeMap<String, NamedExport<E>>,
    config: ServerConfig,
}

impl<E: Export> Server<E> {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            exports: BTreeMap::new(),
            config,
        }
    }

    /// Add (or replace) export `name`. The description shows up in
    /// `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub fn add_export(
        mut self,
        name: impl Into<String>,
        export: Arc<E>,
        description: Option<String>,
    ) -> Self {
        self.exports.insert(
            name.into(),
            NamedExport {
                export,
                description,
            },
        );
        self
    }

    fn into_shared(self) -> Arc<Shared<E>> {
        Arc::new(Shared {
            exports: self.exports,
            config: self.config,
        })
    }

    /// Bind a Unix socket at `path` and serve. A stale socket left by an
    /// earlier run is replaced; any other file there is an error (never
    /// delete what might be someone's disk image).
    pub fn bind_unix(self, path: impl AsRef<Path>) -> io::Result<ServerHandle> {
        use std::os::unix::fs::FileTypeExt;
        let path = path.as_ref();
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        info!(socket = %path.display(), "NBD server listening");
        Ok(self.serve_unix(listener))
    }

    pub fn serve_unix(self, listener: UnixListener) -> ServerHandle {
        spawn_accept_loop(self.into_shared(), listener)
    }

    /// Serve on a TCP listener. Bind it to loopback unless the exports are
    /// meant for the network: NBD has no authentication without TLS (see
    /// [`ServerConfig::tls`]).
    pub fn serve_tcp(self, listener: TcpListener) -> ServerHandle {
        spawn_accept_loop(self.into_shared(), listener)
    }
}

/// Stops a running server. Dropping the handle without calling
/// [`ServerHandle::shutdown`] stops the server too (without waiting).
pub struct ServerHandle {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stop accepting, let in-flight requests finish, close every connection,
    /// and wait until all of that is done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.task.await {
            warn!("NBD accept loop ended abnormally: {e}");
        }
    }
}

/// Resolves once shutdown was requested (or the handle is gone). Returns
/// `()` so no watch guard lives across an await in `select!`.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// A listener yielding connections; lets one accept loop serve both
/// socket kinds without boxing the streams.
trait Acceptor: Send + Sync + 'static {
    type S: Stream;
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::S>> + Send;
}

impl Acceptor for UnixListener {
    type S = UnixStream;
    async fn accept_stream(&self) -> io::Result<UnixStream> {
        Ok(self.accept().await?.0)
    }
}

impl Acceptor for TcpListener {
    type S = TcpStream;
    async fn accept_stream(&self) -> io::Result<TcpStream> {
        let (s, _) = self.accept().await?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

fn spawn_accept_loop<E: Export, L: Acceptor>(shared: Arc<Shared<E>>, listener: L) -> ServerHandle {
    let (tx, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(shared.config.max_connections));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped(&mut rx) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                res = listener.accept_stream() => match res {
                    Ok(stream) => {
                        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                            warn!("connection limit reached, dropping new connection");
                            continue;
                        };
                        let id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
                        let shared = Arc::clone(&shared);
                        let stop = rx.clone();
                        conns.spawn(async move {
                            debug!(conn = id, "accepted");
                            match conn::serve(shared, stream, stop).await {
                                Ok(()) => debug!(conn = id, "closed"),
                                Err(e) => info!(conn = id, "connection dropped: {e}"),
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        while conns.join_next().await.is_some() {}
    });
    ServerHandle { shutdown: tx, task }
}
