//! `bulwark snapshots`

use anyhow::Result;

use crate::secret;
use crate::units::human;
use crate::Global;

#[derive(clap::Args)]
pub struct Args {
    /// Only snapshots of this source.
    #[arg(long)]
    source: Option<String>,
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<i32> {
    let repo = secret::open(g)?;
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| a.source.as_ref().is_none_or(|src| &s.source == src))
        .collect();
    let drills = crate::drill::report::latest_in_repository(&repo)?;
    if a.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "source": s.source,
                    "time": s.time,
                    "host": s.host,
                    "policy": s.policy,
                    "parent": s.parent,
                    "size": s.size(),
                    "stored_bytes": s.stats.bytes_stored,
                    "vm": s.domain_xml.is_some(),
                    "files": s.files,
                    "drill": drills.get(&s.id).map(|r| serde_json::json!({
                        "passed": r.passed, "started": r.started, "seconds": r.seconds,
                        "host": r.host,
                    })),
                    "disks": s.disks.iter().map(|d| serde_json::json!({
                        "name": d.name, "size": d.size, "data_bytes": d.data_bytes,
                        "chunks": d.chunks, "checkpoint": d.checkpoint,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "{:<8}  {:<20}  {:<12}  {:<19}  {:>10}  {:>10}  DISKS",
        "ID", "SOURCE", "POLICY", "TIME (local)", "SIZE", "STORED"
    );
    for s in &snaps {
        let local = s.time.with_timezone(&chrono::Local);
        let disks: Vec<String> = match &s.files {
            Some(f) => vec![format!(
                "{} files, {}{}",
                f.files,
                human(f.bytes),
                if f.partial { " (PARTIAL)" } else { "" }
            )],
            None => s.disks.iter().map(|d| d.name.clone()).collect(),
        };
        let drill = drills.get(&s.id).map_or_else(String::new, |r| {
            let at = chrono::DateTime::parse_from_rfc3339(&r.started)
                .map(|t| {
                    t.with_timezone(&chrono::Local)
                        .format("%a %F %H:%M")
                        .to_string()
                })
                .unwrap_or_else(|_| r.started.clone());
            if r.passed {
                format!(", proven bootable {at} ({:.0} s)", r.seconds)
            } else {
                format!(", drill FAILED {at}")
            }
        });
        println!(
            "{:<8}  {:<20}  {:<12}  {:<19}  {:>10}  {:>10}  {}{}{drill}",
            s.id.short(),
            s.source,
            s.policy.as_deref().unwrap_or("-"),
            local.format("%Y-%m-%d %H:%M:%S"),
            human(s.size()),
            human(s.stats.bytes_stored),
            disks.join(","),
            if s.domain_xml.is_some() { " (VM)" } else { "" }
        );
    }
    Ok(0)
}
