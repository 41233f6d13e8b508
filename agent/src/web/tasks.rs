//! What the dashboard started: each task has a kind, its user, a state,
//! per-item progress (one item per VM of a restore) and its log lines,
//! shown live while it runs. The last [`KEEP`] tasks are kept in memory;
//! the last verify of each repository is also written down, as the
//! repositories page shows it.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Tasks kept (the oldest finished ones go first).
pub const KEEP: usize = 200;
/// Log lines kept per task.
const LINES: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "error")]
pub enum State {
    Running,
    Done,
    Failed(String),
    Cancelled,
}

/// One thing a task works on (a VM being restored).
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub name: String,
    /// `queued`, `restoring`, `done`, `failed`, `live` (handed to the
    /// agent: see the live restores), `cancelled`.
    pub state: String,
    pub bytes_total: u64,
    pub bytes_done: u64,
    #[serde(skip)]
    started: Option<Instant>,
    pub note: Option<String>,
}

impl Item {
    pub fn new(name: &str, bytes_total: u64) -> Item {
        Item {
            name: name.to_string(),
            state: "queued".into(),
            bytes_total,
            bytes_done: 0,
            started: None,
            note: None,
        }
    }

    /// Bytes per second so far and the seconds left at that rate.
    pub fn rate_and_eta(&self) -> (f64, Option<f64>) {
        let Some(t) = self.started else {
            return (0.0, None);
        };
        let secs = t.elapsed().as_secs_f64().max(0.001);
        let rate = self.bytes_done as f64 / secs;
        let left = self.bytes_total.saturating_sub(self.bytes_done) as f64;
        let eta = (rate > 0.0 && self.state == "restoring").then(|| left / rate);
        (rate, eta)
    }
}

struct Inner {
    state: State,
    finished: Option<i64>,
    lines: VecDeque<String>,
    items: Vec<Item>,
    cancel: Option<Box<dyn FnOnce() + Send>>,
    result: Option<Value>,
}

pub struct Task {
    pub id: u64,
    pub kind: &'static str,
    pub title: String,
    pub user: String,
    pub started: i64,
    inner: Mutex<Inner>,
}

impl Task {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a log line (time-stamped).
    pub fn log(&self, line: impl AsRef<str>) {
        let mut i = self.lock();
        if i.lines.len() == LINES {
            i.lines.pop_front();
        }
        let t = chrono::Local::now().format("%H:%M:%S");
        i.lines.push_back(format!("{t} {}", line.as_ref()));
    }

    pub fn set_items(&self, items: Vec<Item>) {
        self.lock().items = items;
    }

    /// Changes item `i` (a no-op for an index out of range).
    pub fn item(&self, i: usize, f: impl FnOnce(&mut Item)) {
        if let Some(it) = self.lock().items.get_mut(i) {
            f(it);
        }
    }

    /// Changes every item.
    pub fn item_all(&self, mut f: impl FnMut(&mut Item)) {
        self.lock().items.iter_mut().for_each(&mut f);
    }

    /// Marks item `i` started (the clock of its rate and ETA).
    pub fn start_item(&self, i: usize) {
        self.item(i, |it| {
            it.state = "restoring".into();
            it.started = Some(Instant::now());
        });
    }

    /// What cancels this task, while it runs.
    pub fn on_cancel(&self, f: impl FnOnce() + Send + 'static) {
        self.lock().cancel = Some(Box::new(f));
    }

    /// Cancels: `false` if it is not running.
    pub fn cancel(&self) -> bool {
        let f = {
            let mut i = self.lock();
            if i.state != State::Running {
                return false;
            }
            i.cancel.take()
        };
        match f {
            Some(f) => {
                f();
                self.log("cancel requested");
                true
            }
            None => false,
        }
    }

