//! Reading a guest's serial console from a file.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::guest::{self, Ready, Wrote};
use crate::util::{io_err, tail_lines};
use crate::{Error, Result};

const POLL: Duration = Duration::from_millis(50);
const TAIL_LINES: usize = 40;

/// A serial console written to a file by QEMU, read with a cursor: each
/// `wait_*` call looks only at lines after the previous match (or after the
/// last [`Console::skip_to_end`], which VMs call when they start), so waiting
/// for the same line again waits for the next boot's.
#[derive(Debug, Clone)]
pub struct Console {
    path: PathBuf,
    cursor: u64,
}

impl Console {
    /// A console read from `path` (which may not exist yet), from its start.
    pub fn new(path: impl Into<PathBuf>) -> Console {
        Console {
            path: path.into(),
            cursor: 0,
        }
    }

    /// The console file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything the console has received so far (`\r` removed).
    pub fn text(&self) -> String {
        match std::fs::read(&self.path) {
            Ok(b) => String::from_utf8_lossy(&b).replace('\r', ""),
            Err(_) => String::new(),
        }
    }

    /// The last lines of the console, for error messages.
    pub fn tail(&self) -> String {
        tail_lines(&self.text(), TAIL_LINES)
    }

    /// Moves the cursor past everything received so far.
    pub fn skip_to_end(&mut self) {
        self.cursor = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
    }

    /// Waits for a line containing `pattern` after the cursor, moves the
    /// cursor past it and returns it (without line ending).
    pub fn wait_line(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_line_checked(pattern, timeout, || Ok(()))
    }

    /// Like [`Console::wait_line`], calling `alive` about once a second; an
    /// error from it (e.g. "the VM has stopped") ends the wait early.
    pub fn wait_line_checked(
        &mut self,
        pattern: &str,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<String> {
        let start = Instant::now();
        let mut last_check = Instant::now();
        loop {
            if let Some(line) = self.find(pattern)? {
                return Ok(line);
            }
            if start.elapsed() >= timeout {
                return Err(self.error(format!(
                    "timed out after {timeout:?} waiting for a console line containing {pattern:?}"
                )));
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                if let Err(e) = alive() {
                    // One more look: the line may have arrived just before.
                    if let Some(line) = self.find(pattern)? {
                        return Ok(line);
                    }
                    return Err(self.error(format!(
                        "while waiting for a console line containing {pattern:?}: {e}"
                    )));
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the guest's `ready` line.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Ready> {
        let line = self.wait_line(guest::READY, timeout)?;
        Ready::parse(&line)
    }

    /// Waits for the guest's `wrote` line.
    pub fn wait_wrote(&mut self, timeout: Duration) -> Result<Wrote> {
        let line = self.wait_line(guest::WROTE, timeout)?;
        Wrote::parse(&line)
    }

    /// An error about this console, with its tail.
    pub fn error(&self, what: String) -> Error {
        Error::Console {
            what,
            console: self.path.clone(),
            tail: self.tail(),
        }
    }

    fn find(&mut self, pattern: &str) -> Result<Option<String>> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("opening {}", self.path.display()))(e)),
        };
        let len = f
            .metadata()
            .map_err(io_err(format!("stat {}", self.path.display())))?
            .len();
        if len < self.cursor {
            // Truncated (recreated): start over.
            self.cursor = 0;
        }
        f.seek(SeekFrom::Start(self.cursor))
            .map_err(io_err(format!("seeking {}", self.path.display())))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(io_err(format!("reading {}", self.path.display())))?;
        let mut pos = 0usize;
        while let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') {
            let raw = &buf[pos..pos + nl];
            pos += nl + 1;
            let line = String::from_utf8_lossy(raw);
            let line = line.trim_end_matches('\r');
            if line.contains(pattern) {
                self.cursor += pos as u64;
                // Lines may start with stray `\r` or kernel noise: keep from
                // the pattern's line start as printed.
                return Ok(Some(line.trim_start_matches('\r').to_string()));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cursor_moves_past_matches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        let mut c = Console::new(&p);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"noise\r\nbulwark-guest: ready marker=m boots=1\r\npartial")
            .unwrap();
        let r = c.wait_ready(Duration::from_secs(1)).unwrap();
        assert_eq!(r.boots, 1);
        assert!(c.wait_ready(Duration::from_millis(100)).is_err());
        f.write_all(b"\nbulwark-guest: ready marker=m boots=2\n")
            .unwrap();
        assert_eq!(c.wait_ready(Duration::from_secs(1)).unwrap().boots, 2);
        c.skip_to_end();
        let e = c.wait_line("never", Duration::from_millis(60)).unwrap_err();
        assert!(e.to_string().contains("boots=2"), "{e}");
    }
}
