//! LVM2, read-only: the PV label, the metadata area's current text copy,
//! a parser for LVM's text format, and a [`ReadAt`] over a logical volume
//! whose segments are linear or striped. Thin, RAID, mirror and snapshot
//! volumes are listed but not read.
//!
//! Bounds: label lists and metadata size are capped, the parser's depth
//! and the number of segments too.

use std::sync::Arc;

use crate::error::{corrupt, Error, Result};
use crate::io::{self, Fields, ReadAt};

const WHAT: &str = "lvm2";
const MDA_MAGIC: &[u8; 16] = b"\x20LVM2\x20x[5A%r0N*>";
const MAX_METADATA: u64 = 16 << 20;
const MAX_DEPTH: usize = 32;
const MAX_SEGMENTS: usize = 4096;

/// What a PV's label and metadata area hold.
pub struct PvLabel {
    /// The PV's UUID without dashes.
    pub uuid: String,
    /// The current metadata text, if the PV has a metadata area.
    pub metadata: Option<String>,
}

/// Whether `dev` carries an LVM2 label in its first four sectors.
pub fn detect(dev: &dyn ReadAt) -> bool {
    label_sector(dev).is_some()
}

fn label_sector(dev: &dyn ReadAt) -> Option<(u64, Vec<u8>)> {
    (0..4).find_map(|s| {
        let b = io::read_vec(dev, s * 512, 512).ok()?;
        (&b[..8] == b"LABELONE" && &b[24..32] == b"LVM2 001").then_some((s, b))
    })
}

/// Reads the label and current metadata of a PV.
pub fn read_label(dev: &dyn ReadAt) -> Result<PvLabel> {
    let (_, b) = label_sector(dev).ok_or_else(|| corrupt(WHAT, "no LVM2 label"))?;
    let f = Fields::new(&b, WHAT);
    let pvh = f.le32(20)? as usize;
    let uuid = String::from_utf8_lossy(f.slice(pvh, 32)?).to_string();
    // Data areas, then metadata areas: lists of (offset, size) ending in 0.
    let mut pos = pvh + 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in lists.iter_mut() {
        loop {
            let (off, size) = (f.le64(pos)?, f.le64(pos + 8)?);
            pos += 16;
            if off == 0 {
                break;
            }
            if list.len() >= 8 {
                return Err(corrupt(WHAT, "too many areas in the PV label"));
            }
            list.push((off, size));
        }
    }
    let metadata = match lists[1].first() {
        Some(&(off, size)) => Some(read_metadata(dev, off, size)?),
        None => None,
    };
    Ok(PvLabel { uuid, metadata })
}

/// The current copy of the metadata text in the area at `mda` (a ring
/// buffer after its 512-byte header).
fn read_metadata(dev: &dyn ReadAt, mda: u64, mda_size: u64) -> Result<String> {
    let h = io::read_vec(dev, mda, 512)?;
    let f = Fields::new(&h, WHAT);
    if f.slice(4, 16)? != MDA_MAGIC {
        return Err(corrupt(WHAT, "bad metadata area header"));
    }
    let (off, size) = (f.le64(40)?, f.le64(48)?);
    if off == 0
        || size == 0
        || size > MAX_METADATA
        || size > mda_size
        || off >= mda_size
        || off < 512
    {
        return Err(corrupt(
            WHAT,
            format!("metadata at {off}+{size} in an area of {mda_size}"),
        ));
    }
    let first = size.min(mda_size - off);
    let mut text = io::read_vec(dev, mda + off, first as usize)?;
    if first < size {
        text.extend(io::read_vec(dev, mda + 512, (size - first) as usize)?);
    }
    if let Some(nul) = text.iter().position(|&b| b == 0) {
        text.truncate(nul);
    }
    String::from_utf8(text).map_err(|_| corrupt(WHAT, "metadata is not UTF-8"))
}

