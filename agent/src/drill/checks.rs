//! The drill's checks, run side by side from the moment the domain starts
//! until each passes or the time limit ends it: a console line matching a
//! pattern, the guest agent answering `guest-ping`, and a screenshot that
//! is not blank and has changed since the first one.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::screen::Picture;
use crate::libvirt::{Domain, Libvirt, State};

/// What to check, and for how long at most.
#[derive(Clone, Debug)]
pub struct Spec {
    pub console: Option<regex_lite::Regex>,
    pub guest_agent: bool,
    pub screenshot: bool,
    pub timeout: Duration,
}

impl Spec {
    pub fn is_empty(&self) -> bool {
        self.console.is_none() && !self.guest_agent && !self.screenshot
    }
}

/// One check's outcome; `seconds` is the time from the domain's start to
/// the check passing, or to its failure.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What the checks saw.
pub struct Outcome {
    pub checks: Vec<CheckResult>,
    /// The last screenshot taken, if any.
    pub screenshot: Option<Picture>,
}

const POLL: Duration = Duration::from_millis(250);
/// Guest agent and screenshot probes are slower; not every poll.
const PROBE: Duration = Duration::from_secs(1);

/// One check in flight.
struct Pending {
    name: &'static str,
    result: Option<CheckResult>,
    /// Why it has not passed yet, for the failure's detail.
    why: String,
}

impl Pending {
    fn new(name: &'static str, why: &str) -> Self {
        Pending {
            name,
            result: None,
            why: why.to_string(),
        }
    }

    fn pass(&mut self, at: Duration) {
        self.result.get_or_insert(CheckResult {
            name: self.name.to_string(),
            passed: true,
            seconds: at.as_secs_f64(),
            detail: None,
        });
    }

    fn fail(&mut self, at: Duration, why: String) {
        self.result.get_or_insert(CheckResult {
            name: self.name.to_string(),
            passed: false,
            seconds: at.as_secs_f64(),
            detail: Some(why),
        });
    }
}

/// Runs the checks of `spec` on the started domain `dom` until each has
/// passed or failed.
pub fn run(
    libvirt: &Libvirt,
    dom: &Domain,
    spec: &Spec,
    consoles: &[PathBuf],
    started: Instant,
) -> Outcome {
    let mut console = spec.console.as_ref().map(|re| {
        (
            ConsoleWatch::new(consoles.to_vec(), re.clone()),
            Pending::new("console", "no line matched yet"),
        )
    });
    let mut agent = spec
        .guest_agent
        .then(|| Pending::new("guest-agent", "no answer yet"));
    let mut shot = spec.screenshot.then(|| {
        (
            Screens::default(),
            Pending::new("screenshot", "none taken yet"),
        )
    });
    let mut last_probe: Option<Instant> = None;
    loop {
        let at = started.elapsed();
        let running = matches!(dom.state(), Ok(State::Active));
        if let Some((w, p)) = &mut console {
            if p.result.is_none() {
                match w.poll() {
                    Ok(true) => p.pass(at),
                    Ok(false) => p.why = w.why(),
                    Err(e) => p.why = e,
                }
            }
        }
        let probe = last_probe.is_none_or(|t| t.elapsed() >= PROBE);
        if probe && running {
            last_probe = Some(Instant::now());
            if let Some(p) = agent.as_mut().filter(|p| p.result.is_none()) {
                match dom.agent_command(r#"{"execute":"guest-ping"}"#, 1) {
                    Ok(_) => p.pass(at),
                    Err(e) => p.why = e.to_string(),
                }
            }
            if let Some((s, p)) = shot.as_mut().filter(|(_, p)| p.result.is_none()) {
                match s.take(libvirt, dom) {
                    Ok(true) => p.pass(at),
                    Ok(false) => p.why = s.why(),
                    Err(e) => p.why = e,
                }
            }
        }
        let mut all: Vec<&mut Pending> = console
            .as_mut()
            .map(|(_, p)| p)
            .into_iter()
            .chain(agent.as_mut())
            .chain(shot.as_mut().map(|(_, p)| p))
            .collect();
        if !running {
            for p in all.iter_mut() {
                let why = format!("the guest stopped (powered off or crashed); {}", p.why);
                p.fail(at, why);
            }
        } else if at >= spec.timeout {
            for p in all.iter_mut() {
                let why = format!(
                    "not passed within {}: {}",
                    humantime::format_duration(spec.timeout),
                    p.why
                );
                p.fail(at, why);
            }
        }
        if all.iter().all(|p| p.result.is_some()) {
            break;
        }
        std::thread::sleep(POLL);
    }
    let (screens, shot) = shot.unzip();
    let checks = console
        .map(|(_, p)| p)
        .into_iter()
        .chain(agent)
        .chain(shot)
        .filter_map(|p| p.result)
        .collect();
    Outcome {
        checks,
        screenshot: screens.and_then(|s| s.last),
    }
}

