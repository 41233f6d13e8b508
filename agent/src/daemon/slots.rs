//! Which backups may run now: one at a time per VM, at most
//! `max_concurrent_backups` on the host. A job that cannot start waits for
//! its turn; the scheduler never queues the same (VM, policy) twice.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub(super) struct Slots {
    max: usize,
    state: Mutex<Busy>,
    turn: Condvar,
}

#[derive(Default)]
struct Busy {
    /// VMs with a backup running.
    vms: BTreeSet<String>,
    /// Jobs (`vm/policy`, `gc/repo`) queued or running.
    queued: BTreeSet<String>,
}

/// A running backup's place; frees it when dropped.
pub(super) struct Slot<'a> {
    slots: &'a Slots,
    vm: String,
}

/// A queued job's entry; removed when dropped. It owns its `Slots`, so
/// the scheduler queues a job before the job's thread starts.
pub(super) struct Queued {
    slots: Arc<Slots>,
    key: String,
}

impl Slots {
    pub fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            state: Mutex::new(Busy::default()),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Busy> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `key` queued; `None` if it is queued or running already.
    pub fn enqueue(self: &Arc<Self>, key: &str) -> Option<Queued> {
        self.lock().queued.insert(key.to_string()).then(|| Queued {
            slots: self.clone(),
            key: key.to_string(),
        })
    }

    /// Waits until `vm` has no backup running and the host is below its
    /// limit, then takes a place.
    pub fn acquire(&self, vm: &str) -> Slot<'_> {
        let mut st = self.lock();
        while st.vms.contains(vm) || st.vms.len() >= self.max {
            st = self.turn.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.vms.insert(vm.to_string());
        Slot {
            slots: self,
            vm: vm.to_string(),
        }
    }

    /// VMs with a backup running now.
    pub fn running(&self) -> Vec<String> {
        self.lock().vms.iter().cloned().collect()
    }

    /// Jobs queued or running.
    pub fn queued(&self) -> Vec<String> {
        self.lock().queued.iter().cloned().collect()
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots.lock().vms.remove(&self.vm);
        self.slots.turn.notify_all();
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.slots.lock().queued.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_job_is_queued_once() {
        let s = Arc::new(Slots::new(2));
        let q = s.enqueue("web/hourly").unwrap();
        assert!(s.enqueue("web/hourly").is_none());
        assert!(s.enqueue("web/daily").is_some());
        drop(q);
        assert!(s.enqueue("web/hourly").is_some());
    }

    #[test]
    fn one_backup_per_vm_and_at_most_max_on_the_host() {
        let s = Arc::new(Slots::new(2));
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let per_vm = Arc::new(Mutex::new(BTreeSet::new()));
        let threads: Vec<_> = (0..12)
            .map(|i| {
                let (s, now, peak, per_vm) = (s.clone(), now.clone(), peak.clone(), per_vm.clone());
                std::thread::spawn(move || {
                    let vm = format!("vm{}", i % 3);
                    let _slot = s.acquire(&vm);
                    assert!(per_vm.lock().unwrap().insert(vm.clone()), "{vm} twice");
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    now.fetch_sub(1, Ordering::SeqCst);
                    per_vm.lock().unwrap().remove(&vm);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert!(s.running().is_empty());
    }
}