/// A value of LVM's text format.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    List(Vec<Value>),
    Section(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            Some(Value::Int(i)) if *i >= 0 => Ok(*i as u64),
            _ => Err(corrupt(
                WHAT,
                format!("metadata: {key} missing or not a number"),
            )),
        }
    }
    fn str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Ok(s),
            _ => Err(corrupt(
                WHAT,
                format!("metadata: {key} missing or not a string"),
            )),
        }
    }
    fn sections(&self) -> impl Iterator<Item = (&str, &Value)> {
        let items: &[(String, Value)] = match self {
            Value::Section(items) => items,
            _ => &[],
        };
        items
            .iter()
            .filter(|(_, v)| matches!(v, Value::Section(_)))
            .map(|(k, v)| (k.as_str(), v))
    }
}

/// Parses LVM metadata text into its top-level section.
pub fn parse(text: &str) -> Result<Value> {
    let tokens = tokenize(text)?;
    let mut p = Parser { t: &tokens, i: 0 };
    let items = p.items(0, false)?;
    Ok(Value::Section(items))
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Punct(char),
}

fn tokenize(text: &str) -> Result<Vec<Tok>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '{' | '}' | '[' | ']' | '=' | ',' => {
                out.push(Tok::Punct(c));
                chars.next();
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => s.extend(chars.next()),
                        Some(c) => s.push(c),
                        None => return Err(corrupt(WHAT, "metadata: unterminated string")),
                    }
                }
                out.push(Tok::Str(s));
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || "_.+-".contains(c) {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if s.is_empty() {
                    return Err(corrupt(WHAT, format!("metadata: unexpected {c:?}")));
                }
                out.push(match s.parse::<i64>() {
                    Ok(i) => Tok::Int(i),
                    Err(_) => Tok::Ident(s),
                });
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    t: &'a [Tok],
    i: usize,
}

impl Parser<'_> {
    fn next(&mut self) -> Option<&Tok> {
        let t = self.t.get(self.i);
        self.i += 1;
        t
    }

    fn bad(&self, what: &str) -> Error {
        corrupt(WHAT, format!("metadata: {what} at token {}", self.i))
    }

    /// `key = value` and `name { ... }` items up to `}` (or the end).
    fn items(&mut self, depth: usize, nested: bool) -> Result<Vec<(String, Value)>> {
        if depth > MAX_DEPTH {
            return Err(self.bad("nesting too deep"));
        }
        let mut items = Vec::new();
        loop {
            let key = match self.next() {
                None if !nested => return Ok(items),
                Some(Tok::Punct('}')) if nested => return Ok(items),
                Some(Tok::Ident(k)) => k.clone(),
                Some(Tok::Int(i)) => i.to_string(),
                _ => return Err(self.bad("expected a name")),
            };
            match self.next() {
                Some(Tok::Punct('{')) => {
                    let inner = self.items(depth + 1, true)?;
                    items.push((key, Value::Section(inner)));
                }
                Some(Tok::Punct('=')) => {
                    let v = self.value()?;
                    items.push((key, v));
                }
                _ => return Err(self.bad("expected = or {")),
            }
        }
    }

    fn value(&mut self) -> Result<Value> {
        match self.next().cloned() {
            Some(Tok::Str(s)) => Ok(Value::Str(s)),
            Some(Tok::Int(i)) => Ok(Value::Int(i)),
            Some(Tok::Ident(s)) => Ok(Value::Str(s)),
            Some(Tok::Punct('[')) => {
                let mut list = Vec::new();
                loop {
                    match self.t.get(self.i) {
                        Some(Tok::Punct(']')) => {
                            self.i += 1;
                            return Ok(Value::List(list));
                        }
                        Some(Tok::Punct(',')) => self.i += 1,
                        Some(_) => match self.value()? {
                            Value::List(_) => return Err(self.bad("nested list")),
                            v => list.push(v),
                        },
                        None => return Err(self.bad("unterminated list")),
                    }
                }
            }
            _ => Err(self.bad("expected a value")),
        }
    }
}

/// A volume group as its metadata describes it.
#[derive(Clone, Debug)]
pub struct Vg {
    pub name: String,
    pub id: String,
    pub seqno: u64,
    /// Bytes per extent.
    pub extent_size: u64,
    pub pvs: Vec<VgPv>,
    pub lvs: Vec<Lv>,
}

#[derive(Clone, Debug)]
pub struct VgPv {
    /// The metadata's name for it (`pv0`).
    pub name: String,
    /// UUID without dashes.
    pub uuid: String,
    /// Byte offset of the first extent on the PV.
    pub pe_start: u64,
}