/// Follows the console log files for a line matching the pattern.
struct ConsoleWatch {
    files: Vec<(PathBuf, u64, Vec<u8>)>,
    re: regex_lite::Regex,
    last_line: String,
}

/// A line longer than this is cut (a guest printing without newlines).
const MAX_LINE: usize = 64 * 1024;

impl ConsoleWatch {
    fn new(files: Vec<PathBuf>, re: regex_lite::Regex) -> Self {
        ConsoleWatch {
            files: files.into_iter().map(|f| (f, 0, Vec::new())).collect(),
            re,
            last_line: String::new(),
        }
    }

    /// Reads what the consoles wrote since the last poll; whether a line
    /// matched.
    fn poll(&mut self) -> Result<bool, String> {
        for (path, offset, partial) in &mut self.files {
            let mut f = match std::fs::File::open(&*path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            };
            let mut new = Vec::new();
            f.seek(SeekFrom::Start(*offset))
                .and_then(|_| f.read_to_end(&mut new))
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            *offset += new.len() as u64;
            for &b in &new {
                if b == b'\n' {
                    let line = String::from_utf8_lossy(partial)
                        .trim_end_matches('\r')
                        .to_string();
                    partial.clear();
                    if self.re.is_match(&line) {
                        return Ok(true);
                    }
                    if !line.trim().is_empty() {
                        self.last_line = line;
                    }
                } else if partial.len() < MAX_LINE {
                    partial.push(b);
                }
            }
            // A prompt (`login: `) ends without a newline.
            if self.re.is_match(&String::from_utf8_lossy(partial)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn why(&self) -> String {
        if self.last_line.is_empty() {
            format!(
                "no console output matched {:?} (none at all)",
                self.re.as_str()
            )
        } else {
            format!(
                "no console line matched {:?}; the last was {:?}",
                self.re.as_str(),
                self.last_line
            )
        }
    }
}

/// The screenshots taken so far: the first, and the last.
#[derive(Default)]
struct Screens {
    first: Option<Picture>,
    last: Option<Picture>,
}

impl Screens {
    /// Takes one; whether the screen is drawn on and has changed since
    /// the first.
    fn take(&mut self, libvirt: &Libvirt, dom: &Domain) -> Result<bool, String> {
        let (mime, bytes) = libvirt.screenshot(dom).map_err(|e| e.to_string())?;
        let pic = Picture::decode(&bytes).map_err(|e| format!("{e:#} ({mime})"))?;
        let first = self.first.get_or_insert_with(|| pic.clone());
        let ok = !pic.is_blank() && pic != *first;
        self.last = Some(pic);
        Ok(ok)
    }

    fn why(&self) -> String {
        match &self.last {
            Some(p) if p.is_blank() => "the screen is blank".into(),
            Some(_) => "the screen has not changed since the first screenshot".into(),
            None => "no screenshot yet".into(),
        }
    }
}
