//! `bulwark repo extend-locks` and `bulwark repo recover`: locked
//! repositories (S3 Object Lock, docs/immutability.md).

use anyhow::{Context, Result};
use bulwark_store::maintain::lock::{self, LockSettings, Step};
use chrono::{DateTime, Utc};

use crate::{progress, secret, Global};

/// `governance:PERIOD` or `compliance:PERIOD`, e.g. `compliance:30d`.
pub fn parse_settings(s: &str) -> Result<LockSettings, String> {
    let (mode, period) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected governance:PERIOD or compliance:PERIOD"))?;
    let period = crate::units::parse_duration(period)?
        .to_std()
        .map_err(|e| format!("{s:?}: {e}"))?;
    LockSettings::new(mode.parse()?, period).map_err(|e| format!("{s:?}: {e}"))
}

pub fn extend(g: &Global, json: bool) -> Result<i32> {
    let repo = secret::open(g)?;
    let pb = progress::spinner("extend-locks");
    let r = lock::extend(&repo, &|step| {
        pb.set_message(format!("extend-locks: {step}"))
    });
    pb.finish_and_clear();
    let r = r.context("extending locks")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let until = r.target.map(|t| t.to_rfc3339()).unwrap_or_default();
        println!(
            "{} objects needed: {} locks extended to {until}, {} locked past it already \
             ({} requests, {:.1} s)",
            r.needed, r.extended, r.already, r.requests, r.seconds
        );
    }
    Ok(0)
}

pub fn recover(g: &Global, as_of: DateTime<Utc>, dry_run: bool, json: bool) -> Result<i32> {
    let backend = secret::backend(g)?;
    let steps = lock::recover_plan(backend.as_ref(), as_of)
        .with_context(|| format!("reading the versions of {}", backend.location()))?;
    if !dry_run {
        lock::recover(backend.as_ref(), &steps).context("recovering")?;
    }
    if json {
        let v = serde_json::json!({"as_of": as_of, "dry_run": dry_run, "steps": steps});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let would = if dry_run { "would " } else { "" };
    for s in &steps {
        let what = match s {
            Step::Unhide { .. } => "bring back",
            Step::Restore { .. } => "restore overwritten",
            Step::Hide { .. } => "hide (written since)",
        };
        println!("{would}{what}: {}", s.name());
    }
    println!(
        "{} objects {}put back as of {}",
        steps.len(),
        if dry_run { "would be " } else { "" },
        as_of.to_rfc3339()
    );
    Ok(0)
}
