//! One connection: handshake, then the request loop of the transmission
//! phase. Requests run as tasks; the loop only parses headers, so a slow
//! read never blocks the next request from starting.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use super::negotiate::{negotiate, Negotiated, Session};
use super::writer::ReplyWriter;
use super::{ConnError, Shared};
use crate::export::{Export, Extent, ExtentState};
use crate::proto::consts::*;
use crate::proto::transmission::*;
use crate::stream::Stream;
use crate::MAX_REQUEST_LEN;

/// Block status replies stop after this many descriptors; the client asks
/// again for the rest (the spec allows short answers).
const MAX_DESCRIPTORS: usize = 4096;

pub(crate) async fn serve<E, S>(
    shared: Arc<Shared<E>>,
    stream: S,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    E: Export,
    S: Stream,
{
    let timeout = shared.config.handshake_timeout;
    let negotiated = tokio::select! {
        _ = super::stopped(&mut stop) => return Ok(()),
        res = tokio::time::timeout(timeout, negotiate(&shared, stream)) => match res {
            Err(_) => return Err(ConnError::Timeout),
            Ok(res) => res?,
        }
    };
    match negotiated {
        Negotiated::Aborted => Ok(()),
        Negotiated::Plain(s, session) => start_transmission(shared, session, s, stop).await,
        Negotiated::Tls(t, session) => start_transmission(shared, session, *t, stop).await,
    }
}

async fn start_transmission<E: Export, S: Stream>(
    shared: Arc<Shared<E>>,
    session: Session<E>,
    s: S,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    debug!(export = %session.name, structured = session.structured, "transmission phase");
    let (r, w) = s.into_halves();
    transmission(shared, session, r, w, stop).await
}

/// Per-connection state shared by request tasks.
struct Ctx<E, W> {
    export: Arc<E>,
    size: u64,
    structured: bool,
    base_allocation: Option<u32>,
    writer: ReplyWriter<W>,
}

async fn transmission<E, R, W>(
    shared: Arc<Shared<E>>,
    session: Session<E>,
    mut r: R,
    w: W,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    E: Export,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(Ctx {
        size: session.export.size(),
        export: session.export,
        structured: session.structured,
        base_allocation: session.base_allocation,
        writer: ReplyWriter::new(w),
    });
    let max_in_flight = shared.config.max_in_flight.max(1);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let result = loop {
        if ctx.writer.is_broken() {
            break Ok(());
        }
        let mut hdr = [0u8; Request::LEN];
        let read = tokio::select! {
            biased;
            _ = super::stopped(&mut stop) => break Ok(()),
            res = r.read_exact(&mut hdr) => res,
        };
        match read {
            Ok(_) => {}
            // Hanging up without NBD_CMD_DISC is rude but common.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match Request::parse(&hdr) {
            Ok(req) => req,
            // Lost framing: nothing after this can be trusted.
            Err(e) => break Err(e.into()),
        };
        match req.command {
            Command::Disc => break Ok(()),
            Command::Write => {
                // The payload must be consumed to stay in sync; a payload we
                // refuse to buffer means we cannot, so hang up.
                if req.length > MAX_REQUEST_LEN {
                    break Err(ConnError::Refused(format!(
                        "WRITE of {} bytes exceeds the request limit",
                        req.length
                    )));
                }
                if let Err(e) = discard(&mut r, req.length.into()).await {
                    break Err(e.into());
                }
                ctx.reply_error(&req, EPERM, "export is read-only").await;
            }
            _ => {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    break Ok(());
                };
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    ctx.handle(req).await;
                    drop(permit);
                });
            }
        }
    };
    // Let in-flight requests finish before closing (required for DISC,
    // polite for shutdown).
    let _ = slots.acquire_many(max_in_flight as u32).await;
    ctx.writer.close().await;
    if let Err(e) = &result {
        warn!("closing connection: {e}");
    }
    result
}

async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// A request failure to report to the client.
struct Failure {
    errno: u32,
    message: String,
}

fn fail(errno: u32, message: impl Into<String>) -> Failure {
    Failure {
        errno,
        message: message.into(),
    }
}

