//! Shell completion scripts where Debian's shells look for them.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The shells the package installs completions for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Where `shell` loads the completions of command `bin` from, under the
/// package root `root`.
pub fn path(root: &Path, shell: Shell, bin: &str) -> PathBuf {
    match shell {
        Shell::Zsh => root
            .join("usr/share/zsh/vendor-completions")
            .join(format!("_{bin}")),
        Shell::Fish => root
            .join("usr/share/fish/vendor_completions.d")
            .join(format!("{bin}.fish")),
        _ => root.join("usr/share/bash-completion/completions").join(bin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_paths() {
        let r = Path::new("/r");
        assert_eq!(
            path(r, Shell::Bash, "bulwark"),
            Path::new("/r/usr/share/bash-completion/completions/bulwark")
        );
        assert_eq!(
            path(r, Shell::Zsh, "bulwark"),
            Path::new("/r/usr/share/zsh/vendor-completions/_bulwark")
        );
        assert_eq!(
            path(r, Shell::Fish, "bulwark"),
            Path::new("/r/usr/share/fish/vendor_completions.d/bulwark.fish")
        );
    }
}
