//! Man pages from a clap definition, with `clap_mangen` doing the roff.
//!
//! Two shapes: [`split`] gives a command's own page (`bulwark(1)`: its
//! options and a list of its groups) plus one page per group
//! (`bulwark-repo(1)`) that holds every command of the group; [`whole`]
//! gives one page holding every command (`bulwark-nbd(1)`).

use std::io;

use clap::Command;
use clap_mangen::Man;

/// What every page's `.TH` line says besides its name.
pub struct Meta {
    /// `YYYY-MM-DD`: the release's date (the package's changelog).
    pub date: String,
    /// `bulwark 0.1.0`.
    pub source: String,
    pub manual: String,
}

/// A rendered page.
pub struct Page {
    /// `bulwark-repo.1`.
    pub file: String,
    pub roff: String,
}

/// `cmd`'s page (its subcommands listed, each pointing to its page) and a
/// page per subcommand with all of that group's commands.
pub fn split(cmd: Command, meta: &Meta, see_also: &[&str]) -> io::Result<Vec<Page>> {
    let cmd = built(cmd);
    let own = page_name(&cmd);
    let mut roff = Vec::new();
    man(&cmd, meta).render(&mut roff)?;
    see_also_section(&mut roff, see_also);
    let mut pages = vec![page(&own, roff)?];
    let back: Vec<String> = std::iter::once(format!("{own}(1)"))
        .chain(see_also.iter().map(|s| s.to_string()))
        .collect();
    let back: Vec<&str> = back.iter().map(String::as_str).collect();
    for group in visible_subcommands(&cmd) {
        pages.push(group_page(&without_global_args(group), meta, &back)?);
    }
    Ok(pages)
}

/// One page with every command of `cmd`.
pub fn whole(cmd: Command, meta: &Meta, see_also: &[&str]) -> io::Result<Page> {
    group_page(&built(cmd), meta, see_also)
}

/// The help subcommand is for terminals; the pages list the commands.
fn built(cmd: Command) -> Command {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// A group's page: its own synopsis and options, then each of its
/// commands (nested groups flattened) with theirs.
fn group_page(group: &Command, meta: &Meta, see_also: &[&str]) -> io::Result<Page> {
    let mut roff = header(group, meta)?;
    if has_subcommands(group) {
        roff.extend_from_slice(b".SH COMMANDS\n");
        for leaf in leaves(group) {
            command_subsection(&mut roff, leaf, meta)?;
        }
    }
    see_also_section(&mut roff, see_also);
    page(&page_name(group), roff)
}

/// `.TH`, NAME, SYNOPSIS, DESCRIPTION and OPTIONS (when there are any).
fn header(cmd: &Command, meta: &Meta) -> io::Result<Vec<u8>> {
    let man = man(cmd, meta);
    let mut roff = Vec::new();
    man.render_title(&mut roff)?;
    man.render_name_section(&mut roff)?;
    man.render_synopsis_section(&mut roff)?;
    man.render_description_section(&mut roff)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut roff)?;
    }
    Ok(roff)
}

/// `.SS "bulwark repo init"`, then the command's description, synopsis
/// and options as clap_mangen renders them, each a paragraph rather than
/// a section.
fn command_subsection(roff: &mut Vec<u8>, cmd: &Command, meta: &Meta) -> io::Result<()> {
    let cmd = without_global_args(cmd);
    let man = man(&cmd, meta);
    let mut body = Vec::new();
    man.render_description_section(&mut body)?;
    man.render_synopsis_section(&mut body)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut body)?;
    }
    let title = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    roff.extend_from_slice(format!(".SS \"{title}\"\n").as_bytes());
    let body = String::from_utf8(body).map_err(io::Error::other)?;
    for line in body.lines() {
        // Each section a paragraph of the subsection.
        let line = if line.starts_with(".SH") { ".PP" } else { line };
        roff.extend_from_slice(line.as_bytes());
        roff.push(b'\n');
    }
    Ok(())
}

fn see_also_section(roff: &mut Vec<u8>, pages: &[&str]) {
    if pages.is_empty() {
        return;
    }
    roff.extend_from_slice(b".SH \"SEE ALSO\"\n");
    let refs: Vec<String> = pages
        .iter()
        .map(|p| match p.split_once('(') {
            Some((name, section)) => format!("\\fB{name}\\fR({section}"),
            None => format!("\\fB{p}\\fR"),
        })
        .collect();
    roff.extend_from_slice(refs.join(", ").as_bytes());
    roff.push(b'\n');
}