#[derive(Clone, Debug)]
pub struct Lv {
    pub name: String,
    pub segments: Vec<Segment>,
    /// Why the volume cannot be read (a thin or RAID volume), if so.
    pub unsupported: Option<String>,
}

impl Lv {
    pub fn size(&self, vg: &Vg) -> u64 {
        self.segments
            .iter()
            .map(|s| s.extents.saturating_mul(vg.extent_size))
            .fold(0, u64::saturating_add)
    }
}

#[derive(Clone, Debug)]
pub struct Segment {
    pub start_extent: u64,
    pub extents: u64,
    /// Bytes per stripe (0 for one stripe).
    pub stripe_size: u64,
    /// (PV name, first extent on it)
    pub stripes: Vec<(String, u64)>,
}

/// The volume group described by a metadata text.
pub fn volume_group(meta: &Value) -> Result<Vg> {
    let (name, vg) = meta
        .sections()
        .next()
        .ok_or_else(|| corrupt(WHAT, "metadata holds no volume group"))?;
    let extent_size = io::mul(WHAT, vg.int("extent_size")?, 512)?;
    if extent_size == 0 {
        return Err(corrupt(WHAT, "extent size 0"));
    }
    let mut pvs = Vec::new();
    if let Some(list) = vg.get("physical_volumes") {
        for (pv_name, pv) in list.sections() {
            pvs.push(VgPv {
                name: pv_name.to_string(),
                uuid: pv.str("id")?.replace('-', ""),
                pe_start: io::mul(WHAT, pv.int("pe_start")?, 512)?,
            });
        }
    }
    let mut lvs = Vec::new();
    if let Some(list) = vg.get("logical_volumes") {
        for (lv_name, lv) in list.sections() {
            if !is_visible(lv) {
                continue;
            }
            lvs.push(logical_volume(lv_name, lv)?);
        }
    }
    Ok(Vg {
        name: name.to_string(),
        id: vg.str("id")?.to_string(),
        seqno: vg.int("seqno")?,
        extent_size,
        pvs,
        lvs,
    })
}

fn is_visible(lv: &Value) -> bool {
    matches!(lv.get("status"), Some(Value::List(flags)) if flags.contains(&Value::Str("VISIBLE".into())))
}

fn logical_volume(name: &str, lv: &Value) -> Result<Lv> {
    let mut segments = Vec::new();
    let mut unsupported = None;
    for (key, seg) in lv.sections() {
        if !key.starts_with("segment") {
            continue;
        }
        if segments.len() >= MAX_SEGMENTS {
            return Err(Error::TooLarge(format!(
                "logical volume {name} has too many segments"
            )));
        }
        let kind = seg.str("type")?;
        if kind != "striped" {
            unsupported.get_or_insert_with(|| format!("{kind} volumes are not read"));
            continue;
        }
        let mut stripes = Vec::new();
        if let Some(Value::List(l)) = seg.get("stripes") {
            for pair in l.chunks(2) {
                match pair {
                    [Value::Str(pv), Value::Int(e)] if *e >= 0 => {
                        stripes.push((pv.clone(), *e as u64))
                    }
                    _ => return Err(corrupt(WHAT, format!("{name}: bad stripe list"))),
                }
            }
        }
        let stripe_size = if stripes.len() > 1 {
            io::mul(WHAT, seg.int("stripe_size")?, 512)?
        } else {
            0
        };
        if stripes.is_empty() || (stripes.len() > 1 && stripe_size == 0) {
            return Err(corrupt(WHAT, format!("{name}: segment without stripes")));
        }
        segments.push(Segment {
            start_extent: seg.int("start_extent")?,
            extents: seg.int("extent_count")?,
            stripe_size,
            stripes,
        });
    }
    segments.sort_by_key(|s| s.start_extent);
    Ok(Lv {
        name: name.to_string(),
        segments,
        unsupported,
    })
}

/// A logical volume's bytes, read from its PVs.
pub struct LvReader {
    size: u64,
    segs: Vec<Mapped>,
}

struct Mapped {
    start: u64,
    len: u64,
    stripe_size: u64,
    /// Each stripe's device and byte offset of its first extent.
    stripes: Vec<(Arc<dyn ReadAt>, u64)>,
}

