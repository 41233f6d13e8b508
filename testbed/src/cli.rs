//! Running a Bulwark binary from a test: its environment set once, its
//! output checked, failures shown with its stderr. The binaries' paths
//! come from the test (`env!("CARGO_BIN_EXE_bulwark")`): only the crate
//! that builds them knows them.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{RngCore, SeedableRng};

/// A binary and the environment every run of it gets.
#[derive(Clone, Debug)]
pub struct Runner {
    bin: PathBuf,
    prefix: Vec<OsString>,
    vars: Vec<(OsString, OsString)>,
    removed: Vec<OsString>,
}

impl Runner {
    /// `bin` with `BULWARK_LOG` unset (tests read stderr; a developer's
    /// log level must not change it).
    pub fn new(bin: impl Into<PathBuf>) -> Runner {
        Runner {
            bin: bin.into(),
            prefix: Vec::new(),
            vars: Vec::new(),
            removed: vec!["BULWARK_LOG".into()],
        }
    }

    /// One more variable for every run.
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Runner {
        self.vars.push((k.into(), v.into()));
        self
    }

    /// More variables for every run.
    pub fn envs<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Runner
    where
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.vars
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// A variable every run goes without.
    pub fn env_remove(mut self, k: impl Into<OsString>) -> Runner {
        self.removed.push(k.into());
        self
    }

    /// Arguments before every run's own, when `bin` is a wrapper (e.g.
    /// `unshare ... BULWARK`).
    pub fn with_prefix(mut self, args: &[&str]) -> Runner {
        self.prefix.extend(args.iter().map(OsString::from));
        self
    }

    /// The command, to add to or spawn.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(&self.prefix).args(args);
        for k in &self.removed {
            c.env_remove(k);
        }
        c.envs(self.vars.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs to the end; its output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()))
    }

    /// Its stdout; the test fails, showing stderr, if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}",
            self.bin.display(),
            stderr(&out)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Its stdout as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let s = self.ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))
    }

    /// The ids `snapshots --json` lists, in its order.
    pub fn snapshot_ids(&self) -> Vec<String> {
        let v = self.json(&["snapshots", "--json"]);
        v.as_array()
            .unwrap_or_else(|| panic!("snapshots --json: {v}"))
            .iter()
            .map(|s| s["id"].as_str().expect("an id").to_string())
            .collect()
    }

    /// `backup image IMAGE --source SOURCE --json`: its report.
    pub fn backup_image(&self, image: &str, source: &str) -> serde_json::Value {
        self.json(&["backup", "image", image, "--source", source, "--json"])
    }
}

/// A run's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A sparse image of `mib` MiB, the same for the same `seed`: per MiB in
/// turn random, random, text, explicit zeros, a hole.
pub fn sparse_image(path: &Path, mib: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = File::create(path).expect("creating the image");
    f.set_len(mib << 20).expect("sizing the image");
    for i in 0..mib {
        let mut block = vec![0u8; 1 << 20];
        match i % 5 {
            0 | 1 => rng.fill_bytes(&mut block),
            2 => {
                for (j, b) in block.iter_mut().enumerate() {
                    *b = b"lorem ipsum dolor sit amet\n"[j % 27];
                }
            }
            3 => {}
            _ => continue,
        }
        f.write_all_at(&block, i << 20).expect("writing the image");
    }
}