impl<E: Export, W: AsyncWrite + Unpin + Send> Ctx<E, W> {
    async fn handle(&self, req: Request) {
        let res = match req.command {
            Command::Read => self.read(&req).await,
            Command::BlockStatus => self.block_status(&req).await,
            Command::Cache => self.cache(&req),
            Command::Flush => self.check_flags(&req, CMD_FLAG_FUA),
            Command::Trim | Command::WriteZeroes => Err(fail(EPERM, "export is read-only")),
            Command::Write | Command::Disc | Command::Unknown(_) => Err(fail(
                EINVAL,
                format!("unsupported command {:?}", req.command),
            )),
        };
        match res {
            // READ and BLOCK_STATUS send their own success replies.
            Ok(()) if matches!(req.command, Command::Read | Command::BlockStatus) => {}
            Ok(()) => self.reply_ok(req.cookie).await,
            Err(f) => self.reply_error(&req, f.errno, &f.message).await,
        }
    }

    async fn reply_ok(&self, cookie: u64) {
        self.writer
            .send(&[&SimpleReply { error: 0, cookie }.encode()])
            .await;
    }

    /// Errors go as a structured ERROR chunk (with message) when structured
    /// replies were negotiated, else as a simple reply without payload.
    async fn reply_error(&self, req: &Request, errno: u32, message: &str) {
        debug!(cookie = req.cookie, command = ?req.command, errno, message, "request failed");
        if self.structured {
            self.writer
                .send(&[&error_chunk(req.cookie, errno, message)])
                .await;
        } else {
            self.writer
                .send(&[&SimpleReply {
                    error: errno,
                    cookie: req.cookie,
                }
                .encode()])
                .await;
        }
    }

    /// FUA is accepted everywhere (clients set it needlessly; nothing here
    /// writes); any other flag must be one `allowed` for the command.
    fn check_flags(&self, req: &Request, allowed: u16) -> Result<(), Failure> {
        if req.flags & !(allowed | CMD_FLAG_FUA) != 0 {
            return Err(fail(EINVAL, format!("invalid flags {:#x}", req.flags)));
        }
        Ok(())
    }

    fn check_range(&self, req: &Request) -> Result<(), Failure> {
        match req.offset.checked_add(req.length.into()) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(fail(
                EINVAL,
                format!(
                    "range {}+{} exceeds export size {}",
                    req.offset, req.length, self.size
                ),
            )),
        }
    }

    fn cache(&self, req: &Request) -> Result<(), Failure> {
        self.check_flags(req, 0)?;
        self.check_range(req)?;
        self.export.prefetch(req.offset, req.length.into());
        Ok(())
    }

    async fn read(&self, req: &Request) -> Result<(), Failure> {
        let allowed = if self.structured { CMD_FLAG_DF } else { 0 };
        self.check_flags(req, allowed)?;
        if req.length > MAX_REQUEST_LEN {
            return Err(fail(
                EINVAL,
                format!("read of {} bytes exceeds {MAX_REQUEST_LEN}", req.length),
            ));
        }
        self.check_range(req)?;
        if req.length == 0 {
            if self.structured {
                self.writer.send(&[&none_chunk(req.cookie)]).await;
            } else {
                self.reply_ok(req.cookie).await;
            }
            return Ok(());
        }
        if !self.structured {
            let data = self.read_exact(req.offset, req.length).await?;
            let hdr = SimpleReply {
                error: 0,
                cookie: req.cookie,
            }
            .encode();
            self.writer.send(&[&hdr, &data]).await;
            return Ok(());
        }
        if req.flags & CMD_FLAG_DF != 0 {
            // One content chunk: holes travel as explicit zeroes.
            let data = self.read_exact(req.offset, req.length).await?;
            let prefix = offset_data_prefix(req.cookie, REPLY_FLAG_DONE, req.offset, req.length);
            self.writer.send(&[&prefix, &data]).await;
            return Ok(());
        }
        let extents = self
            .extents(req.offset, req.length.into(), |s| s.reads_as_zero())
            .await;
        let count = extents.len();
        for (i, e) in extents.into_iter().enumerate() {
            // Data is in hand before its chunk is sent, so no error can follow
            // a chunk: the last content chunk may carry DONE.
            let flags = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
            // Extents are clipped to the request, so lengths fit in u32.
            let len = e.length as u32;
            let sent = if e.state.reads_as_zero() {
                let chunk = offset_hole_chunk(req.cookie, flags, e.offset, len);
                self.writer.send(&[&chunk]).await
            } else {
                let data = self.read_exact(e.offset, len).await?;
                let prefix = offset_data_prefix(req.cookie, flags, e.offset, len);
                self.writer.send(&[&prefix, &data]).await
            };
            if !sent {
                // Connection is gone: don't read data nobody will receive.
                break;
            }
        }
        Ok(())
    }

    async fn read_exact(&self, offset: u64, len: u32) -> Result<bytes::Bytes, Failure> {
        match self.export.read(offset, len).await {
            Ok(d) if d.len() == len as usize => Ok(d),
            Ok(d) => Err(fail(
                EIO,
                format!("export returned {} bytes for a {len}-byte read", d.len()),
            )),
            Err(e) => {
                // The operator's (and live restore's) record of what failed.
                warn!("read {offset}+{len} failed: {e}");
                Err(fail(e.nbd_errno(), e.to_string()))
            }
        }
    }

    /// The export's extents over `[offset, offset+len)`, clipped, with gaps
    /// filled as data and neighbours merged when `key` says they're alike.
    /// An export that fails to answer is treated as all data.
    async fn extents<K: Eq>(
        &self,
        offset: u64,
        len: u64,
        key: impl Fn(ExtentState) -> K,
    ) -> Vec<Extent> {
        let raw = match self.export.extents(offset, len).await {
            Ok(v) => v,
            Err(e) => {
                debug!("extents({offset}, {len}) failed, reporting data: {e}");
                Vec::new()
            }
        };
        normalize(raw, offset, offset + len, key)
    }

    async fn block_status(&self, req: &Request) -> Result<(), Failure> {
        self.check_flags(req, CMD_FLAG_REQ_ONE)?;
        let Some(ctx_id) = self.base_allocation.filter(|_| self.structured) else {
            return Err(fail(EINVAL, "no metadata context negotiated"));
        };
        if req.length == 0 {
            return Err(fail(EINVAL, "zero-length block status"));
        }
        self.check_range(req)?;
        let extents = self
            .extents(req.offset, req.length.into(), |s| s.allocation_flags())
            .await;
        let take = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_DESCRIPTORS
        };
        let descriptors: Vec<BlockDescriptor> = extents
            .iter()
            .take(take)
            .map(|e| BlockDescriptor {
                length: e.length as u32,
                flags: e.state.allocation_flags(),
            })
            .collect();
        let chunk = block_status_chunk(req.cookie, REPLY_FLAG_DONE, ctx_id, &descriptors);
        self.writer.send(&[&chunk]).await;
        Ok(())
    }
}

