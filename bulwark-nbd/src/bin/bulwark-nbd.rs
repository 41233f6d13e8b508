//! `bulwark-nbd serve`: a snapshot, read-only, over NBD: one export per disk
//! (`vda`, `vdb`, ...) for `nbdfuse`, `qemu-nbd`, `qemu-img`, `guestfish`
//! or QEMU itself (live restore).
//!
//! TLS (`--tls-creds DIR`, QEMU's x509 file layout) encrypts and, with a CA
//! in the directory, authenticates clients by certificate. Plain NBD has no
//! authentication at all, so a TCP listener beyond loopback without
//! required TLS is refused unless the operator says `--insecure`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bulwark_nbd::backfill::{Backfill, Copies};
use bulwark_nbd::cli::ServePlan;
use bulwark_nbd::cli::{Cli, Cmd, TlsArg};
use bulwark_nbd::demand::{DemandStats, ServeStats};
use bulwark_nbd::local_copy::LocalCopy;
use bulwark_nbd::trace::{BootSet, BootSetFile, BootSetReport, ReadTrace};
use bulwark_nbd::StoreExport;
use bulwark_store::read::reader::DiskReader;
use bulwark_store::read::seed::Seeds;
use bulwark_store::repo::reports::BOOT_SET;
use clap::Parser;
use nbd_server::{Server, ServerConfig, ServerTls, TlsMode};

fn main() {
    // One arena: an export's memory then stays near its cache (210 MiB with
    // `--cache-mib 128` where it was 440; bulwark_store::alloc says why).
    bulwark_store::alloc::limit_malloc_arenas(1);
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if stderr_is_journal() {
        // Under systemd: journald stamps lines and reads the `<N>` priority.
        fmt.with_ansi(false)
            .event_format(Journald(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false)
                    .with_ansi(false),
            ))
            .with_writer(std::io::stderr)
            .init();
    } else {
        fmt.with_writer(std::io::stderr).init();
    }
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `$JOURNAL_STREAM` (`DEV:INODE`) names stderr itself; the same check as
/// the agent's `logging` module (a server the agent starts inherits the
/// variable but logs to a file).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    // SAFETY: fstat only writes `st`; its result is checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::fstat(2, &mut st) } == 0;
    ok && dev.parse() == Ok(st.st_dev as u64) && ino.parse() == Ok(st.st_ino as u64)
}

/// `<N>LEVEL ` (sd-daemon(3) priority) before a format without level.
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let p = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(w, "<{p}>{} ", event.metadata().level())?;
        self.0.format_event(ctx, w, event)
    }
}

/// Addresses of `listen` that are not loopback (a name can resolve to
/// several; every one must pass).
fn exposed_addrs(listen: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {listen:?}: expected ADDR:PORT"))?
        .collect();
    Ok(addrs
        .into_iter()
        .filter(|a| !a.ip().is_loopback())
        .collect())
}

