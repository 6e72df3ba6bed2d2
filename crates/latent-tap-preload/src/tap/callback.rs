//! Per-scheduler host callbacks, and the eval callback the tap installs.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::host::{EvalCallback, Tensor};

use super::frame::write_frame;
use super::{config, CURRENT, HOST_WANTED};

/// One scheduler's callback as the host set it.
#[derive(Debug)]
pub(super) struct Sched {
    sched: AtomicUsize,
    pub(super) cb: AtomicUsize,
    pub(super) ud: AtomicUsize,
    /// The tap's callback is installed on it right now.
    pub(super) ours: AtomicBool,
}

const N_SCHEDS: usize = 64;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Sched = Sched {
    sched: AtomicUsize::new(0),
    cb: AtomicUsize::new(0),
    ud: AtomicUsize::new(0),
    ours: AtomicBool::new(false),
};
static SCHEDS: [Sched; N_SCHEDS] = [EMPTY; N_SCHEDS];

/// The entry of `sched`, created on first sight; `None` when the table is full.
pub(super) fn sched_entry(sched: *mut c_void) -> Option<&'static Sched> {
    let key = sched as usize;
    if let Some(e) = SCHEDS
        .iter()
        .find(|e| e.sched.load(Ordering::Acquire) == key)
    {
        return Some(e);
    }
    SCHEDS.iter().find(|e| {
        e.sched
            .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
            .is_ok_and(|_| true)
            || e.sched.load(Ordering::Acquire) == key
    })
}

pub(super) fn host_cb(e: &Sched) -> (EvalCallback, *mut c_void) {
    let cb = e.cb.load(Ordering::Acquire);
    // SAFETY: 0 or a function pointer the host passed as its eval callback.
    let cb: EvalCallback = unsafe { std::mem::transmute::<usize, EvalCallback>(cb) };
    (cb, e.ud.load(Ordering::Acquire) as *mut c_void)
}

/// The eval callback the tap installs: the host's own callback keeps working,
/// and selected tensors of a labelled graph are copied into the ring.
pub(super) unsafe extern "C" fn tap_callback(t: *mut Tensor, ask: bool, ud: *mut c_void) -> bool {
    // SAFETY: `ud` is the `&'static Sched` this callback was installed with.
    let e = unsafe { &*(ud as *const Sched) };
    let (hcb, hud) = host_cb(e);
    let r = catch_unwind(AssertUnwindSafe(|| {
        let st = CURRENT.get();
        if st.is_null() || t.is_null() {
            return false;
        }
        // SAFETY: `CURRENT` is set by `around_compute` on this thread while it
        // holds `STATE` locked for the duration of the compute that calls us;
        // nothing else touches the state meanwhile.
        let st = unsafe { &mut *st };
        // SAFETY: the scheduler passes a live node of the graph.
        let t = unsafe { &*t };
        let Some(cfg) = config() else { return false };
        let Some(pattern) = st.selected(cfg, t.name()) else {
            return false;
        };
        if ask {
            return true;
        }
        write_frame(st, cfg, t, pattern);
        true
    }));
    let mine = r.unwrap_or(false);
    if ask {
        // SAFETY: the host's callback, called as the scheduler would.
        let theirs = hcb.is_some_and(|f| unsafe { f(t, true, hud) });
        HOST_WANTED.set(theirs);
        mine || theirs
    } else if HOST_WANTED.get() {
        // SAFETY: as above; the host asked for this node.
        hcb.is_none_or(|f| unsafe { f(t, false, hud) })
    } else {
        true
    }
}
