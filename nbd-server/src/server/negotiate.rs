//! Server side of fixed-newstyle option haggling, up to the transmission
//! phase (or a client abort), with the `NBD_OPT_STARTTLS` upgrade in the
//! middle when TLS is configured.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::{ConnError, NamedExport, Shared};
use crate::export::Export;
use crate::proto::consts::*;
use crate::proto::handshake::*;
use crate::stream::Stream;
use crate::tls::TlsMode;

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
    // A TLS stream may hold the record back until flushed; sockets don't care.
    w.flush().await?;
    Ok(())
}

/// How negotiation ended: the stream to run the transmission phase on
/// (plain, or upgraded by `NBD_OPT_STARTTLS`) with its session, or a
/// polite client abort.
pub(crate) enum Negotiated<E, S> {
    Plain(S, Session<E>),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Session<E>),
    Aborted,
}

/// Option state that lives across a TLS upgrade.
struct Haggle {
    no_zeroes: bool,
    tls_active: bool,
    structured: bool,
    /// (canonical export name, base:allocation selected) from the last
    /// SET_META_CONTEXT; only valid if GO names the same export.
    meta: Option<(String, bool)>,
}

/// How one round of option haggling ended.
enum Step<E> {
    Go(Session<E>),
    Abort,
    /// STARTTLS was acknowledged: the next bytes are a TLS handshake.
    StartTls,
}

/// Run the handshake on `s`, upgrading to TLS if the client asks and the
/// server offers it. On a protocol error the stream is shut down before the
/// error is returned, so the peer sees EOF rather than a hang.
pub(crate) async fn negotiate<E, S>(
    shared: &Shared<E>,
    mut s: S,
) -> Result<Negotiated<E, S>, ConnError>
where
    E: Export,
    S: Stream,
{
    let mut st = match greet(&mut s).await {
        Ok(no_zeroes) => Haggle {
            no_zeroes,
            tls_active: false,
            structured: false,
            meta: None,
        },
        Err(e) => return Err(hang_up(&mut s, e).await),
    };
    let tls = match haggle(shared, &mut s, &mut st).await {
        Ok(Step::Go(session)) => return Ok(Negotiated::Plain(s, session)),
        Ok(Step::Abort) => return Ok(Negotiated::Aborted),
        Ok(Step::StartTls) => match &shared.config.tls {
            Some(tls) => tls,
            // haggle only acknowledges STARTTLS when TLS is configured.
            None => return Err(ConnError::Refused("STARTTLS without TLS configured".into())),
        },
        Err(e) => return Err(hang_up(&mut s, e).await),
    };
    // The stream is read unbuffered up to here, so bytes a client (or a
    // man in the middle) pipelined after STARTTLS reach the TLS handshake,
    // never the option parser: plain-text injection fails the handshake.
    let mut t = tls.acceptor().accept(s).await.map_err(ConnError::Tls)?;
    // Nothing negotiated in plain text survives the upgrade (nbdkit's
    // CVE-2021-3716: an injected STRUCTURED_REPLY before STARTTLS).
    st.tls_active = true;
    st.structured = false;
    st.meta = None;
    match haggle(shared, &mut t, &mut st).await {
        Ok(Step::Go(session)) => Ok(Negotiated::Tls(Box::new(t), session)),
        Ok(Step::Abort) => {
            let _ = t.shutdown().await;
            Ok(Negotiated::Aborted)
        }
        Ok(Step::StartTls) => {
            let e = ConnError::Refused("STARTTLS inside TLS".into());
            Err(hang_up(&mut t, e).await)
        }
        Err(e) => Err(hang_up(&mut t, e).await),
    }
}

async fn hang_up<W: AsyncWrite + Unpin>(w: &mut W, e: ConnError) -> ConnError {
    let _ = w.shutdown().await;
    e
}