/// Clip `raw` to `[start, end)`, fill gaps with `Data`, merge neighbours
/// with equal `key`. The result tiles the range exactly, in order.
pub(crate) fn normalize<K: Eq>(
    mut raw: Vec<Extent>,
    start: u64,
    end: u64,
    key: impl Fn(ExtentState) -> K,
) -> Vec<Extent> {
    raw.sort_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(raw.len() + 1);
    let push = |out: &mut Vec<Extent>, offset: u64, e: u64, state: ExtentState| {
        if e <= offset {
            return;
        }
        if let Some(last) = out.last_mut() {
            if key(last.state) == key(state) && last.offset + last.length == offset {
                last.length += e - offset;
                return;
            }
        }
        out.push(Extent {
            offset,
            length: e - offset,
            state,
        });
    };
    let mut pos = start;
    for x in raw {
        let x_end = x.offset.saturating_add(x.length).min(end);
        if x_end <= pos {
            continue;
        }
        if x.offset > pos {
            let gap_end = x.offset.min(end);
            push(&mut out, pos, gap_end, ExtentState::Data);
            pos = gap_end;
        }
        if pos >= end {
            break;
        }
        push(&mut out, pos, x_end, x.state);
        pos = x_end;
    }
    push(&mut out, pos, end, ExtentState::Data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, state: ExtentState) -> Extent {
        Extent {
            offset,
            length,
            state,
        }
    }

    #[test]
    fn normalize_clips_fills_and_merges() {
        use ExtentState::*;
        let raw = vec![
            ext(0, 100, Data),
            ext(150, 50, Hole),
            ext(200, 50, Zero),
            ext(250, 1000, Data),
        ];
        let out = normalize(raw.clone(), 50, 300, |s| s.reads_as_zero());
        assert_eq!(
            out,
            vec![ext(50, 100, Data), ext(150, 100, Hole), ext(250, 50, Data)]
        );
        let out = normalize(raw, 50, 300, |s| s.allocation_flags());
        assert_eq!(out.len(), 4);
        assert_eq!(normalize(vec![], 10, 20, |s| s), vec![ext(10, 10, Data)]);
        // Overlapping garbage from a buggy export still tiles the range.
        let out = normalize(
            vec![
                ext(0, 30, Hole),
                ext(10, 5, Data),
                ext(u64::MAX - 1, 9, Data),
            ],
            0,
            40,
            |s| s,
        );
        assert_eq!(out, vec![ext(0, 30, Hole), ext(30, 10, Data)]);
    }
}