/// Refuse to put the exports on the network in plain text by accident.
/// Checked before anything else, so the mistake costs no repository unlock.
fn check_exposure(listen: Option<&str>, tls_required: bool, insecure: bool) -> Result<()> {
    let Some(listen) = listen else {
        return Ok(());
    };
    let exposed = exposed_addrs(listen)?;
    if exposed.is_empty() || tls_required || insecure {
        return Ok(());
    }
    bail!(
        "refusing to serve NBD without TLS on {} (not loopback): anyone reaching it could read \
         the snapshot. Pass --tls-creds DIR (with --tls require, the default), listen on \
         127.0.0.1 or a --socket, or add --insecure if the network is trusted",
        exposed
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn run(cli: Cli) -> Result<()> {
    let Cmd::Serve {
        repo,
        snapshot,
        socket,
        listen,
        tls_creds,
        tls,
        insecure,
        password_file,
        key_file,
        cache_mib,
        boot_set,
        stats,
        outage_wait,
        backfill,
        backfill_mib_per_sec,
        record_boot_set,
        replica,
        plan_on_stdin,
    } = cli.command;
    let boot_set = boot_set.map(|p| read_boot_set(&p)).transpose()?;
    let tls_required = tls_creds.is_some() && tls == TlsArg::Require;
    check_exposure(listen.as_deref(), tls_required, insecure)?;
    let tls = match &tls_creds {
        Some(dir) => {
            let mode = match tls {
                TlsArg::Require => TlsMode::Require,
                TlsArg::Allow => TlsMode::Allow,
            };
            let t = ServerTls::from_dir(dir, mode)
                .with_context(|| format!("loading TLS credentials from {}", dir.display()))?;
            if !t.verifies_clients() {
                tracing::warn!(
                    "no ca-cert.pem in {}: TLS encrypts, but any client may connect",
                    dir.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    // The agent and the CLI pass the S3 endpoint and metadata permission
    // through the environment; no local object cache: the reader has its own.
    let secret = bulwark_store::format::keys::secret_from_sources(
        key_file.as_deref(),
        password_file.as_deref(),
    )?
    .context("no passphrase: set BULWARK_PASSWORD, or pass --password-file or --key-file")?;
    let spare = replica.is_some();
    let open = |url: &str| -> Result<(Arc<bulwark_store::Repository>, bulwark_store::Snapshot)> {
        let mut location = bulwark_store::Location::from_env(url);
        if spare {
            // With a spare, a read turns to it after a few tries, not ten.
            location.s3_max_attempts = 3;
        }
        // A full id's manifest is fetched while the key is unlocked.
        let (repo, snap) = location.open_at(&secret, &snapshot).map_err(|e| match e {
            bulwark_store::Error::SnapshotNotFound(_)
            | bulwark_store::Error::AmbiguousSnapshot(_) => {
                anyhow::Error::from(e).context(format!("snapshot {snapshot} in {url}"))
            }
            e => anyhow::Error::from(e).context(format!("opening repository {url}")),
        })?;
        Ok((Arc::new(repo), snap))
    };
    // The replica is a spare: without one, the repository must open.
    let (repo, snap, replica) = match (open(&repo), replica) {
        (Ok((r, s)), None) => (r, s, None),
        (Ok((r, s)), Some(url)) => match open(&url) {
            Ok((rep, _)) => (r, s, Some(rep)),
            Err(e) => {
                tracing::warn!("the replica is no spare: {e:#}");
                (r, s, None)
            }
        },
        (Err(e), None) => return Err(e),
        (Err(e), Some(url)) => {
            tracing::warn!("{e:#}: serving from the replica {url}");
            let (r, s) = open(&url)?;
            (r, s, None)
        }
    };
    let cache = (cache_mib << 20) / snap.disks.len().max(1);
    let demand = Arc::new(DemandStats::default());
    // Every export answers the handshake now, with the size the snapshot
    // states; requests wait until its disk is open (below), so a client
    // (a live restore's QEMU) starts while the index loads.
    let mut server = Server::new(ServerConfig {
        tls,
        ..ServerConfig::default()
    });
    let mut slots = Vec::new();
    let mut traces = Vec::new();
    let mut copies: Copies = Vec::new();
    for d in &snap.disks {
        let copy = Arc::new(LocalCopy::default());
        copies.push((d.name.clone(), copy.clone()));
        let (export, slot) = StoreExport::pending(d.size);
        let export = export.with_local_copy(copy);
        let export = match record_boot_set {
            Some(_) => {
                let trace = Arc::new(ReadTrace::new());
                traces.push((d.name.clone(), trace.clone()));
                export.traced(trace)
            }
            None => export,
        };
        let desc = format!("{} {} of snapshot {}", snap.source, d.name, snap.id.short());
        server = server.add_export(
            &d.name,
            Arc::new(export.with_demand(demand.clone())),
            Some(desc),
        );
        slots.push((d.name.clone(), d.size, slot));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let handle = rt.block_on(bind(server, socket.as_deref(), listen.as_deref()))?;
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
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")
            .and_then(|()| out.flush())
            .context("telling whoever started the server that it serves (gone?)")?;
    }
    // The boot set's pack ranges are fetched while the disks open: the
    // plan (with the boot set) comes while the index loads.
    let seeds = Seeds::new();
    let plan = match plan_on_stdin {
        true => {
            let (snap, seeds, repo) = (snap.clone(), seeds.clone(), repo.clone());
            Some(std::thread::spawn(move || -> Result<_> {
                let plan = planned(&snap)?;
                if let Some(given) = &plan.1 {
                    fetch_ahead(&seeds, &repo, &given.boot_set);
                }
                Ok(plan)
            }))
        }
        false => {
            if let Some(given) = &boot_set {
                fetch_ahead(&seeds, &repo, &given.boot_set);
            }
            None
        }
    };
    let readers = open_readers(&repo, &snap, cache, outage_wait, replica.as_ref())?;
    for (name, size, slot) in slots {
        let (_, r) = readers
            .iter()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("disk {name} did not open"))?;
        if r.size() != size {
            bail!(
                "disk {name}: its chunk list holds {} bytes, the snapshot says {size}",
                r.size()
            );
        }
        r.take_from(seeds.clone());
        slot.fill(r.clone());
    }
    tracing::debug!("disks open");
    let (backfill, boot_set) = match plan {
        Some(p) => p
            .join()
            .map_err(|_| anyhow::anyhow!("reading the plan panicked"))??,
        None => (backfill, boot_set),
    };
    let boot_set_bytes = boot_set
        .as_ref()
        .map_or(0, |b| queue_boot_set(&b.boot_set, &readers));
    let backfill = (!backfill.is_empty())
        .then(|| {
            Backfill::start(
                repo.clone(),
                replica.clone(),
                &snap,
                backfill,
                &copies,
                backfill_mib_per_sec,
                std::time::Duration::from_secs(outage_wait),
            )
        })
        .transpose()?;
    let counters = Counters {
        path: stats,
        copies,
        boot_set: boot_set.is_some(),
        boot_set_bytes,
        demand,
        backfill,
    };
    let mut recorder = record_boot_set.map(|secs| Recorder {
        repo: repo.clone(),
        snap: snap.clone(),
        traces: traces
            .into_iter()
            .filter_map(|(d, t)| {
                let r = readers.iter().find(|(n, _)| *n == d)?.1.clone();
                Some((d, t, r))
            })
            .collect(),
        window: std::time::Duration::from_secs(secs),
        started: std::time::Instant::now(),
        saved: false,
        given: boot_set,
    });
    let began = std::time::Instant::now();
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    counters.write(&readers);
                    // What the guest has not read of them by then, it won't.
                    if began.elapsed() >= SEEDS_KEPT && seeds.held() > 0 {
                        seeds.clear();
                    }
                    if let Some(r) = recorder.as_mut().filter(|r| r.due()) {
                        r.save();
                    }
                }
                _ = backfill_ended(counters.backfill.as_ref()) => counters.write(&readers),
            }
        }
        handle.shutdown().await;
        counters.write(&readers);
        if let Some(r) = recorder.as_mut() {
            r.save();
        }
        // What the reads cost: bytes fetched per byte served should stay
        // near the stored/logical ratio (no byte fetched twice).
        for (name, r) in &readers {
            let st = r.stats();
            tracing::info!(
                "{name}: served {} B, fetched {} B in {} reads ({} read ahead), {} B of them \
                 fetched with the boot set, {} cache hits",
                st.bytes_served,
                st.bytes_fetched + st.seeded_bytes,
                st.fetches,
                st.readahead_fetches,
                st.seeded_bytes,
                st.cache_hits
            );
        }
        if let Some(p) = &socket {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    })
}

/// Listens on the socket or the TCP address.
async fn bind(
    server: Server<StoreExport>,
    socket: Option<&std::path::Path>,
    listen: Option<&str>,
) -> Result<nbd_server::ServerHandle> {
    match (socket, listen) {
        (Some(path), _) => server
            .bind_unix(path)
            .with_context(|| format!("listening on {}", path.display())),
        (None, Some(addr)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            Ok(server.serve_tcp(l))
        }
        (None, None) => bail!("pass --socket PATH or --listen ADDR:PORT"),
    }
}

/// Each disk's reader over one index narrowed to the snapshot's chunks
/// (memory follows the snapshot, not the repository).
fn open_readers(
    repo: &Arc<bulwark_store::Repository>,
    snap: &bulwark_store::Snapshot,
    cache: usize,
    outage_wait: u64,
    replica: Option<&Arc<bulwark_store::Repository>>,
) -> Result<Vec<(String, Arc<DiskReader>)>> {
    // An unreachable repository is waited out here as reads wait it out
    // (the clients are connected already and their requests wait).
    let outage_wait = std::time::Duration::from_secs(outage_wait);
    let mut outage = bulwark_store::read::outage::OutageWait::from_now(outage_wait);
    let disks = loop {
        match bulwark_store::read::reader::open_disks(repo.clone(), snap, cache) {
            Ok(d) => break d,
            Err(e @ bulwark_store::Error::Backend(_)) if outage.failed() => {
                tracing::warn!("opening the disks: {e}; trying again");
                outage.pause();
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening the disks of snapshot {}", snap.id.short()))
            }
        }
    };
    Ok(disks
        .into_iter()
        .map(|(name, reader)| {
            reader.wait_out_outages(outage_wait);
            if let Some(rep) = replica {
                reader.fall_back_to(rep.clone());
            }
            (name, Arc::new(reader))
        })
        .collect())
}

/// `--plan-on-stdin`: the backfill jobs and boot set the command that
/// started us sends once it has planned the restore, for the snapshot it
/// planned (if another was found for the same words, a backup landed in
/// between: refuse rather than serve other disks).
fn planned(
    snap: &bulwark_store::Snapshot,
) -> Result<(Vec<bulwark_nbd::backfill::Job>, Option<BootSetFile>)> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the plan on stdin")?;
    if line.trim().is_empty() {
        bail!("no plan on stdin: the command that started the server gave up");
    }
    let plan: ServePlan = serde_json::from_str(&line).context("the plan on stdin")?;
    if plan.snapshot != snap.id.to_hex() {
        bail!(
            "the command planned snapshot {}, this server found {}",
            plan.snapshot,
            snap.id.to_hex()
        );
    }
    let jobs = plan
        .backfill
        .iter()
        .map(|j| j.parse().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let boot_set = plan.boot_set.map(|p| read_boot_set(&p)).transpose()?;
    Ok((jobs, boot_set))
}

/// The boot sets in `path` (a drill report, or anything with its
/// `boot_set` field).
fn read_boot_set(path: &std::path::Path) -> Result<BootSetFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a boot set", path.display()))
}

