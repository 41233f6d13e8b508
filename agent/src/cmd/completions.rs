//! `bulwark completions SHELL`: the shell's completion script on stdout,
//! for systems whose package does not install one (Debian's installs bash,
//! zsh and fish completions where those shells look).

use anyhow::Result;
use clap::CommandFactory;
use clap_complete::Shell;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shell to complete for.
    pub shell: Shell,
}

pub fn run(a: Args) -> Result<i32> {
    write(a.shell, &mut std::io::stdout());
    Ok(0)
}

/// The completion script of `bulwark` for `shell`.
pub fn write(shell: Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut crate::Cli::command(), "bulwark", out);
}
