//! Domain events from libvirtd, delivered on a channel, over a connection
//! that reopens itself when libvirtd restarts.
//!
//! libvirt calls event callbacks from its event loop, which some thread must
//! run: [`watch`] starts that thread once per process, and a second thread
//! that keeps a connection open, registers the callbacks on it, and after a
//! close (libvirtd restarted, keepalive timed out) opens a new one. Each
//! (re)connection is announced with [`Event::Connected`]: events missed
//! while it was down are unknown, so the receiver rescans.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use virt::sys;

use super::{c_str, Libvirt};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A connection is (again) open: rescan, events may have been missed.
    Connected,
    Lifecycle {
        domain: String,
        uuid: String,
        change: Lifecycle,
    },
    /// A domain's metadata changed (`bulwark protect`, ...).
    MetadataChanged { domain: String },
    BlockJob {
        domain: String,
        disk: String,
        status: BlockJobStatus,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// A new domain was defined.
    Added,
    /// Its definition was updated (or renamed, or restored from a snapshot).
    Defined,
    Undefined,
    Started,
    /// Stopped cleanly (shut down, destroyed, saved, migrated).
    Stopped,
    /// QEMU crashed or failed: its bitmaps may be inconsistent.
    Crashed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockJobStatus {
    Completed,
    Failed,
    Canceled,
    /// A mirror is in sync (not used by streams).
    Ready,
}

static EVENT_LOOP: Once = Once::new();

/// Starts libvirt's default event loop on a thread of its own (once).
/// Must run before the connections that want events are opened.
pub fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        // SAFETY: registers libvirt's built-in implementation; no arguments.
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            tracing::error!("libvirt: could not register its event loop; events are off");
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                // SAFETY: runs one iteration of the registered loop.
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map_err(|e| tracing::error!("libvirt: event loop thread: {e}"))
            .ok();
    });
}

/// Watches `uri` for domain events until the receiver is dropped.
pub fn watch(uri: &str) -> Receiver<Event> {
    start_event_loop();
    let (tx, rx) = std::sync::mpsc::channel();
    let uri = uri.to_string();
    std::thread::Builder::new()
        .name("libvirt-watch".into())
        .spawn(move || keep_connected(&uri, tx))
        .map_err(|e| tracing::error!("libvirt: watcher thread: {e}"))
        .ok();
    rx
}

/// Closed when libvirt calls the close callback.
#[derive(Default)]
struct Closed {
    flag: Mutex<bool>,
    cv: Condvar,
}

fn keep_connected(uri: &str, tx: Sender<Event>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let lv = match Libvirt::open(uri) {
            Ok(lv) => lv,
            Err(e) => {
                tracing::warn!("libvirt events: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        let closed = Arc::new(Closed::default());
        let regs = match Registrations::new(&lv, &tx, &closed) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("libvirt events: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        tracing::info!("libvirt events: connected to {uri}");
        if tx.send(Event::Connected).is_err() {
            return;
        }
        wait_closed(&lv, &closed);
        tracing::warn!("libvirt events: connection to {uri} closed; reconnecting");
        drop(regs);
    }
}

/// Waits for the close callback; checks `is_alive` now and then as well,
/// in case a close went unreported.
fn wait_closed(lv: &Libvirt, closed: &Closed) {
    let mut flag = closed.flag.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if *flag {
            return;
        }
        let (f, _) = closed
            .cv
            .wait_timeout(flag, Duration::from_secs(2))
            .unwrap_or_else(|e| e.into_inner());
        flag = f;
        if !*flag && !lv.conn.is_alive().unwrap_or(false) {
            return;
        }
    }
}

type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
type LifecycleFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type BlockJobFn = unsafe extern "C" fn(
    sys::virConnectPtr,
    sys::virDomainPtr,
    *const c_char,
    c_int,
    c_int,
    *mut c_void,
);
type MetadataFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, *const c_char, *mut c_void);

/// The callbacks registered on one connection, deregistered on drop.
struct Registrations {
    conn: sys::virConnectPtr,
    ids: Vec<c_int>,
    _lv: Libvirt,
}

impl Registrations {
    fn new(lv: &Libvirt, tx: &Sender<Event>, closed: &Arc<Closed>) -> Result<Self, String> {
        // SAFETY: `lv` (cloned into `_lv`) keeps the connection alive for as
        // long as this value exists.
        let conn = unsafe { lv.conn.as_ptr() };
        let mut regs = Registrations {
            conn,
            ids: Vec::new(),
            _lv: lv.clone(),
        };
        // Keepalive notices a dead libvirtd (5 s probes, 3 missed: closed).
        // SAFETY: a valid connection.
        unsafe { sys::virConnectSetKeepAlive(conn, 5, 3) };
        // SAFETY: libvirt calls each callback back with the signature of
        // its event id; registration takes them as the generic type.
        let cbs: [(u32, Generic); 3] = unsafe {
            [
                (
                    sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    std::mem::transmute::<LifecycleFn, Generic>(on_lifecycle),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                    std::mem::transmute::<BlockJobFn, Generic>(on_block_job),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                    std::mem::transmute::<MetadataFn, Generic>(on_metadata),
                ),
            ]
        };
        for (id, cb) in cbs {
            let opaque = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
            // SAFETY: `opaque` is a boxed Sender freed by `free_sender` when
            // libvirt drops the registration.
            let r = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    conn,
                    std::ptr::null_mut(),
                    id as c_int,
                    Some(cb),
                    opaque,
                    Some(free_sender),
                )
            };
            if r < 0 {
                // SAFETY: not registered, so still ours to free.
                unsafe { free_sender(opaque) };
                return Err(format!(
                    "registering for events {id}: {}",
                    virt::error::Error::last_error().message()
                ));
            }
            regs.ids.push(r);
        }
        let opaque = Arc::into_raw(closed.clone()) as *mut c_void;
        // SAFETY: `opaque` is an Arc<Closed> released by `free_closed`.
        let r = unsafe {
            sys::virConnectRegisterCloseCallback(conn, Some(on_close), opaque, Some(free_closed))
        };
        if r < 0 {
            // SAFETY: not registered, so still ours to release.
            unsafe { free_closed(opaque) };
        }
        Ok(regs)
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        for id in &self.ids {
            // SAFETY: ids returned by RegisterAny on this connection; on a
            // dead connection this fails harmlessly.
            unsafe { sys::virConnectDomainEventDeregisterAny(self.conn, *id) };
        }
        // SAFETY: same connection and callback as registered.
        unsafe { sys::virConnectUnregisterCloseCallback(self.conn, Some(on_close)) };
    }
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, with the Sender boxed at registration.
    drop(unsafe { Box::from_raw(opaque as *mut Sender<Event>) });
}

