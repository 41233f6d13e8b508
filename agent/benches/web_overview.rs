//! The dashboard's overview at fleet scale: 500 domains (two policies
//! each) in the agent's status and 50k snapshots in the cache, rendered as
//! the page handler renders it (the agent's answer and the cache refresh
//! are outside: the page reads both as they are). Prints the median and
//! worst render time and the bytes a page load transfers (HTML + CSS + JS +
//! icon). Bars: < 200 ms, < 200 KB.
//!
//! `cargo bench -p bulwark --bench web_overview`

use std::sync::Arc;
use std::time::Instant;

use bulwark::web::api::Caller;
use bulwark::web::auth::Role;
use bulwark::web::cache::{RepoView, Snap, View};
use bulwark::web::pages::{self, overview};
use bulwark_proto::status::{DomainStatus, PolicyStatus, Status, Target};

const DOMAINS: usize = 500;
const SNAPSHOTS: usize = 50_000;

fn status() -> Status {
    let now = 1_780_000_000u64;
    let policy = |name: &str, last_run: u64, failed: bool, next_run: u64| PolicyStatus {
        name: name.into(),
        usable: true,
        repository: Some("main".into()),
        schedule: Some(name.into()),
        last_run: Some(last_run),
        last_result: Some(if failed { "failed" } else { "ok" }.into()),
        next_run: Some(next_run),
        ..PolicyStatus::default()
    };
    let domains = (0..DOMAINS)
        .map(|i| DomainStatus {
            name: format!("vm-{i:04}"),
            state: if i % 3 == 0 { "shut off" } else { "running" }.into(),
            protected: true,
            backing_up: i % 97 == 0,
            policies: vec![
                policy("hourly", now - 600, i % 50 == 0, now + 3000),
                policy("weekly", now - 86_400, false, now + 500_000),
            ],
            problems: if i % 50 == 0 {
                vec!["hourly: failing since 2026-05-01 10:00:00 UTC: repository unreachable".into()]
            } else {
                vec![]
            },
        })
        .collect();
    Status {
        host: "hv01".into(),
        version: "0.1.0".into(),
        now,
        running: vec!["vm-0000".into()],
        queued: vec!["vm-0000/hourly".into()],
        targets: [(
            "main".to_string(),
            Target {
                ok: true,
                checked: now,
                ..Target::default()
            },
        )]
        .into(),
        domains,
        ..Status::default()
    }
}

fn view() -> View {
    let t0 = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let snaps = (0..SNAPSHOTS).map(|i| {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64).to_be_bytes());
        Arc::new(Snap {
            id: bulwark_store::Id(id),
            repository: "main".into(),
            source: format!("vm-{:04}", i % DOMAINS),
            policy: Some(if i % 10 == 0 { "weekly" } else { "hourly" }.into()),
            host: "hv01".into(),
            time: t0 + chrono::Duration::hours(i as i64 / DOMAINS as i64),
            size: 20 << 30,
            data_bytes: 6 << 30,
            stored: 40 << 20,
            disks: vec!["vda".into()],
            vm: true,
        })
    });
    let mut v = View::default();
    v.repos.insert(
        "main".into(),
        Arc::new(RepoView::from_snaps("main", "/srv/bulwark", snaps)),
    );
    v
}

fn main() {
    let st = status();
    let view = view();
    let caller = Caller {
        user: "ops".into(),
        role: Role::Operator,
        csrf: Some("0".repeat(64)),
        session: None,
    };
    let mut times = Vec::new();
    let mut html_len = 0;
    for _ in 0..21 {
        let t = Instant::now();
        let o = overview::Overview {
            hosts: vec![overview::Host {
                name: "hv01".into(),
                status: Ok(st.clone()),
                local: true,
            }],
            view: &view,
            tasks: vec![],
        };
        let page = pages::layout("Overview", "/", &caller, overview::render(&o));
        html_len = page.0.len();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let total = html_len + pages::assets_len();
    println!("overview of {DOMAINS} domains, {SNAPSHOTS} snapshots: render median {:.1} ms, worst {:.1} ms (21 runs)", times[10], times[20]);
    println!(
        "page load: {html_len} B HTML + {} B assets = {total} B ({:.0} KB)",
        pages::assets_len(),
        total as f64 / 1000.0
    );
    println!(
        "bars: render < 200 ms: {}; page < 200 KB: {}",
        times[20] < 200.0,
        total < 200_000
    );
}
