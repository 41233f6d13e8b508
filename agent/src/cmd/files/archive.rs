//! `files get --stdout`, `--tar FILE`, `--zip FILE`: one file's bytes, or
//! trees as an archive with their modes, owners (tar), mtimes, symlinks
//! and hard links (tar). What extraction refuses (symlinks leaving the
//! tree, device files) stays out of archives too: whoever unpacks one later
//! gets nothing the VM's owner could aim outside it.

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fsread::{Kind, Meta};

use super::extract::safe_link;
use super::list::each_below;
use super::Located;

pub(super) fn to_stdout(f: &Located) -> Result<i32> {
    let out = std::io::stdout();
    copy_file(f, &mut out.lock())?;
    Ok(0)
}

/// Writes file `f`'s bytes into `w`.
pub(crate) fn copy_file(f: &Located, w: &mut dyn Write) -> Result<()> {
    if f.node.meta.kind != Kind::File {
        bail!("{} is a {}, not a file", f.path, f.node.meta.kind.name());
    }
    let mut out = std::io::BufWriter::with_capacity(1 << 20, w);
    std::io::copy(&mut Content::new(f), &mut out).with_context(|| format!("reading {}", f.path))?;
    out.flush()?;
    Ok(())
}

/// Reads a file of a tree from start to end.
struct Content<'a> {
    e: &'a Located,
    pos: u64,
}

impl<'a> Content<'a> {
    fn new(e: &'a Located) -> Self {
        Content { e, pos: 0 }
    }
}

impl Read for Content<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .e
            .tree
            .read(&self.e.node, self.pos, buf)
            .map_err(std::io::Error::other)?;
        if n == 0 && self.pos < self.e.node.meta.size {
            return Err(std::io::Error::other(format!("{} ends early", self.e.path)));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// What goes into an archive for one entry, or why nothing does.
enum Item {
    Dir,
    File,
    /// A second name of a file already archived.
    HardLink(String),
    Symlink(String),
}

/// Decides what to archive for each entry, keeping the rules shared by
/// tar and zip in one place; counts refusals.
#[derive(Default)]
struct Plan {
    links: std::collections::HashMap<(usize, u64), String>,
    refused: usize,
}

impl Plan {
    fn item(&mut self, rel: &str, e: &Located) -> Result<Option<Item>> {
        let m = &e.node.meta;
        Ok(Some(match m.kind {
            Kind::Dir => Item::Dir,
            Kind::File => {
                let key = (Arc::as_ptr(&e.tree) as *const () as usize, e.node.id);
                match self.links.get(&key) {
                    Some(first) if m.nlink > 1 => Item::HardLink(first.clone()),
                    _ => {
                        if m.nlink > 1 {
                            self.links.insert(key, rel.to_string());
                        }
                        Item::File
                    }
                }
            }
            Kind::Symlink => {
                let t = e.tree.read_link(&e.node)?;
                if let Err(why) = safe_link(rel, &t) {
                    eprintln!("refused: {}: {why}", e.path);
                    self.refused += 1;
                    return Ok(None);
                }
                Item::Symlink(String::from_utf8_lossy(&t).into_owned())
            }
            other => {
                eprintln!("refused: {}: a {} is not archived", e.path, other.name());
                self.refused += 1;
                return Ok(None);
            }
        }))
    }
}

pub(super) fn tar(sources: &[Located], file: &Path) -> Result<i32> {
    let out: Box<dyn Write> = if file == Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(create(file)?)
    };
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
    b.follow_symlinks(false);
    let mut plan = Plan::default();
    let mut errors = 0;
    for s in sources {
        errors += each_below(s, &mut |rel, e| {
            let Some(item) = plan.item(rel, e)? else {
                return Ok(());
            };
            let m = &e.node.meta;
            let mut h = tar_header(m);
            match item {
                Item::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{rel}/"), std::io::empty())?;
                }
                Item::File => {
                    h.set_size(m.size);
                    b.append_data(&mut h, rel, Content::new(e))?;
                }
                Item::HardLink(first) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, rel, first)?;
                }
                Item::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, rel, target)?;
                }
            }
            Ok(())
        });
    }
    b.into_inner()?.flush()?;
    report(file, plan.refused, errors)
}

fn tar_header(m: &Meta) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(m.mode & 0o1777);
    h.set_uid(u64::from(m.uid.unwrap_or(0)));
    h.set_gid(u64::from(m.gid.unwrap_or(0)));
    h.set_mtime(m.mtime.map_or(0, |t| t.secs.max(0) as u64));
    h
}

pub(super) fn zip(sources: &[Located], file: &Path) -> Result<i32> {
    let out = std::io::BufWriter::with_capacity(1 << 20, create(file)?);
    let (refused, errors) = zip_into(sources, out)?;
    report(file, refused, errors)
}

/// Writes `sources` as a zip archive into `out`; the entries refused and
/// failed (each reported on stderr).
pub(crate) fn zip_into<W: Write + Seek>(sources: &[Located], out: W) -> Result<(usize, usize)> {
    let mut z = zip::ZipWriter::new(out);
    let mut plan = Plan::default();
    let mut errors = 0;
    for s in sources {
        errors += each_below(s, &mut |rel, e| {
            let Some(item) = plan.item(rel, e)? else {
                return Ok(());
            };
            let m = &e.node.meta;
            let opts = zip::write::SimpleFileOptions::default()
                .unix_permissions(m.mode & 0o1777)
                .last_modified_time(zip_time(m))
                .large_file(m.size >= u64::from(u32::MAX));
            match item {
                Item::Dir => z.add_directory(format!("{rel}/"), opts)?,
                // Zip has no hard links: another copy.
                Item::File | Item::HardLink(_) => {
                    z.start_file(
                        rel,
                        opts.compression_method(zip::CompressionMethod::Deflated),
                    )?;
                    std::io::copy(&mut Content::new(e), &mut z)?;
                }
                Item::Symlink(target) => z.add_symlink(rel, target, opts)?,
            }
            Ok(())
        });
    }
    z.finish()?.flush()?;
    Ok((plan.refused, errors))
}

/// A zip time (1980 to 2107, 2 s steps; UTC); outside that range, or
/// unknown, the format's zero time (1980-01-01): metadata, not data.
fn zip_time(m: &Meta) -> zip::DateTime {
    use chrono::{Datelike, Timelike};
    m.mtime
        .and_then(|t| chrono::DateTime::from_timestamp(t.secs, 0))
        .and_then(|t| {
            zip::DateTime::from_date_and_time(
                u16::try_from(t.year()).ok()?,
                t.month() as u8,
                t.day() as u8,
                t.hour() as u8,
                t.minute() as u8,
                t.second() as u8,
            )
            .ok()
        })
        .unwrap_or_default()
}

/// A new archive file (an existing one is not overwritten).
fn create(file: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))
}

fn report(file: &Path, refused: usize, errors: usize) -> Result<i32> {
    if refused + errors > 0 {
        eprintln!(
            "{}: {refused} entries refused, {errors} failed (see above)",
            file.display()
        );
    }
    Ok(i32::from(refused + errors > 0))
}
