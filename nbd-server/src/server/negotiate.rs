//! Server side of fixed-newstyle option haggling, up to the transmission
//! phase (or a client abort).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::{ConnError, NamedExport, Shared};
use crate::export::Export;
use crate::proto::consts::*;
use crate::proto::handshake::*;

/// Option data beyond this is a denial-of-service attempt: no valid option
/// comes close (strings are capped at 4 KiB).
const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Context id we hand out for `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled for the transmission phase.
pub(crate) struct Session<E> {
    pub(crate) export: Arc<E>,
    pub(crate) name: String,
    pub(crate) structured: bool,
    /// Id of `base:allocation` if it was selected for this export.
    pub(crate) base_allocation: Option<u32>,
}

/// Transmission flags for an export, given what was negotiated so far.
pub(crate) fn transmission_flags(structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_READ_ONLY
        | TFLAG_SEND_FLUSH
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    reply_type: u32,
    payload: &[u8],
) -> Result<(), ConnError> {
    w.write_all(&encode_option_reply(option, reply_type, payload))
        .await?;
    Ok(())
}

/// Run the handshake. `Ok(None)` means the client aborted politely.
pub(crate) async fn negotiate<E, R, W>(
    shared: &Shared<E>,
    r: &mut R,
    w: &mut W,
) -> Result<Option<Session<E>>, ConnError>
where
    E: Export,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(
        &Greeting {
            handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .encode(),
    )
    .await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(ConnError::Refused(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;

    let mut structured = false;
    // (canonical export name, base:allocation selected) from the last
    // SET_META_CONTEXT; only valid if GO names the same export.
    let mut meta: Option<(String, bool)> = None;

    loop {
        let mut hdr = [0u8; OptionHeader::LEN];
        r.read_exact(&mut hdr).await?;
        let hdr = OptionHeader::parse(&hdr)?;
        if hdr.length > MAX_OPTION_LEN {
            return Err(ConnError::Refused(format!(
                "option {} with {} bytes of data",
                hdr.option, hdr.length
            )));
        }
        let mut data = vec![0u8; hdr.length as usize];
        r.read_exact(&mut data).await?;
        let opt = hdr.option;
        let req = match OptionRequest::parse(opt, &data) {
            Ok(req) => req,
            Err(e) if opt == OPT_EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                debug!(option = opt, "invalid option data: {e}");
                reply(w, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                continue;
            }
        };
        debug!(?req, "option");
        match req {
            OptionRequest::ExportName(name) => {
                let Some((canon, exp)) = shared.resolve(&name) else {
                    // EXPORT_NAME cannot be refused politely.
                    return Err(ConnError::Refused(format!("no export named {name:?}")));
                };
                let reply = encode_export_name_reply(
                    exp.export.size(),
                    transmission_flags(structured),
                    no_zeroes,
                );
                w.write_all(&reply).await?;
                return Ok(Some(session(canon, exp, structured, &meta)));
            }
            OptionRequest::Abort => {
                // The client may already be gone; that is fine.
                let _ = reply(w, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OptionRequest::List => {
                for (name, exp) in &shared.exports {
                    let details = exp.description.as_deref().unwrap_or("");
                    reply(w, opt, REP_SERVER, &encode_rep_server(name, details)).await?;
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            OptionRequest::StartTls => {
                reply(w, opt, REP_ERR_POLICY, b"TLS is not offered by this server").await?;
            }
            OptionRequest::Info(req) | OptionRequest::Go(req) => {
                let Some((canon, exp)) = shared.resolve(&req.name) else {
                    let msg = format!("no export named {:?}", req.name);
                    reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                send_info(w, opt, canon, exp, &req.info, structured).await?;
                reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(session(canon, exp, structured, &meta)));
                }
            }
            OptionRequest::StructuredReply => {
                structured = true;
                reply(w, opt, REP_ACK, &[]).await?;
            }
            OptionRequest::ListMetaContext(req) | OptionRequest::SetMetaContext(req) => {
                let set = opt == OPT_SET_META_CONTEXT;
                if !structured {
                    reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((canon, _)) = shared.resolve(&req.export) else {
                    let msg = format!("no export named {:?}", req.export);
                    reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let base = if set {
                    req.queries.iter().any(|q| q == META_BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == META_BASE_ALLOCATION || q == "base:")
                };
                if base {
                    let ctx = MetaContextReply {
                        // LIST replies carry id 0 by the spec.
                        id: if set { BASE_ALLOCATION_ID } else { 0 },
                        name: META_BASE_ALLOCATION.into(),
                    };
                    reply(w, opt, REP_META_CONTEXT, &ctx.encode()).await?;
                }
                if set {
                    meta = Some((canon.to_owned(), base));
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            OptionRequest::Unsupported(o) => {
                let msg = format!("option {o} is not supported");
                reply(w, o, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

fn session<E: Export>(
    canon: &str,
    exp: &NamedExport<E>,
    structured: bool,
    meta: &Option<(String, bool)>,
) -> Session<E> {
    let base = matches!(meta, Some((n, true)) if n == canon);
    Session {
        export: Arc::clone(&exp.export),
        name: canon.to_owned(),
        structured,
        base_allocation: base.then_some(BASE_ALLOCATION_ID),
    }
}

async fn send_info<E: Export, W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    name: &str,
    exp: &NamedExport<E>,
    requested: &[u16],
    structured: bool,
) -> Result<(), ConnError> {
    let export_info = InfoReply::Export {
        size: exp.export.size(),
        transmission_flags: transmission_flags(structured),
    };
    reply(w, opt, REP_INFO, &export_info.encode()).await?;
    let mut sent = Vec::new();
    for &item in requested {
        if sent.contains(&item) {
            continue;
        }
        sent.push(item);
        let info = match item {
            INFO_NAME => InfoReply::Name(name.to_owned()),
            INFO_DESCRIPTION => match &exp.description {
                Some(d) => InfoReply::Description(d.clone()),
                None => continue,
            },
            INFO_BLOCK_SIZE => {
                let bs = exp.export.block_size();
                InfoReply::BlockSize {
                    min: bs.min,
                    preferred: bs.preferred,
                    max: bs.max,
                }
            }
            // INFO_EXPORT was sent already; unknown items are ignored.
            _ => continue,
        };
        reply(w, opt, REP_INFO, &info.encode()).await?;
    }
    Ok(())
}