    /// Ends the task, unless it ended already.
    pub fn finish(&self, state: State, result: Option<Value>) {
        let mut i = self.lock();
        if i.state == State::Running {
            i.state = state;
            i.finished = Some(chrono::Utc::now().timestamp());
            i.result = result;
            i.cancel = None;
        }
    }

    pub fn state(&self) -> State {
        self.lock().state.clone()
    }

    pub fn running(&self) -> bool {
        self.state() == State::Running
    }

    /// The task as the API shows it (`lines`: with the log).
    pub fn to_json(&self, lines: bool) -> Value {
        let i = self.lock();
        let items: Vec<Value> = i
            .items
            .iter()
            .map(|it| {
                let (rate, eta) = it.rate_and_eta();
                let mut v = serde_json::to_value(it).unwrap_or(Value::Null);
                v["bytes_per_second"] = json!(rate);
                v["eta_seconds"] = json!(eta);
                v
            })
            .collect();
        let mut v = json!({
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "user": self.user,
            "started": self.started,
            "finished": i.finished,
            "items": items,
            "result": i.result,
            "cancellable": i.cancel.is_some() && i.state == State::Running,
        });
        if let Value::Object(m) = serde_json::to_value(&i.state).unwrap_or(Value::Null) {
            for (k, x) in m {
                v[k] = x;
            }
        }
        if lines {
            v["lines"] = json!(i.lines);
        }
        v
    }
}

/// The last verify of a repository.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verified {
    pub at: i64,
    pub ok: bool,
    pub snapshots: usize,
    pub damaged: usize,
    pub error: Option<String>,
}

pub struct Tasks {
    next: AtomicU64,
    list: Mutex<VecDeque<Arc<Task>>>,
    verify_file: PathBuf,
}

impl Tasks {
    pub fn new(verify_file: PathBuf) -> Tasks {
        Tasks {
            next: AtomicU64::new(1),
            list: Mutex::new(VecDeque::new()),
            verify_file,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Task>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new running task.
    pub fn add(&self, kind: &'static str, title: String, user: &str) -> Arc<Task> {
        let t = Arc::new(Task {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            kind,
            title,
            user: user.to_string(),
            started: chrono::Utc::now().timestamp(),
            inner: Mutex::new(Inner {
                state: State::Running,
                finished: None,
                lines: VecDeque::new(),
                items: Vec::new(),
                cancel: None,
                result: None,
            }),
        });
        let mut l = self.lock();
        l.push_back(t.clone());
        while l.len() > KEEP {
            match l.iter().position(|t| !t.running()) {
                Some(i) => {
                    l.remove(i);
                }
                None => break,
            }
        }
        t
    }

    pub fn get(&self, id: u64) -> Option<Arc<Task>> {
        self.lock().iter().find(|t| t.id == id).cloned()
    }

    /// Newest first.
    pub fn all(&self) -> Vec<Arc<Task>> {
        self.lock().iter().rev().cloned().collect()
    }

    /// Runs `f` on a thread as task `t`: its `Ok` is the result, its `Err`
    /// fails the task (unless it was cancelled).
    pub fn run(
        &self,
        t: Arc<Task>,
        f: impl FnOnce(&Task) -> anyhow::Result<Value> + Send + 'static,
    ) {
        std::thread::spawn(move || {
            t.log(format!("{} started by {}", t.title, t.user));
            match f(&t) {
                Ok(v) => {
                    t.log("done");
                    t.finish(State::Done, Some(v));
                }
                Err(e) => {
                    t.log(format!("failed: {e:#}"));
                    t.finish(State::Failed(format!("{e:#}")), None);
                }
            }
        });
    }

    pub fn verified(&self) -> BTreeMap<String, Verified> {
        std::fs::read(&self.verify_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn record_verify(&self, repo: &str, v: Verified) -> anyhow::Result<()> {
        let mut all = self.verified();
        all.insert(repo.to_string(), v);
        let tmp = self.verify_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&all)?)?;
        std::fs::rename(&tmp, &self.verify_file)?;
        Ok(())
    }
}