/// How long pack ranges fetched ahead are kept for the guest to read.
const SEEDS_KEPT: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts fetching the pack ranges of `sets` (those recorded with them).
fn fetch_ahead(seeds: &Arc<Seeds>, repo: &bulwark_store::Repository, sets: &[BootSet]) {
    let mut ranges = Vec::new();
    for (pack, start, len) in sets.iter().flat_map(|b| &b.packs) {
        match pack.parse() {
            Ok(id) => ranges.push((id, *start, *len)),
            // A hint only: a bad entry costs its fetch ahead, nothing else.
            Err(_) => tracing::warn!("boot set: {pack:?} is no pack id; skipped"),
        }
    }
    if ranges.is_empty() {
        return;
    }
    let bytes: u64 = ranges.iter().map(|r| r.2).sum();
    tracing::debug!(
        "boot set: fetching {} pack ranges ({bytes} B) ahead",
        ranges.len()
    );
    let backend = repo.backend().clone();
    let parallel = backend.read_concurrency();
    seeds.fetch(backend, &ranges, parallel);
}

/// Queues each disk's boot set with its reader; the bytes queued.
fn queue_boot_set(sets: &[BootSet], readers: &[(String, Arc<DiskReader>)]) -> u64 {
    let mut bytes = 0;
    for b in sets {
        let Some((_, r)) = readers.iter().find(|(n, _)| *n == b.disk) else {
            tracing::warn!("boot set of disk {}: the snapshot has no such disk", b.disk);
            continue;
        };
        let ranges: Vec<(u64, u64)> = b.ranges.iter().map(|r| (r[0], r[1])).collect();
        bytes += r.prefetch_in_order(&ranges);
    }
    tracing::info!("boot set: {bytes} B queued first");
    bytes
}

