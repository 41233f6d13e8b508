//! A small NBD client: fixed-newstyle handshake with structured replies and
//! metadata contexts, then reads and block status queries.
//!
//! It exists to pull data out of QEMU's backup exports (`qemu-nbd -B`,
//! libvirt pull-mode backup) using `qemu:dirty-bitmap:*` and
//! `base:allocation`. Requests are issued one at a time; callers wanting
//! parallelism open several connections (read-only exports allow it).
//!
//! With [`ClientOptions::tls`] the client sends `NBD_OPT_STARTTLS` as its
//! first option and haggles everything else inside TLS; a server that
//! refuses TLS is an error, never a silent fall back to plain text (the
//! spec's advice against downgrade attacks).

use std::collections::HashMap;
use std::io;
use std::path::Path;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tracing::debug;

use crate::proto::consts::*;
use crate::proto::handshake::*;
use crate::proto::transmission::*;
use crate::proto::ProtoError;
use crate::stream::Stream;
use crate::tls::ClientTls;
use crate::MAX_REQUEST_LEN;

/// Why a client operation failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message from server: {0}")]
    Proto(#[from] ProtoError),
    #[error("server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("option {option} refused ({reply_type:#x}): {message}")]
    OptionRefused {
        option: u32,
        reply_type: u32,
        message: String,
    },
    #[error("server failed the request with NBD error {errno}: {message}")]
    Request { errno: u32, message: String },
    #[error("metadata context {0:?} was not negotiated")]
    UnknownContext(String),
    #[error("range {offset}+{length} is outside the export ({size} bytes)")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("protocol violation by server: {0}")]
    Violation(String),
    #[error("the server requires TLS (NBD_REP_ERR_TLS_REQD): configure TLS credentials")]
    TlsRequired,
    #[error("the server refused STARTTLS ({reply_type:#x}): {message}")]
    TlsRefused { reply_type: u32, message: String },
    /// Certificate not trusted or not for this server name, our client
    /// certificate refused, or the peer does not speak TLS.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
}

/// What to negotiate.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub export: String,
    /// Metadata contexts to select, e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:backup-vda`. Unknown ones are simply not granted.
    pub meta_contexts: Vec<String>,
    /// Ask for structured replies (needed for block status and holes).
    pub structured_replies: bool,
    /// Upgrade with `NBD_OPT_STARTTLS` before anything else; `None` speaks
    /// plain text.
    pub tls: Option<ClientTls>,
}

impl ClientOptions {
    pub fn new(export: impl Into<String>) -> Self {
        Self {
            export: export.into(),
            meta_contexts: Vec::new(),
            structured_replies: true,
            tls: None,
        }
    }

    /// Speak TLS only: STARTTLS first, refusal is an error.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn meta_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }
}

/// One extent of a block status answer, in absolute export offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusExtent {
    pub offset: u64,
    pub length: u64,
    /// Context-defined flags: for `base:allocation` `STATE_HOLE`/`STATE_ZERO`,
    /// for `qemu:dirty-bitmap:*` bit 0 means dirty.
    pub flags: u32,
}

type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Option replies larger than this are a broken or hostile server.
const MAX_OPTION_REPLY: u32 = 1 << 20;

/// A connected client in the transmission phase.
pub struct Client {
    r: Reader,
    w: Writer,
    size: u64,
    transmission_flags: u16,
    structured: bool,
    contexts: Vec<(u32, String)>,
    max_request: u32,
    next_cookie: u64,
}

