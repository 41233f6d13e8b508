//! Where the repository secret comes from: a key file, a password file,
//! $BULWARK_PASSWORD, or a prompt on the terminal, in that order.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use store::{Backend, LocalBackend, Repository, Secret};

use crate::Global;

pub fn secret(g: &Global, confirm: bool) -> Result<Secret> {
    if let Some(path) = &g.key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        let bytes = store::keys::read_key_file(&text)
            .with_context(|| format!("key file {}", path.display()))?;
        return Ok(Secret::KeyFile(bytes));
    }
    if let Some(path) = &g.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading password file {}", path.display()))?;
        let pw = text.lines().next().unwrap_or("").to_string();
        if pw.is_empty() {
            bail!("password file {} is empty", path.display());
        }
        return Ok(Secret::Passphrase(pw));
    }
    if let Ok(pw) = std::env::var("BULWARK_PASSWORD") {
        if !pw.is_empty() {
            return Ok(Secret::Passphrase(pw));
        }
    }
    if std::io::stdin().is_terminal() {
        let pw = rpassword::prompt_password("repository passphrase: ")?;
        if confirm && rpassword::prompt_password("again: ")? != pw {
            bail!("passphrases do not match");
        }
        if pw.is_empty() {
            bail!("empty passphrase");
        }
        return Ok(Secret::Passphrase(pw));
    }
    bail!("no passphrase: set BULWARK_PASSWORD, or pass --password-file or --key-file")
}

pub fn backend(g: &Global) -> Result<Arc<dyn Backend>> {
    let Some(repo) = &g.repo else {
        bail!("no repository: pass --repo PATH or set BULWARK_REPO");
    };
    if repo.contains("://") {
        bail!("repository {repo:?}: only local directories are supported by this build");
    }
    Ok(Arc::new(LocalBackend::new(repo)))
}

pub fn open(g: &Global) -> Result<Repository> {
    let backend = backend(g)?;
    let location = backend.location();
    let secret = secret(g, false)?;
    Repository::open(backend, &secret).with_context(|| format!("opening repository {location}"))
}