/// `--record-boot-set SECONDS`: the clients' first reads, stored in the
/// repository once (at the end of the window, or when the server stops).
struct Recorder {
    repo: Arc<bulwark_store::Repository>,
    snap: bulwark_store::Snapshot,
    /// Each disk's trace and reader (which says where the reads' data lies).
    traces: Vec<(String, Arc<ReadTrace>, Arc<DiskReader>)>,
    window: std::time::Duration,
    started: std::time::Instant,
    saved: bool,
    /// The set this server fetched first, if any.
    given: Option<BootSetFile>,
}

impl Recorder {
    fn due(&self) -> bool {
        !self.saved && self.started.elapsed() >= self.window
    }

    /// Stores the boot set (a speed-up for a later restore only: a failure
    /// is logged, and serving goes on).
    fn save(&mut self) {
        if std::mem::replace(&mut self.saved, true) {
            return;
        }
        for (_, t, _) in &self.traces {
            t.stop();
        }
        let mut seconds = self.started.elapsed().min(self.window).as_secs_f64();
        // Stopped before the boot that recorded the given set got as far:
        // what it read later is kept, after this guest's own reads.
        if let Some(given) = self.given.as_ref().filter(|g| g.outlasts(seconds)) {
            for (d, t, _) in &self.traces {
                for b in given.boot_set.iter().filter(|b| b.disk == *d) {
                    t.carry(b);
                }
            }
            tracing::debug!(
                "boot set: recorded for {seconds:.1}s only, it keeps the given set's later blocks"
            );
            seconds = given.seconds.map_or(seconds, |s| s.max(seconds));
        }
        let report = BootSetReport {
            source: self.snap.source.clone(),
            snapshot: self.snap.id.to_hex(),
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            seconds,
            boot_set: self
                .traces
                .iter()
                .map(|(d, t, r)| t.boot_set_in(d, r))
                .collect(),
        };
        if report.bytes() == 0 {
            return;
        }
        let r = serde_json::to_vec(&report)
            .map_err(anyhow::Error::from)
            .and_then(|body| {
                self.repo
                    .put_report(BOOT_SET, &self.snap.id, report.at, &body)
                    .map_err(anyhow::Error::from)
            });
        match r {
            Ok(()) => tracing::info!(
                "boot set recorded: {} B read in the first {:.0}s of a boot",
                report.bytes(),
                report.seconds
            ),
            Err(e) => tracing::warn!("recording the boot set: {e:#}"),
        }
    }
}

