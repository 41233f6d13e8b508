//! Prometheus metrics in the text format, written to `metrics_textfile`
//! (node exporter's textfile collector) after every job and target check:
//! per (VM, policy) and per host file backup the last run, last success,
//! result, duration and bytes;
//! per repository the last GC and whether it is usable.

use std::fmt::Write as _;

use super::Agent;
use crate::config::HOST_POLICY;

impl Agent {
    /// Rewrites the textfile, atomically (a scrape never sees half a file).
    /// A failed write is logged: metrics never fail a job.
    pub(super) fn write_metrics(&self) {
        let Some(path) = &self.cfg.metrics_textfile else {
            return;
        };
        let text = self.metrics();
        let tmp = path.with_extension("prom.tmp");
        let r = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::warn!("writing metrics to {}: {e}", path.display());
        }
    }

    fn metrics(&self) -> String {
        let sched = self
            .schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut m = Metrics::default();
        // VM backups by (vm, policy); the host's file backups by host, in
        // the same families.
        let vms = sched.runs.iter().filter_map(|(key, r)| {
            let (vm, policy) = key.split_once('/')?;
            Some(([("vm", vm), ("policy", policy)], r))
        });
        let hosts = sched
            .hosts
            .iter()
            .map(|(name, r)| ([("host", name.as_str()), ("policy", HOST_POLICY)], r));
        for (l, r) in vms.chain(hosts) {
            m.gauge(
                "bulwark_backup_last_run_timestamp_seconds",
                "Last backup attempt.",
                &l,
                r.at as f64,
            );
            m.gauge(
                "bulwark_backup_last_success_timestamp_seconds",
                "Last successful backup (0: none yet).",
                &l,
                r.last_ok.unwrap_or(0) as f64,
            );
            m.gauge(
                "bulwark_backup_last_ok",
                "1 if the last backup and its prune succeeded.",
                &l,
                f64::from(u8::from(r.ok && r.prune_error.is_none())),
            );
            m.gauge(
                "bulwark_backup_duration_seconds",
                "Duration of the last backup.",
                &l,
                r.seconds,
            );
            m.gauge(
                "bulwark_backup_bytes_read",
                "Bytes the last backup read.",
                &l,
                r.bytes_read as f64,
            );
            m.gauge(
                "bulwark_backup_bytes_stored",
                "Bytes the last backup stored (new, compressed).",
                &l,
                r.bytes_stored as f64,
            );
        }
        for (repo, g) in &sched.gcs {
            let l = [("repository", repo.as_str())];
            m.gauge(
                "bulwark_gc_last_run_timestamp_seconds",
                "Last GC.",
                &l,
                g.at as f64,
            );
            m.gauge(
                "bulwark_gc_last_ok",
                "1 if the last GC succeeded.",
                &l,
                f64::from(u8::from(g.ok)),
            );
            m.gauge(
                "bulwark_gc_bytes_deleted",
                "Bytes the last GC freed.",
                &l,
                g.bytes_deleted as f64,
            );
        }
        for (job, r) in &sched.syncs {
            let l = [("sync", job.as_str()), ("repository", r.to.as_str())];
            m.gauge(
                "bulwark_sync_last_run_timestamp_seconds",
                "Last run of the sync job.",
                &l,
                r.at as f64,
            );
            m.gauge(
                "bulwark_sync_last_ok",
                "1 if the sync job's last run copied everything it selected.",
                &l,
                f64::from(u8::from(r.ok)),
            );
            m.gauge(
                "bulwark_sync_last_complete_timestamp_seconds",
                "End of the sync job's last complete run (the destination's lag is now minus this).",
                &l,
                r.last_ok.unwrap_or(0) as f64,
            );
            m.gauge(
                "bulwark_sync_bytes_copied",
                "Bytes the sync job's last run copied.",
                &l,
                r.bytes_copied as f64,
            );
        }
        for (vm, r) in &sched.drills {
            let l = [("domain", vm.as_str()), ("policy", r.policy.as_str())];
            m.gauge(
                "bulwark_drill_last_run_timestamp_seconds",
                "Last restore drill of the VM's latest snapshot.",
                &l,
                r.at as f64,
            );
            m.gauge(
                "bulwark_drill_last_ok",
                "1 if the VM's last restore drill passed every check.",
                &l,
                f64::from(u8::from(r.ok)),
            );
            m.gauge(
                "bulwark_drill_last_passed_timestamp_seconds",
                "When a restore drill of the VM last passed (last proven bootable).",
                &l,
                r.last_ok.unwrap_or(0) as f64,
            );
            m.gauge(
                "bulwark_drill_seconds",
                "Duration of the VM's last restore drill.",
                &l,
                r.seconds,
            );
        }
        for (repo, t) in self.targets() {
            let l = [("repository", repo.as_str())];
            m.gauge(
                "bulwark_target_up",
                "1 if the repository was usable at its last check.",
                &l,
                f64::from(u8::from(t.ok)),
            );
        }
        m.text()
    }
}

/// Gauges grouped by name: each name's HELP and TYPE once, then its
/// samples, as the text format wants.
#[derive(Default)]
struct Metrics {
    families: std::collections::BTreeMap<&'static str, (&'static str, String)>,
}

impl Metrics {
    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], v: f64) {
        let (_, samples) = self.families.entry(name).or_insert((help, String::new()));
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        match labels.is_empty() {
            true => writeln!(samples, "{name} {v}"),
            false => writeln!(samples, "{name}{{{}}} {v}", labels.join(",")),
        }
        .unwrap_or(()); // writing to a String cannot fail
    }

    fn text(&self) -> String {
        let mut t = String::new();
        for (name, (help, samples)) in &self.families {
            let _ = write!(t, "# HELP {name} {help}\n# TYPE {name} gauge\n{samples}");
        }
        t
    }
}

/// Label values escape backslash, quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_once_samples_escaped() {
        let mut m = Metrics::default();
        m.gauge("a_total", "A.", &[("vm", "web")], 1.0);
        m.gauge("a_total", "A.", &[("vm", "we\"b\\1\n")], 2.5);
        m.gauge("b", "B.", &[], 0.0);
        assert_eq!(
            m.text(),
            "# HELP a_total A.\n# TYPE a_total gauge\na_total{vm=\"web\"} 1\n\
             a_total{vm=\"we\\\"b\\\\1\\n\"} 2.5\n\
             # HELP b B.\n# TYPE b gauge\nb 0\n"
        );
    }
}