impl LvReader {
    /// The reader of `lv`; `pv` finds the device of a PV by UUID.
    pub fn new(vg: &Vg, lv: &Lv, pv: impl Fn(&str) -> Option<Arc<dyn ReadAt>>) -> Result<Self> {
        let mut segs = Vec::new();
        let mut next = 0u64;
        for s in &lv.segments {
            let start = io::mul(WHAT, s.start_extent, vg.extent_size)?;
            let len = io::mul(WHAT, s.extents, vg.extent_size)?;
            if start != next {
                return Err(corrupt(
                    WHAT,
                    format!("{}: segments leave a gap or overlap", lv.name),
                ));
            }
            next = io::add(WHAT, start, len)?;
            let mut stripes = Vec::new();
            for (name, first) in &s.stripes {
                let p = vg
                    .pvs
                    .iter()
                    .find(|p| &p.name == name)
                    .ok_or_else(|| corrupt(WHAT, format!("{}: unknown PV {name}", lv.name)))?;
                let dev = pv(&p.uuid).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "{}: PV {name} ({}) is not in this snapshot",
                        lv.name, p.uuid
                    ))
                })?;
                let at = io::add(WHAT, p.pe_start, io::mul(WHAT, *first, vg.extent_size)?)?;
                stripes.push((dev, at));
            }
            segs.push(Mapped {
                start,
                len,
                stripe_size: if s.stripe_size == 0 {
                    len.max(1)
                } else {
                    s.stripe_size
                },
                stripes,
            });
        }
        Ok(LvReader { size: next, segs })
    }
}

impl ReadAt for LvReader {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let i = self.segs.partition_point(|s| s.start + s.len <= at);
            let s = self.segs.get(i).filter(|s| s.start <= at).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("offset {at} past the logical volume"),
                )
            })?;
            let rel = at - s.start;
            let n_stripes = s.stripes.len() as u64;
            let chunk = rel / s.stripe_size;
            let (dev, base) = &s.stripes[(chunk % n_stripes) as usize];
            let within = rel % s.stripe_size;
            let dev_at = base + chunk / n_stripes * s.stripe_size + within;
            let n =
                ((s.stripe_size - within).min(s.start + s.len - at) as usize).min(buf.len() - pos);
            dev.read_at(dev_at, &mut buf[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#"
vg0 {
id = "abc"
seqno = 3
extent_size = 8 # 4 KiB
physical_volumes {
pv0 {
id = "aaaa-bb"
device = "/dev/loop0"
pe_start = 16
pe_count = 100
}
}
logical_volumes {
root {
id = "x"
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 2
type = "striped"
stripe_count = 1
stripes = [
"pv0", 10
]
}
segment2 {
start_extent = 2
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", 1]
}
}
pool { status = ["READ"] segment1 { type = "thin-pool" } }
}
}
contents = "Text Format Volume Group"
"#;

    #[test]
    fn linear_segments_map_to_their_extents() {
        let vg = volume_group(&parse(META).unwrap()).unwrap();
        assert_eq!(
            (vg.name.as_str(), vg.seqno, vg.extent_size),
            ("vg0", 3, 4096)
        );
        assert_eq!(vg.lvs.len(), 1, "invisible volumes are skipped");
        let pv: Arc<dyn ReadAt> = Arc::new(
            (0..200u32 * 1024)
                .map(|i| (i / 4096) as u8)
                .collect::<Vec<u8>>(),
        );
        let lv = LvReader::new(&vg, &vg.lvs[0], |u| (u == "aaaabb").then(|| pv.clone())).unwrap();
        assert_eq!(lv.size(), 3 * 4096);
        let mut b = vec![0u8; 3 * 4096];
        lv.read_at(0, &mut b).unwrap();
        // pe_start 8 KiB = block 2; extent 10 -> block 12; extent 1 -> block 3.
        assert_eq!((b[0], b[4096], b[8192]), (12, 13, 3));
        assert!(lv.read_at(3 * 4096, &mut [0u8; 1]).is_err());
    }

    #[test]
    fn bad_metadata_is_an_error() {
        for text in [
            "vg {",
            "vg { a = [1, [2]] }",
            "vg { a = \"x }",
            "vg { = }",
            &"a {".repeat(100),
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