/// A disk's backfill ended; never without a backfill.
async fn backfill_ended(b: Option<&Backfill>) {
    match b {
        Some(b) => b.ended().await,
        None => std::future::pending().await,
    }
}

/// `--stats FILE`: the counters, rewritten whole (a reader never sees half
/// a file).
struct Counters {
    path: Option<PathBuf>,
    copies: Copies,
    boot_set: bool,
    boot_set_bytes: u64,
    demand: Arc<DemandStats>,
    backfill: Option<Backfill>,
}

impl Counters {
    fn write(&self, readers: &[(String, Arc<DiskReader>)]) {
        let Some(path) = &self.path else { return };
        let (fetched, served, ahead) = readers.iter().fold((0, 0, 0), |(f, s, a), (_, r)| {
            let st = r.stats();
            (
                f + st.bytes_fetched + st.seeded_bytes,
                s + st.bytes_served,
                a + st.seeded_bytes,
            )
        });
        let stats = ServeStats {
            boot_set: self.boot_set,
            boot_set_bytes: self.boot_set_bytes,
            demand_misses: self.demand.misses(),
            stall_seconds: self.demand.stall().as_secs_f64(),
            bytes_fetched: fetched,
            bytes_served: served,
            boot_set_ahead_bytes: ahead,
            bytes_from_backfill: self.copies.iter().map(|(_, c)| c.served()).sum(),
            backfill: self
                .backfill
                .as_ref()
                .map(Backfill::progress)
                .unwrap_or_default(),
        };
        let tmp = path.with_extension("tmp");
        let r = serde_json::to_vec(&stats)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, path));
        // Counters only: serving goes on whatever happens to them.
        if let Err(e) = r {
            tracing::debug!("writing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_beyond_loopback_needs_tls_or_insecure() {
        for ok in ["127.0.0.1:10809", "[::1]:10809", "localhost:10809"] {
            check_exposure(Some(ok), false, false).unwrap();
        }
        check_exposure(None, false, false).unwrap();
        for exposed in ["0.0.0.0:10809", "[::]:10809", "192.0.2.7:10809"] {
            let e = check_exposure(Some(exposed), false, false).unwrap_err();
            assert!(e.to_string().contains("--insecure"), "{e}");
            check_exposure(Some(exposed), true, false).unwrap();
            check_exposure(Some(exposed), false, true).unwrap();
        }
        assert!(check_exposure(Some("no-port"), false, false).is_err());
    }
}