impl Client {
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        Self::start(UnixStream::connect(path).await?, opts).await
    }

    pub async fn connect_tcp(
        addr: impl ToSocketAddrs,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Self::start(s, opts).await
    }

    /// Greeting and flags, then STARTTLS if asked, on the whole stream;
    /// the rest of the handshake on its halves.
    async fn start<S: Stream>(mut s: S, opts: &ClientOptions) -> Result<Self, ClientError> {
        let no_zeroes = greet(&mut s).await?;
        match &opts.tls {
            None => {
                let (r, w) = s.into_halves();
                Self::handshake(Box::new(r), Box::new(w), no_zeroes, opts).await
            }
            Some(tls) => {
                starttls(&mut s).await?;
                let t = tls
                    .connector()
                    .connect(tls.server_name().clone(), s)
                    .await
                    .map_err(ClientError::TlsHandshake)?;
                let (r, w) = t.into_halves();
                Self::handshake(Box::new(r), Box::new(w), no_zeroes, opts).await
            }
        }
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Contexts the server granted, with their ids.
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    async fn handshake(
        r: Box<dyn AsyncRead + Unpin + Send>,
        w: Writer,
        no_zeroes: bool,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let mut c = Self {
            r: BufReader::new(r),
            w,
            size: 0,
            transmission_flags: 0,
            structured: false,
            contexts: Vec::new(),
            max_request: MAX_REQUEST_LEN,
            next_cookie: 1,
        };
        if opts.structured_replies {
            c.send_option(&OptionRequest::StructuredReply).await?;
            let (hdr, _) = c.option_reply(OPT_STRUCTURED_REPLY).await?;
            c.structured = hdr.reply_type == REP_ACK;
        }
        if c.structured && !opts.meta_contexts.is_empty() {
            c.set_meta_contexts(opts).await?;
        }
        c.go(opts, no_zeroes).await?;
        debug!(size = c.size, flags = c.transmission_flags, contexts = ?c.contexts, "connected");
        Ok(c)
    }

    async fn send_option(&mut self, opt: &OptionRequest) -> Result<(), ClientError> {
        send_option(&mut self.w, opt).await
    }

    /// Read one option reply to `option`; error replies become `Err`.
    async fn option_reply(
        &mut self,
        option: u32,
    ) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
        let (hdr, data) = read_option_reply(&mut self.r, option).await?;
        if hdr.reply_type == REP_ERR_TLS_REQD {
            return Err(ClientError::TlsRequired);
        }
        if hdr.is_error() && option != OPT_STRUCTURED_REPLY {
            return Err(ClientError::OptionRefused {
                option,
                reply_type: hdr.reply_type,
                message: String::from_utf8_lossy(&data).into_owned(),
            });
        }
        Ok((hdr, data))
    }

    async fn set_meta_contexts(&mut self, opts: &ClientOptions) -> Result<(), ClientError> {
        let req = OptionRequest::SetMetaContext(MetaContextRequest {
            export: opts.export.clone(),
            queries: opts.meta_contexts.clone(),
        });
        self.send_option(&req).await?;
        loop {
            let (hdr, data) = self.option_reply(OPT_SET_META_CONTEXT).await?;
            match hdr.reply_type {
                REP_META_CONTEXT => {
                    let m = MetaContextReply::parse(&data)?;
                    self.contexts.push((m.id, m.name));
                }
                REP_ACK => return Ok(()),
                other => {
                    return Err(ClientError::Violation(format!(
                        "reply type {other} to SET_META_CONTEXT"
                    )))
                }
            }
        }
    }

    async fn go(&mut self, opts: &ClientOptions, no_zeroes: bool) -> Result<(), ClientError> {
        let req = OptionRequest::Go(ExportRequest {
            name: opts.export.clone(),
            info: vec![INFO_BLOCK_SIZE],
        });
        self.send_option(&req).await?;
        let mut got_export = false;
        loop {
            let (hdr, data) = match self.option_reply(OPT_GO).await {
                Err(ClientError::OptionRefused { reply_type, .. })
                    if reply_type == REP_ERR_UNSUP =>
                {
                    return self.export_name(opts, no_zeroes).await;
                }
                other => other?,
            };
            match hdr.reply_type {
                REP_INFO => match InfoReply::parse(&data)? {
                    InfoReply::Export {
                        size,
                        transmission_flags,
                    } => {
                        self.size = size;
                        self.transmission_flags = transmission_flags;
                        got_export = true;
                    }
                    InfoReply::BlockSize { max, .. } if max > 0 => {
                        self.max_request = max.min(MAX_REQUEST_LEN);
                    }
                    _ => {}
                },
                REP_ACK if got_export => return Ok(()),
                REP_ACK => {
                    return Err(ClientError::Violation(
                        "GO acknowledged without export info".into(),
                    ))
                }
                other => {
                    return Err(ClientError::Violation(format!("reply type {other} to GO")));
                }
            }
        }
    }

    /// Pre-GO servers: the old way in, which cannot report errors.
    async fn export_name(
        &mut self,
        opts: &ClientOptions,
        no_zeroes: bool,
    ) -> Result<(), ClientError> {
        self.send_option(&OptionRequest::ExportName(opts.export.clone()))
            .await?;
        let mut buf = [0u8; 10];
        self.r.read_exact(&mut buf).await?;
        let (size, flags) = parse_export_name_reply(&buf)?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.r.read_exact(&mut zeroes).await?;
        }
        self.size = size;
        self.transmission_flags = flags;
        Ok(())
    }

    async fn send_request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<u64, ClientError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.w.write_all(&req.encode()).await?;
        self.w.flush().await?;
        Ok(cookie)
    }

    async fn reply_header(&mut self, cookie: u64) -> Result<ReplyHeader, ClientError> {
        let mut buf = [0u8; ChunkHeader::LEN];
        self.r.read_exact(&mut buf[..4]).await?;
        let len = ReplyHeader::len_for_magic([buf[0], buf[1], buf[2], buf[3]])?;
        self.r.read_exact(&mut buf[4..len]).await?;
        let hdr = ReplyHeader::parse(&buf[..len])?;
        if hdr.cookie() != cookie {
            return Err(ClientError::Violation(format!(
                "reply for cookie {} while waiting for {cookie}",
                hdr.cookie()
            )));
        }
        if let ReplyHeader::Structured(c) = hdr {
            if !self.structured {
                return Err(ClientError::Violation(
                    "structured reply not negotiated".into(),
                ));
            }
            if c.length > MAX_REQUEST_LEN + 64 {
                return Err(ClientError::Violation(format!(
                    "chunk of {} bytes",
                    c.length
                )));
            }
        }
        Ok(hdr)
    }

    async fn payload(&mut self, len: u32) -> Result<Vec<u8>, ClientError> {
        let mut p = vec![0u8; len as usize];
        self.r.read_exact(&mut p).await?;
        Ok(p)
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<u64, ClientError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(ClientError::OutOfRange {
                offset,
                length,
                size: self.size,
            }),
        }
    }

    /// Read `len` bytes at `offset` (split into requests the server accepts).
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        self.check_range(offset, len as u64)?;
        let mut out = vec![0u8; len];
        let step = self.max_request as usize;
        for (i, piece) in out.chunks_mut(step).enumerate() {
            self.read_one(offset + (i * step) as u64, piece).await?;
        }
        Ok(out)
    }

    async fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len = buf.len() as u32;
        let cookie = self.send_request(Command::Read, 0, offset, len).await?;
        let mut covered: u64 = 0;
        let mut failure: Option<ClientError> = None;
        loop {
            let chunk = match self.reply_header(cookie).await? {
                ReplyHeader::Simple(s) if s.error != 0 => {
                    return Err(ClientError::Request {
                        errno: s.error,
                        message: String::new(),
                    })
                }
                ReplyHeader::Simple(_) => {
                    self.r.read_exact(buf).await?;
                    return Ok(());
                }
                ReplyHeader::Structured(c) => c,
            };
            let payload = self.payload(chunk.length).await?;
            let within = |o: u64, l: u64| -> Result<usize, ClientError> {
                match (o.checked_sub(offset), o.checked_add(l)) {
                    (Some(start), Some(end)) if end <= offset + u64::from(len) => {
                        Ok(start as usize)
                    }
                    _ => Err(ClientError::Violation(format!(
                        "chunk {o}+{l} outside request {offset}+{len}"
                    ))),
                }
            };
            match Chunk::parse(chunk.reply_type, &payload)? {
                Chunk::OffsetData { offset: o, data } => {
                    let at = within(o, data.len() as u64)?;
                    buf[at..at + data.len()].copy_from_slice(data);
                    covered += data.len() as u64;
                }
                Chunk::OffsetHole { offset: o, length } => {
                    let at = within(o, length.into())?;
                    buf[at..at + length as usize].fill(0);
                    covered += u64::from(length);
                }
                Chunk::None => {}
                Chunk::Error { error, message }
                | Chunk::ErrorOffset { error, message, .. }
                | Chunk::UnknownError { error, message, .. } => {
                    failure.get_or_insert(ClientError::Request {
                        errno: error,
                        message,
                    });
                }
                other => {
                    return Err(ClientError::Violation(format!(
                        "unexpected chunk {other:?} in READ reply"
                    )))
                }
            }
            if chunk.is_done() {
                break;
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
        if covered != u64::from(len) {
            return Err(ClientError::Violation(format!(
                "READ reply covered {covered} of {len} bytes"
            )));
        }
        Ok(())
    }

    /// One BLOCK_STATUS round trip: descriptors per context id, as sent.
    pub async fn block_status_once(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<HashMap<u32, Vec<BlockDescriptor>>, ClientError> {
        if self.contexts.is_empty() {
            return Err(ClientError::UnknownContext(String::new()));
        }
        self.check_range(offset, length.into())?;
        let cookie = self
            .send_request(Command::BlockStatus, 0, offset, length)
            .await?;
        let mut out = HashMap::new();
        let mut failure = None;
        loop {
            let chunk = match self.reply_header(cookie).await? {
                ReplyHeader::Simple(s) => {
                    return Err(if s.error != 0 {
                        ClientError::Request {
                            errno: s.error,
                            message: String::new(),
                        }
                    } else {
                        ClientError::Violation("simple success reply to BLOCK_STATUS".into())
                    })
                }
                ReplyHeader::Structured(c) => c,
            };
            let payload = self.payload(chunk.length).await?;
            match Chunk::parse(chunk.reply_type, &payload)? {
                Chunk::BlockStatus {
                    context_id,
                    descriptors,
                } => {
                    out.insert(context_id, descriptors);
                }
                Chunk::None => {}
                Chunk::Error { error, message }
                | Chunk::ErrorOffset { error, message, .. }
                | Chunk::UnknownError { error, message, .. } => {
                    failure.get_or_insert(ClientError::Request {
                        errno: error,
                        message,
                    });
                }
                other => {
                    return Err(ClientError::Violation(format!(
                        "unexpected chunk {other:?} in BLOCK_STATUS reply"
                    )))
                }
            }
            if chunk.is_done() {
                break;
            }
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(out),
        }
    }

    /// Extents of `context` over `[offset, offset+len)`, asking again where
    /// the server answered only part of the range; neighbours with equal
    /// flags are merged.
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        context: &str,
    ) -> Result<Vec<BlockStatusExtent>, ClientError> {
        let id = self
            .context_id(context)
            .ok_or_else(|| ClientError::UnknownContext(context.to_owned()))?;
        let end = self.check_range(offset, len)?;
        let mut out: Vec<BlockStatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            // Lengths are u32 on the wire; 2 GiB keeps requests aligned.
            let ask = (end - pos).min(1 << 31) as u32;
            let mut map = self.block_status_once(pos, ask).await?;
            let descs = map.remove(&id).ok_or_else(|| {
                ClientError::Violation(format!("no extents for context {context}"))
            })?;
            let start = pos;
            for d in descs {
                if d.length == 0 {
                    return Err(ClientError::Violation("zero-length extent".into()));
                }
                let l = u64::from(d.length).min(end - pos);
                match out.last_mut() {
                    Some(last) if last.flags == d.flags && last.offset + last.length == pos => {
                        last.length += l;
                    }
                    _ => out.push(BlockStatusExtent {
                        offset: pos,
                        length: l,
                        flags: d.flags,
                    }),
                }
                pos += l;
                if pos >= end {
                    break;
                }
            }
            if pos == start {
                return Err(ClientError::Violation(
                    "block status made no progress".into(),
                ));
            }
        }
        Ok(out)
    }

    /// Polite goodbye (`NBD_CMD_DISC`), then close.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.send_request(Command::Disc, 0, 0, 0).await?;
        // The server may close first, as DISC allows: then our half-close
        // (over TLS, a close_notify) finds the pipe gone, and that is fine.
        let _ = self.w.shutdown().await;
        Ok(())
    }
}

