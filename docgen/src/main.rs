//! `bulwark-docgen`: writes the man pages, shell completions and copyright
//! file of the Debian package into its staging root (`scripts/build-deb.sh`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bulwark_docgen::{completions, copyright, man};
use clap::{CommandFactory, Parser};

#[derive(Parser)]
#[command(name = "bulwark-docgen", version)]
enum Cli {
    /// bulwark(1), a page per command group (bulwark-repo(1), ...) and
    /// bulwark-nbd(1), uncompressed, into ROOT/usr/share/man/man1.
    Man {
        root: PathBuf,
        /// The release date (YYYY-MM-DD) the pages carry.
        #[arg(long)]
        date: String,
    },
    /// bash, zsh and fish completions of bulwark and bulwark-nbd, where
    /// Debian's shells load them, under ROOT.
    Completions { root: PathBuf },
    /// The DEP-5 copyright file, on stdout.
    Copyright {
        /// `cargo metadata --format-version 1` output.
        #[arg(long)]
        metadata: PathBuf,
        /// The project's own paragraphs.
        #[arg(long)]
        head: PathBuf,
        /// A directory of licence texts, one file per SPDX id.
        #[arg(long)]
        licenses: PathBuf,
        /// The workspace packages whose binaries are shipped.
        #[arg(long, value_delimiter = ',', required = true)]
        roots: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::Man { root, date } => write_man(&root, &date),
        Cli::Completions { root } => write_completions(&root),
        Cli::Copyright {
            metadata,
            head,
            licenses,
            roots,
        } => {
            let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
            let crates = copyright::linked(&read(&metadata)?, &roots)?;
            let text = |id: &str| std::fs::read_to_string(licenses.join(id)).ok();
            print!("{}", copyright::render(&read(&head)?, &crates, &text)?);
            Ok(())
        }
    }
}

fn write_man(root: &Path, date: &str) -> Result<()> {
    let meta = man::Meta {
        date: date.to_string(),
        source: format!("bulwark {}", env!("CARGO_PKG_VERSION")),
        manual: "Bulwark".into(),
    };
    let mut pages = man::split(
        bulwark::Cli::command(),
        &meta,
        &["bulwark-nbd(1)", "bulwark-agent.toml(5)"],
    )?;
    pages.push(man::whole(
        bulwark_nbd::cli::Cli::command(),
        &meta,
        &["bulwark(1)"],
    )?);
    let dir = root.join("usr/share/man/man1");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for p in pages {
        write(&dir.join(&p.file), p.roff.as_bytes())?;
    }
    Ok(())
}

fn write_completions(root: &Path) -> Result<()> {
    for shell in completions::SHELLS {
        let mut out = Vec::new();
        bulwark::cmd::completions::write(shell, &mut out);
        write(&completions::path(root, shell, "bulwark"), &out)?;
        let mut out = Vec::new();
        let mut nbd = bulwark_nbd::cli::Cli::command();
        clap_complete::generate(shell, &mut nbd, "bulwark-nbd", &mut out);
        write(&completions::path(root, shell, "bulwark-nbd"), &out)?;
    }
    Ok(())
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn write(p: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display()))
}
