//! What a file backup leaves out: `--exclude` patterns, `--exclude-file`
//! lines and `.bulwarkignore` files, all one syntax. A pattern with a `/`
//! is matched against the whole path (a relative one in an ignore file
//! against the path below that file's directory); one without is matched
//! against each name. `*` does not cross `/` in whole-path patterns.

use std::path::Path;

use glob::{MatchOptions, Pattern};

/// The per-directory ignore file.
pub const IGNORE_FILE: &str = ".bulwarkignore";

const PATH_OPTS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

#[derive(Clone, Debug)]
struct Rule {
    pattern: Pattern,
    /// Matched against the whole path (else against the name).
    whole_path: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Excludes {
    rules: Vec<Rule>,
}

impl Excludes {
    /// Rules from `--exclude` patterns and the lines of `--exclude-file`s.
    pub fn new(patterns: &[String], files: &[std::path::PathBuf]) -> Result<Self, String> {
        let mut ex = Excludes::default();
        for p in patterns {
            ex.add(p, None)?;
        }
        for f in files {
            let text =
                std::fs::read_to_string(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            ex.add_lines(&text, None)
                .map_err(|e| format!("{}: {e}", f.display()))?;
        }
        Ok(ex)
    }

    pub fn clone_rules(&self) -> Excludes {
        self.clone()
    }

    fn add_lines(&mut self, text: &str, dir: Option<&Path>) -> Result<(), String> {
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                self.add(line, dir)?;
            }
        }
        Ok(())
    }

    fn add(&mut self, pat: &str, dir: Option<&Path>) -> Result<(), String> {
        let pat = pat.trim_end_matches('/');
        let whole_path = pat.contains('/');
        let full = match dir {
            Some(d) if whole_path && !pat.starts_with('/') => {
                format!("{}/{pat}", Pattern::escape(&d.to_string_lossy()))
            }
            _ => pat.to_string(),
        };
        let pattern = Pattern::new(&full).map_err(|e| format!("pattern {pat:?}: {e}"))?;
        self.rules.push(Rule {
            pattern,
            whole_path,
        });
        Ok(())
    }

    /// These rules and those of `dir`'s ignore file, if it has one.
    pub fn with_ignore_file(&self, dir: &Path) -> Result<Excludes, String> {
        let f = dir.join(IGNORE_FILE);
        match std::fs::read(&f) {
            Ok(bytes) => {
                let mut ex = self.clone();
                ex.add_lines(&String::from_utf8_lossy(&bytes), Some(dir))
                    .map_err(|e| format!("{}: {e}", f.display()))?;
                Ok(ex)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(self.clone()),
            Err(e) => Err(format!("reading {}: {e}", f.display())),
        }
    }

    pub fn excluded(&self, path: &Path) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        let full = path.to_string_lossy();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        self.rules.iter().any(|r| {
            if r.whole_path {
                r.pattern.matches_with(&full, PATH_OPTS)
            } else {
                r.pattern.matches_with(&name, PATH_OPTS)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_ignore_files() {
        let ex = Excludes::new(&["*.tmp".into(), "/srv/*/cache".into()], &[]).unwrap();
        assert!(ex.excluded(Path::new("/a/b/x.tmp")));
        assert!(ex.excluded(Path::new("/srv/web/cache")));
        assert!(!ex.excluded(Path::new("/srv/web/sub/cache")));
        assert!(!ex.excluded(Path::new("/srv/web/x")));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IGNORE_FILE), "# c\nbuild/out\n*.o\n").unwrap();
        let ex = ex.with_ignore_file(dir.path()).unwrap();
        assert!(ex.excluded(&dir.path().join("build/out")));
        assert!(ex.excluded(&dir.path().join("deep/x.o")));
        assert!(!ex.excluded(&dir.path().join("build/in")));
    }
}
