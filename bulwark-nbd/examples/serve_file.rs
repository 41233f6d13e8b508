//! Serve raw image files read-only over a Unix socket:
//! `serve_file SOCKET NAME=FILE...` (Ctrl-C stops). For manual testing with
//! nbdinfo, nbdcopy, qemu-img or nbdfuse.

use std::sync::Arc;

use bulwark_nbd::FileExport;
use nbd_server::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let socket = args.next().ok_or("usage: serve_file SOCKET NAME=FILE...")?;
    let mut server = Server::new(ServerConfig::default());
    for spec in args {
        let (name, path) = spec.split_once('=').ok_or("exports are NAME=FILE")?;
        let export = FileExport::open(path)?;
        server = server.add_export(name, Arc::new(export), Some(format!("raw file {path}")));
    }
    let handle = server.bind_unix(&socket)?;
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}
