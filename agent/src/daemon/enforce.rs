//! `[enforce] require_protection`: every domain on the host must name a
//! policy this agent may run. An unprotected one is logged and its
//! enforcement contacts mailed once, and once more when it is protected
//! (the streak rule of `mail::Notifier`, task `Protection`). The other
//! rules live where they act: `allowed_repositories` in `Config::refusal`
//! (the agent and `bulwark protect` refuse), `default_policies` in
//! `watch` (given to a domain when it is defined).

use super::Agent;
use crate::mail::{Job, Task};

/// The notifier's key for a domain's protection state.
const PROTECTION: &str = "(protection)";

impl Agent {
    pub(super) fn enforce_protection(&self) {
        if !self.cfg.enforce.require_protection {
            return;
        }
        let contacts = self.cfg.enforce_contacts();
        let protected = self.protected();
        for (dom, _) in self.inventory.all() {
            let is_protected = protected.iter().any(|(d, _)| *d == dom);
            let mut logged = self.unprotected.lock().unwrap_or_else(|p| p.into_inner());
            if !is_protected && logged.insert(dom.clone()) {
                tracing::warn!("{dom} is not protected: no policy of this host names it");
            } else if is_protected && logged.remove(&dom) {
                tracing::info!("{dom} is protected now");
            }
            drop(logged);
            // Mail by the notifier's saved state, so a restart neither
            // repeats the mail nor forgets the recovery.
            let failing = self.alerts.as_ref().is_some_and(|(a, _)| {
                let a = a.lock().unwrap_or_else(|p| p.into_inner());
                let st = a.notifier().state().job(&dom, PROTECTION);
                st.is_some_and(|j| j.failing_since.is_some())
            });
            let job = Job {
                task: Task::Protection,
                vm: &dom,
                policy: PROTECTION,
                repository: "-",
                contacts: &contacts,
            };
            if !is_protected && !failing {
                self.alert(&job, Some("no Bulwark policy in its metadata"), &[]);
            } else if is_protected && failing {
                self.alert(&job, None, &[]);
            }
        }
    }
}