fn man(cmd: &Command, meta: &Meta) -> Man {
    Man::new(cmd.clone())
        .title(page_name(cmd).to_uppercase())
        .section("1")
        .date(&meta.date)
        .source(&meta.source)
        .manual(&meta.manual)
}

/// The page, with the string definition clap_mangen starts each section
/// it renders with kept once.
fn page(name: &str, roff: Vec<u8>) -> io::Result<Page> {
    const PREAMBLE: [&str; 2] = [".ie \\n(.g .ds Aq \\(aq", ".el .ds Aq '"];
    let text = String::from_utf8(roff).map_err(io::Error::other)?;
    let mut out = PREAMBLE.join("\n") + "\n";
    for line in text.lines().filter(|l| !PREAMBLE.contains(l)) {
        out.push_str(line);
        out.push('\n');
    }
    Ok(Page {
        file: format!("{name}.1"),
        roff: out,
    })
}

/// `bulwark-repo`: the page of a (built) command.
fn page_name(cmd: &Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

fn has_subcommands(cmd: &Command) -> bool {
    visible_subcommands(cmd).next().is_some()
}

fn visible_subcommands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// The commands under `cmd` that run something (groups flattened).
fn leaves(cmd: &Command) -> Vec<&Command> {
    visible_subcommands(cmd)
        .flat_map(|s| {
            if has_subcommands(s) {
                leaves(s)
            } else {
                vec![s]
            }
        })
        .collect()
}

/// The options every command takes are on the top page, not repeated for
/// each command.
fn without_global_args(cmd: &Command) -> Command {
    cmd.clone()
        .mut_args(|a| if a.is_global_set() { a.hide(true) } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn meta() -> Meta {
        Meta {
            date: "2026-12-01".into(),
            source: "tool 1.0".into(),
            manual: "Tool Manual".into(),
        }
    }

    fn tool() -> Command {
        Command::new("tool")
            .version("1.0")
            .about("Does things")
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .global(true)
                    .action(ArgAction::SetTrue)
                    .help("Say more"),
            )
            .subcommand(
                Command::new("repo")
                    .about("Repositories")
                    .subcommand(
                        Command::new("init")
                            .about("Create one")
                            .arg(Arg::new("path").help("Where")),
                    )
                    .subcommand(
                        Command::new("check")
                            .about("Check one")
                            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue)),
                    ),
            )
            .subcommand(Command::new("gc").about("Reclaim space"))
    }

    #[test]
    fn split_gives_a_page_per_group_with_its_commands() {
        let pages = split(tool(), &meta(), &["other(5)"]).unwrap();
        let files: Vec<&str> = pages.iter().map(|p| p.file.as_str()).collect();
        assert_eq!(files, ["tool.1", "tool-repo.1", "tool-gc.1"]);
        let top = &pages[0].roff;
        assert!(top.contains("\n.TH TOOL 1 2026-12-01 "), "{top}");
        assert_eq!(top.matches(".ds Aq").count(), 2, "{top}");
        assert!(top.contains("tool\\-repo(1)"), "{top}");
        assert!(top.contains("\\-\\-verbose"), "{top}");
        assert!(top.contains("\\fBother\\fR(5)"), "{top}");
        let repo = &pages[1].roff;
        assert!(repo.contains(".SS \"tool repo init\""), "{repo}");
        assert!(repo.contains(".SS \"tool repo check\""), "{repo}");
        assert!(repo.contains("\\-\\-json"), "{repo}");
        assert!(repo.contains("Where"), "{repo}");
        // Global options stay on the top page.
        assert!(!repo.contains("verbose"), "{repo}");
        assert!(repo.contains("\\fBtool\\fR(1)"), "{repo}");
    }

    #[test]
    fn whole_holds_every_command() {
        let p = whole(tool(), &meta(), &[]).unwrap();
        assert_eq!(p.file, "tool.1");
        for c in ["tool repo init", "tool repo check", "tool gc"] {
            assert!(p.roff.contains(&format!(".SS \"{c}\"")), "{c}: {}", p.roff);
        }
        assert!(!p.roff.contains("SEE ALSO"));
        // The command's own options, global ones too, are on its page.
        assert!(p.roff.contains("Say more"), "{}", p.roff);
        assert_eq!(p.roff.matches("Say more").count(), 1, "{}", p.roff);
    }
}