/// Greeting out, client flags in. Returns whether NO_ZEROES was agreed.
async fn greet<S: Stream>(s: &mut S) -> Result<bool, ConnError> {
    s.write_all(
        &Greeting {
            handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .encode(),
    )
    .await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(ConnError::Refused(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & CLIENT_FLAG_NO_ZEROES != 0)
}

/// Option haggling until GO/EXPORT_NAME, ABORT, or an acknowledged STARTTLS.
async fn haggle<E, S>(shared: &Shared<E>, s: &mut S, st: &mut Haggle) -> Result<Step<E>, ConnError>
where
    E: Export,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls = shared.config.tls.as_ref();
    let tls_required = !st.tls_active && tls.is_some_and(|t| t.mode() == TlsMode::Require);
    loop {
        let mut hdr = [0u8; OptionHeader::LEN];
        s.read_exact(&mut hdr).await?;
        let hdr = OptionHeader::parse(&hdr)?;
        if hdr.length > MAX_OPTION_LEN {
            return Err(ConnError::Refused(format!(
                "option {} with {} bytes of data",
                hdr.option, hdr.length
            )));
        }
        let mut data = vec![0u8; hdr.length as usize];
        s.read_exact(&mut data).await?;
        let opt = hdr.option;
        if tls_required {
            match opt {
                OPT_STARTTLS | OPT_ABORT => {}
                OPT_EXPORT_NAME => {
                    // Cannot be refused politely: hang up (as qemu-nbd does).
                    return Err(ConnError::Refused("EXPORT_NAME before STARTTLS".into()));
                }
                _ => {
                    debug!(option = opt, "refused before TLS");
                    let msg = b"TLS is required: send NBD_OPT_STARTTLS first";
                    reply(s, opt, REP_ERR_TLS_REQD, msg).await?;
                    continue;
                }
            }
        }
        let req = match OptionRequest::parse(opt, &data) {
            Ok(req) => req,
            Err(e) if opt == OPT_EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                debug!(option = opt, "invalid option data: {e}");
                reply(s, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
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
                    transmission_flags(st.structured),
                    st.no_zeroes,
                );
                s.write_all(&reply).await?;
                s.flush().await?;
                return Ok(Step::Go(session(canon, exp, st)));
            }
            OptionRequest::Abort => {
                // The client may already be gone; that is fine.
                let _ = reply(s, opt, REP_ACK, &[]).await;
                return Ok(Step::Abort);
            }
            OptionRequest::List => {
                for (name, exp) in &shared.exports {
                    let details = exp.description.as_deref().unwrap_or("");
                    reply(s, opt, REP_SERVER, &encode_rep_server(name, details)).await?;
                }
                reply(s, opt, REP_ACK, &[]).await?;
            }
            OptionRequest::StartTls => {
                if tls.is_none() {
                    reply(s, opt, REP_ERR_POLICY, b"TLS is not offered by this server").await?;
                } else if st.tls_active {
                    reply(s, opt, REP_ERR_INVALID, b"TLS is already active").await?;
                } else {
                    reply(s, opt, REP_ACK, &[]).await?;
                    return Ok(Step::StartTls);
                }
            }
            OptionRequest::Info(req) | OptionRequest::Go(req) => {
                let Some((canon, exp)) = shared.resolve(&req.name) else {
                    let msg = format!("no export named {:?}", req.name);
                    reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                send_info(s, opt, canon, exp, &req.info, st.structured).await?;
                reply(s, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Step::Go(session(canon, exp, st)));
                }
            }
            OptionRequest::StructuredReply => {
                st.structured = true;
                reply(s, opt, REP_ACK, &[]).await?;
            }
            OptionRequest::ListMetaContext(req) | OptionRequest::SetMetaContext(req) => {
                let set = opt == OPT_SET_META_CONTEXT;
                if !st.structured {
                    reply(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((canon, _)) = shared.resolve(&req.export) else {
                    let msg = format!("no export named {:?}", req.export);
                    reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
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
                    reply(s, opt, REP_META_CONTEXT, &ctx.encode()).await?;
                }
                if set {
                    st.meta = Some((canon.to_owned(), base));
                }
                reply(s, opt, REP_ACK, &[]).await?;
            }
            OptionRequest::Unsupported(o) => {
                let msg = format!("option {o} is not supported");
                reply(s, o, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

fn session<E: Export>(canon: &str, exp: &NamedExport<E>, st: &Haggle) -> Session<E> {
    let base = matches!(&st.meta, Some((n, true)) if n == canon);
    Session {
        export: Arc::clone(&exp.export),
        name: canon.to_owned(),
        structured: st.structured,
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
