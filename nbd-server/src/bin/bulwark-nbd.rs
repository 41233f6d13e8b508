//! `bulwark-nbd serve`: a snapshot, read-only, over NBD: one export per disk
//! (`vda`, `vdb`, ...) for `nbdfuse`, `qemu-nbd`, `qemu-img`, `guestfish`
//! or QEMU itself (live restore).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nbd_server::{Server, ServerConfig, StoreExport};
use store::{LocalBackend, Repository};

#[derive(Parser)]
#[command(
    name = "bulwark-nbd",
    version,
    about = "Serve Bulwark snapshots over NBD (read-only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve every disk of one snapshot until interrupted (SIGINT/SIGTERM).
    Serve {
        #[arg(long, env = "BULWARK_REPO")]
        repo: String,
        /// Snapshot id, unique id prefix, or SOURCE@latest.
        #[arg(long)]
        snapshot: String,
        /// Unix socket to listen on.
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// TCP address (loopback unless you mean it: NBD has no auth).
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Memory for decrypted chunks, in MiB (shared by the disks).
        #[arg(long, default_value_t = 512)]
        cache_mib: usize,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let Cmd::Serve {
        repo,
        snapshot,
        socket,
        listen,
        password_file,
        key_file,
        cache_mib,
    } = cli.command;
    let backend: Arc<dyn store::Backend> = if repo.starts_with("s3://") {
        // Endpoint: $BULWARK_S3_ENDPOINT, else the AWS variables/profile.
        let mut cfg = store::backend::S3Config::from_url(&repo)?;
        cfg.endpoint = std::env::var("BULWARK_S3_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty());
        Arc::new(store::backend::S3Backend::new(cfg)?)
    } else if repo.contains("://") {
        bail!("repository {repo:?}: use a directory or s3://BUCKET/PREFIX");
    } else {
        Arc::new(LocalBackend::new(&repo))
    };
    let secret = store::keys::secret_from_sources(key_file.as_deref(), password_file.as_deref())?
        .context(
        "no passphrase: set BULWARK_PASSWORD, or pass --password-file or --key-file",
    )?;
    let repo = Arc::new(
        Repository::open(backend, &secret).with_context(|| format!("opening repository {repo}"))?,
    );
    let snap = repo.find_snapshot(&snapshot)?;
    let cache = (cache_mib << 20) / snap.disks.len().max(1);
    let mut server = Server::new(ServerConfig::default());
    let mut readers = Vec::new();
    for d in &snap.disks {
        let reader = Arc::new(store::reader::open_disk(
            repo.clone(),
            &snap,
            &d.name,
            cache,
        )?);
        let desc = format!("{} {} of snapshot {}", snap.source, d.name, snap.id.short());
        server = server.add_export(
            &d.name,
            Arc::new(StoreExport::new(reader.clone())),
            Some(desc),
        );
        readers.push((d.name.clone(), reader));
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let handle = match (&socket, &listen) {
            (Some(path), _) => server
                .bind_unix(path)
                .with_context(|| format!("listening on {}", path.display()))?,
            (None, Some(addr)) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                server.serve_tcp(l)
            }
            (None, None) => bail!("pass --socket PATH or --listen ADDR:PORT"),
        };
        let names: Vec<_> = snap.disks.iter().map(|d| d.name.as_str()).collect();
        tracing::info!(
            "serving snapshot {} ({}) exports [{}] on {}",
            snap.id.short(),
            snap.source,
            names.join(", "),
            socket.as_ref().map_or_else(
                || listen.clone().unwrap_or_default(),
                |p| p.display().to_string()
            )
        );
        // Readiness for scripts: one line on stdout once the socket exists.
        println!("ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        handle.shutdown().await;
        // What the reads cost: bytes fetched per byte served should stay
        // near the stored/logical ratio (no byte fetched twice).
        for (name, r) in &readers {
            let st = r.stats();
            tracing::info!(
                "{name}: served {} B, fetched {} B in {} reads ({} read ahead), {} cache hits",
                st.bytes_served,
                st.bytes_fetched,
                st.fetches,
                st.readahead_fetches,
                st.cache_hits
            );
        }
        if let Some(p) = &socket {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    })
}
