//! `bulwark agent schedule EXPR`: when a schedule would run, so an admin can
//! check an expression before putting it into the config.

use anyhow::Result;
use chrono::{DateTime, Local, Utc};
use serde_json::json;

use crate::calendar::{Kind, Schedule};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A calendar event (`mon..fri 02:00`, `*:0/15`, `daily`) or an interval
    /// (`every 15m`).
    pub expr: String,
    /// How many run times to print.
    #[arg(long, default_value_t = 5)]
    pub count: usize,
    /// Count from this time instead of now (RFC 3339); for an interval, the
    /// last run.
    #[arg(long, value_parser = crate::units::parse_time)]
    pub after: Option<DateTime<Utc>>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<i32> {
    let sched = Schedule::parse(&a.expr)?;
    let after = a.after.unwrap_or_else(Utc::now).with_timezone(&Local);
    let next = sched.next_n(&after, a.count);
    let kind = match sched.kind() {
        Kind::Every(_) => "interval",
        Kind::Calendar(_) => "calendar",
    };
    if a.json {
        let v = json!({
            "schedule": a.expr,
            "kind": kind,
            "normalized": sched.to_string(),
            "after": after.to_rfc3339(),
            "next": next.iter().map(|t| t.to_rfc3339()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("normalized: {sched}");
    if next.is_empty() {
        println!(
            "(never runs after {})",
            after.format("%a %Y-%m-%d %H:%M:%S %:z")
        );
    }
    for t in &next {
        println!("{}", t.format("%a %Y-%m-%d %H:%M:%S %:z"));
    }
    Ok(0)
}