unsafe extern "C" fn free_closed(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, with the Arc leaked at registration.
    drop(unsafe { Arc::from_raw(opaque as *const Closed) });
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, _reason: c_int, opaque: *mut c_void) {
    // SAFETY: the Arc leaked at registration, alive until `free_closed`.
    let closed = unsafe { &*(opaque as *const Closed) };
    *closed.flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
    closed.cv.notify_all();
}

/// Name and uuid of the domain an event is about.
///
/// # Safety
/// `dom` is the domain libvirt passed to the callback (valid during it).
unsafe fn ids(dom: sys::virDomainPtr) -> (String, String) {
    // Empty if libvirt has no answer (only for an invalid domain, which a
    // callback is never given): the watcher ignores events with an empty
    // uuid, so such an event is dropped, never taken for another domain's.
    // SAFETY: `dom` is valid (the caller's promise); the name is owned by
    // it and copied at once.
    let name = unsafe { c_str(sys::virDomainGetName(dom)) }.unwrap_or_default();
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `buf` has the VIR_UUID_STRING_BUFLEN bytes libvirt writes,
    // NUL-terminated on success.
    let uuid = if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        unsafe { c_str(buf.as_ptr()) }.unwrap_or_default()
    } else {
        String::new()
    };
    (name, uuid)
}

fn send(opaque: *mut c_void, ev: Event) {
    // SAFETY: `opaque` is the Sender boxed at registration, alive until
    // `free_sender`; callbacks run on the one event loop thread.
    let tx = unsafe { &*(opaque as *const Sender<Event>) };
    // A dropped receiver: the watcher ends at its next reconnect.
    let _ = tx.send(ev);
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let change = match (event as u32, detail as u32) {
        (sys::VIR_DOMAIN_EVENT_DEFINED, sys::VIR_DOMAIN_EVENT_DEFINED_ADDED) => Lifecycle::Added,
        (sys::VIR_DOMAIN_EVENT_DEFINED, _) => Lifecycle::Defined,
        (sys::VIR_DOMAIN_EVENT_UNDEFINED, _) => Lifecycle::Undefined,
        (sys::VIR_DOMAIN_EVENT_STARTED, _) => Lifecycle::Started,
        (sys::VIR_DOMAIN_EVENT_CRASHED, _)
        | (
            sys::VIR_DOMAIN_EVENT_STOPPED,
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED | sys::VIR_DOMAIN_EVENT_STOPPED_FAILED,
        ) => Lifecycle::Crashed,
        (sys::VIR_DOMAIN_EVENT_STOPPED, _) => Lifecycle::Stopped,
        _ => return 0,
    };
    // SAFETY: the domain of this callback.
    let (domain, uuid) = unsafe { ids(dom) };
    send(
        opaque,
        Event::Lifecycle {
            domain,
            uuid,
            change,
        },
    );
    0
}

unsafe extern "C" fn on_metadata(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _kind: c_int,
    _nsuri: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: the domain of this callback.
    let (domain, _) = unsafe { ids(dom) };
    send(opaque, Event::MetadataChanged { domain });
}

unsafe extern "C" fn on_block_job(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    disk: *const c_char,
    _kind: c_int,
    status: c_int,
    opaque: *mut c_void,
) {
    let status = match status as u32 {
        sys::VIR_DOMAIN_BLOCK_JOB_COMPLETED => BlockJobStatus::Completed,
        sys::VIR_DOMAIN_BLOCK_JOB_FAILED => BlockJobStatus::Failed,
        sys::VIR_DOMAIN_BLOCK_JOB_CANCELED => BlockJobStatus::Canceled,
        sys::VIR_DOMAIN_BLOCK_JOB_READY => BlockJobStatus::Ready,
        _ => return,
    };
    // SAFETY: the domain and disk name of this callback, valid during it.
    let (domain, disk) = unsafe { (ids(dom), c_str(disk)) };
    send(
        opaque,
        Event::BlockJob {
            domain: domain.0,
            // Block job events are only logged: an empty disk name loses nothing.
            disk: disk.unwrap_or_default(),
            status,
        },
    );
}
