//! Log output: stderr, filtered by `$BULWARK_LOG` or `-v`; journald-friendly
//! when stderr is the journal; and [`Capture`], the last lines one thread
//! logged (for failure mail).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Lines a [`Capture`] keeps (the oldest go first).
pub const CAPTURE_LINES: usize = 50;

/// Installs the global subscriber: `$BULWARK_LOG`, else warn / info (`-v`) /
/// debug (`-vv`), to stderr, plus the capture layer.
pub fn init(verbosity: u8) {
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("BULWARK_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let journal = stderr_is_journal();
    // journald stamps each line itself and reads the `<N>` priority prefix.
    let journald = journal.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(Journald(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false)
                    .with_ansi(false),
            ))
    });
    let human = (!journal).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(human)
        .with(CaptureLayer)
        .init();
}

/// Whether stderr is systemd's journal stream: `$JOURNAL_STREAM` is
/// `DEV:INODE` of it (systemd.exec(5)). Compared with stderr itself, since
/// children inherit the variable with stderr sent elsewhere (the agent
/// sends `bulwark-nbd`'s to a log file).
pub fn stderr_is_journal() -> bool {
    std::env::var("JOURNAL_STREAM").is_ok_and(|v| fd_is_stream(2, &v))
}

/// Whether `fd` is the file named by a `DEV:INODE` pair.
fn fd_is_stream(fd: i32, dev_ino: &str) -> bool {
    let Some((dev, ino)) = dev_ino.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat only writes `st`; its result is checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// sd-daemon(3) priority of a level: SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG.
pub fn sd_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// `<N>LEVEL ` then an inner format (without time and level).
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = event.metadata().level();
        write!(writer, "<{}>{level} ", sd_priority(level))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Captures active in the process: events are only formatted for one when
/// this is non-zero.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's active captures, by id.
    static BUFFERS: RefCell<Vec<(u64, VecDeque<String>)>> = const { RefCell::new(Vec::new()) };
}

/// While alive, records the lines events on the current thread log (after
/// the filter), the last [`CAPTURE_LINES`]. Bound to its thread. The
/// failure mail carries them.
pub struct Capture {
    id: u64,
    _thread_bound: std::marker::PhantomData<*const ()>,
}

impl Capture {
    pub fn begin() -> Capture {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        BUFFERS.with(|b| b.borrow_mut().push((id, VecDeque::new())));
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        Capture {
            id,
            _thread_bound: std::marker::PhantomData,
        }
    }

    /// The recorded lines, oldest first, e.g. `WARN disk vda: slow key=3`.
    pub fn lines(&self) -> Vec<String> {
        BUFFERS.with(|b| {
            b.borrow()
                .iter()
                .find(|(id, _)| *id == self.id)
                .map(|(_, l)| l.iter().cloned().collect())
                .unwrap_or_default()
        })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // try_with: the thread-local may be gone if dropped at thread exit.
        let _ = BUFFERS.try_with(|b| b.borrow_mut().retain(|(id, _)| *id != self.id));
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Feeds the current thread's captures.
struct CaptureLayer;

impl<S: Subscriber> Layer<S> for CaptureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if ACTIVE.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _ = BUFFERS.try_with(|b| {
            // A re-entrant event (logged while formatting) is dropped.
            let Ok(mut b) = b.try_borrow_mut() else {
                return;
            };
            if b.is_empty() {
                return;
            }
            let line = format_line(event);
            for (_, lines) in b.iter_mut() {
                if lines.len() == CAPTURE_LINES {
                    lines.pop_front();
                }
                lines.push_back(line.clone());
            }
        });
    }
}

/// `LEVEL message k=v ...`, no time, no target.
fn format_line(event: &Event<'_>) -> String {
    let mut v = LineVisitor {
        message: String::new(),
        fields: String::new(),
    };
    event.record(&mut v);
    let mut line = format!("{} {}", event.metadata().level(), v.message);
    line.push_str(&v.fields);
    line
}

struct LineVisitor {
    message: String,
    fields: String,
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch() -> tracing::Dispatch {
        tracing::Dispatch::new(
            tracing_subscriber::registry()
                .with(EnvFilter::new("debug"))
                .with(CaptureLayer),
        )
    }

    #[test]
    fn captures_this_threads_events_only_bounded_until_dropped() {
        let d = dispatch();
        tracing::dispatcher::with_default(&d, || {
            tracing::info!("before any capture");
            let cap = Capture::begin();
            tracing::warn!(disk = "vda", n = 3, "backup of {} failed", "web01");
            tracing::trace!("below the filter");
            let d2 = d.clone();
            let theirs = std::thread::spawn(move || {
                tracing::dispatcher::with_default(&d2, || {
                    let c = Capture::begin();
                    tracing::error!("other thread");
                    c.lines()
                })
            })
            .join()
            .unwrap();
            assert_eq!(theirs, ["ERROR other thread"]);
            tracing::error!("second");
            assert_eq!(
                cap.lines(),
                [
                    "WARN backup of web01 failed disk=\"vda\" n=3",
                    "ERROR second"
                ]
            );

            for i in 0..CAPTURE_LINES + 7 {
                tracing::info!("line {i}");
            }
            let lines = cap.lines();
            assert_eq!(lines.len(), CAPTURE_LINES);
            assert_eq!(lines[0], "INFO line 7");
            assert_eq!(
                lines[CAPTURE_LINES - 1],
                format!("INFO line {}", CAPTURE_LINES + 6)
            );

            // Nested: the inner one sees only what follows its start.
            let inner = Capture::begin();
            tracing::info!("both");
            assert_eq!(inner.lines(), ["INFO both"]);
            assert_eq!(cap.lines().last().unwrap(), "INFO both");
            drop(inner);
            tracing::info!("outer only");
            assert_eq!(cap.lines().last().unwrap(), "INFO outer only");
            BUFFERS.with(|b| assert_eq!(b.borrow().len(), 1));

            // Dropped: nothing recorded any more, anywhere.
            drop(cap);
            tracing::info!("after drop");
            BUFFERS.with(|b| assert!(b.borrow().is_empty()));
        });
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(sd_priority(&Level::ERROR), 3);
        assert_eq!(sd_priority(&Level::WARN), 4);
        assert_eq!(sd_priority(&Level::INFO), 6);
        assert_eq!(sd_priority(&Level::DEBUG), 7);
        assert_eq!(sd_priority(&Level::TRACE), 7);
    }

    #[test]
    fn journal_stream_names_the_descriptor() {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let a = tempfile::tempfile().unwrap();
        let b = tempfile::tempfile().unwrap();
        let m = a.metadata().unwrap();
        let v = format!("{}:{}", m.dev(), m.ino());
        assert!(fd_is_stream(a.as_raw_fd(), &v));
        assert!(!fd_is_stream(b.as_raw_fd(), &v));
        assert!(!fd_is_stream(a.as_raw_fd(), "garbage"));
        assert!(!fd_is_stream(-1, &v));
    }

    #[test]
    fn journald_lines_carry_priority_and_no_time() {
        use std::sync::{Arc, Mutex};
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let w = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || SharedBuf(w.clone()))
            .event_format(Journald(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false)
                    .with_ansi(false),
            ));
        let d = tracing::Dispatch::new(
            tracing_subscriber::registry()
                .with(EnvFilter::new("debug"))
                .with(layer),
        );
        tracing::dispatcher::with_default(&d, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let prefixes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{text}");
        assert!(
            text.lines().next().unwrap().starts_with("<3>ERROR "),
            "{text}"
        );
        assert!(
            text.lines().nth(2).unwrap().starts_with("<6>INFO "),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "{text}");
    }

    struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