/// Read the greeting and answer with our flags. Returns whether both sides
/// agreed to drop the 124 zero bytes after EXPORT_NAME.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, ClientError> {
    let mut g = [0u8; Greeting::LEN];
    s.read_exact(&mut g).await?;
    let g = Greeting::parse(&g)?;
    if g.handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let no_zeroes = g.handshake_flags & FLAG_NO_ZEROES != 0;
    let mut cflags = CLIENT_FLAG_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= CLIENT_FLAG_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;
    s.flush().await?;
    Ok(no_zeroes)
}

/// `NBD_OPT_STARTTLS` and its answer. Read unbuffered: whatever follows the
/// ACK on the wire belongs to the TLS session.
async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
    send_option(s, &OptionRequest::StartTls).await?;
    let (hdr, data) = read_option_reply(s, OPT_STARTTLS).await?;
    match hdr.reply_type {
        REP_ACK => Ok(()),
        reply_type => Err(ClientError::TlsRefused {
            reply_type,
            message: String::from_utf8_lossy(&data).into_owned(),
        }),
    }
}

async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: &OptionRequest,
) -> Result<(), ClientError> {
    w.write_all(&opt.to_bytes()).await?;
    w.flush().await?;
    Ok(())
}

/// One option reply (header and bounded payload) to `option`, error or not.
async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut h = [0u8; OptionReplyHeader::LEN];
    r.read_exact(&mut h).await?;
    let hdr = OptionReplyHeader::parse(&h)?;
    if hdr.option != option {
        return Err(ClientError::Violation(format!(
            "reply to option {} while waiting for {option}",
            hdr.option
        )));
    }
    if hdr.length > MAX_OPTION_REPLY {
        return Err(ClientError::Violation(format!(
            "option reply of {} bytes",
            hdr.length
        )));
    }
    let mut data = vec![0u8; hdr.length as usize];
    r.read_exact(&mut data).await?;
    Ok((hdr, data))
}
