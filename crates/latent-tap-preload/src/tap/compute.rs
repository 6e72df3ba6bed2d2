//! Graph computes: the tap around the host's `ggml_backend_sched_graph_compute(_async)`.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Config;
use crate::host::{self, Host, Tensor, TYPE_I32};
use crate::labels::{GraphRows, Mismatch};
use crate::link::{ConnectError, Link};
use crate::wire::{CONNECT_INTERVAL_MS, LIVENESS_INTERVAL_MS};

use super::callback::{host_cb, sched_entry, tap_callback, Sched};
use super::{config, log, now_ms, turn_off, State, BATCH, CURRENT, STATE};

/// Finds the graph's `inp_tokens`, `inp_pos` and `out_ids` inputs and reads them.
///
/// They are looked up by name among the graph's leafs (`ggml_graph_get_tensor`),
/// not as the sources of its nodes: when layers run on another backend (RPC
/// workers, a GPU), ggml's scheduler points those nodes at copies of the inputs
/// (`<backend>#out_ids#0`), which it fills only during the compute, so a node's
/// source read before it holds the previous graph's values (the pruned last
/// layer's prompt row went missing under `--rpc`).
///
/// # Safety
///
/// `graph` must be the host's graph being computed.
unsafe fn read_inputs(h: &Host, graph: *mut c_void, rows: &mut GraphRows) {
    rows.tokens.clear();
    rows.pos.clear();
    rows.out_ids.clear();
    let mut found: [*const Tensor; 3] = [std::ptr::null(); 3];
    for (slot, name) in [c"inp_tokens", c"inp_pos", c"out_ids"].iter().enumerate() {
        // SAFETY: the host's graph (caller) and a NUL-terminated name.
        found[slot] = unsafe { (h.graph_get_tensor)(graph, name.as_ptr()) };
    }
    for (slot, &t) in found.iter().enumerate() {
        if t.is_null() {
            continue;
        }
        // SAFETY: a live input tensor of the graph.
        let tr = unsafe { &*t };
        if tr.typ != TYPE_I32 || tr.buffer.is_null() || tr.data.is_null() || tr.ne[0] < 0 {
            continue;
        }
        let n = tr.ne[0] as usize;
        let v = match slot {
            0 => &mut rows.tokens,
            1 => &mut rows.pos,
            _ => &mut rows.out_ids,
        };
        v.resize(n, 0);
        // SAFETY: the tensor holds at least `n` i32 (its first row); `v` has
        // room for them; ggml copies from host or device memory.
        unsafe { (h.tensor_get)(t, v.as_mut_ptr() as *mut c_void, 0, n * 4) };
    }
    rows.n_tokens = if found[0].is_null() {
        rows.pos.len()
    } else {
        rows.tokens.len()
    };
}

/// Connects, checks the listener, labels the graph; says whether to tap it.
///
/// # Safety
///
/// `graph` must be the host's graph about to be computed.
unsafe fn prepare(st: &mut State, h: &Host, cfg: &Config, graph: *mut c_void) -> bool {
    st.graphs = st.graphs.wrapping_add(1);
    let now = now_ms();
    if let Some(link) = &st.link {
        if now >= st.next_check_ms {
            st.next_check_ms = now + LIVENESS_INTERVAL_MS;
            if !link.alive() {
                let drops = link.producer.stats().drops;
                log(&format!(
                    "listener {} left after {} frames ({drops} dropped, {} graphs unlabelled); \
                     waiting for the next one",
                    link.connection, st.frame_seq, st.graphs_skipped
                ));
                st.link = None;
            }
        }
    } else if now >= st.next_connect_ms {
        st.next_connect_ms = now + CONNECT_INTERVAL_MS;
        match Link::connect(cfg, st.connections + 1) {
            Ok(Some(link)) => {
                st.connections += 1;
                st.frame_seq = 0;
                st.frames_dropped = 0;
                st.graphs_skipped = 0;
                st.unlabelled_logged = false;
                st.next_check_ms = now + LIVENESS_INTERVAL_MS;
                log(&format!(
                    "listener {} attached at {} ({} MiB ring)",
                    st.connections,
                    cfg.sink,
                    cfg.ring_bytes >> 20
                ));
                st.link = Some(link);
            }
            Ok(None) => {}
            Err(ConnectError::Refused(why)) => turn_off(st, why),
            Err(ConnectError::Failed(e)) => log(&format!(
                "could not attach to the listener at {}: {e}",
                cfg.sink
            )),
        }
    }
    if st.link.is_none() {
        return false;
    }
    if !st.layout_checked {
        // SAFETY: the host's graph (caller); its first node is a live tensor.
        let first = unsafe {
            if (h.graph_n_nodes)(graph) > 0 {
                (h.graph_node)(graph, 0)
            } else {
                std::ptr::null_mut()
            }
        };
        if first.is_null() {
            return false;
        }
        // SAFETY: a live tensor of the host.
        if let Err(e) = unsafe { h.check_layout(first) } {
            turn_off(
                st,
                format!("this llama.cpp's ggml_tensor differs from what the tap reads ({e})"),
            );
            return false;
        }
        st.layout_checked = true;
    }
    // SAFETY: the host's graph (caller).
    unsafe { read_inputs(h, graph, &mut st.rows) };
    let taken = BATCH.with(|b| {
        b.try_borrow_mut()
            .map_err(|_| Mismatch::NoBatch)
            .and_then(|mut b| b.take(&st.rows, &mut st.labels))
    });
    match taken {
        Ok(()) => true,
        Err(m @ Mismatch::Unknown { .. }) => {
            turn_off(st, format!("cannot label rows: {m}"));
            false
        }
        Err(m) => {
            st.labels.clear();
            st.graphs_skipped += 1;
            if !st.unlabelled_logged {
                st.unlabelled_logged = true;
                log(&format!("a graph was not tapped: {m}"));
            }
            false
        }
    }
}

/// Runs the host's `compute` with the tap around it.
///
/// # Safety
///
/// As the host's `ggml_backend_sched_graph_compute(_async)`.
pub(super) unsafe fn around_compute(
    sched: *mut c_void,
    graph: *mut c_void,
    real: unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32,
) -> i32 {
    let h = match host::host() {
        Ok(h) => h,
        Err(missing) => {
            static LOGGED: AtomicBool = AtomicBool::new(false);
            if !LOGGED.swap(true, Ordering::Relaxed) {
                log(&format!(
                    "{missing} is not in this process (not a shared-library llama.cpp program?): \
                     the tap is off, the program runs untouched"
                ));
            }
            // SAFETY: the host's function, called with the host's arguments.
            return unsafe { real(sched, graph) };
        }
    };
    let mut guard = STATE.try_lock().ok();
    let entry = sched_entry(sched);
    let tap = catch_unwind(AssertUnwindSafe(|| {
        let (Some(g), Some(cfg)) = (guard.as_mut(), config()) else {
            return false;
        };
        let st = g.get_or_insert_with(State::default);
        if st.off.is_some() {
            return false;
        }
        // SAFETY: the host's graph about to be computed.
        unsafe { prepare(st, h, cfg, graph) }
    }))
    .unwrap_or_else(|_| {
        if let Some(st) = guard.as_mut().and_then(|g| g.as_mut()) {
            turn_off(st, "internal error (panic) while preparing a graph".into());
        }
        false
    });
    let Some(e) = entry else {
        // SAFETY: as above.
        return unsafe { real(sched, graph) };
    };
    if tap {
        // SAFETY: installing a callback on the host's scheduler, with a
        // 'static user pointer.
        unsafe {
            (h.set_eval_callback)(sched, Some(tap_callback), e as *const Sched as *mut c_void)
        };
        e.ours.store(true, Ordering::Release);
        let st = guard
            .as_mut()
            .and_then(|g| g.as_mut())
            .expect("tapping implies a state");
        CURRENT.set(st as *mut State);
    } else if e.ours.swap(false, Ordering::AcqRel) {
        let (cb, ud) = host_cb(e);
        // SAFETY: restoring the host's own callback.
        unsafe { (h.set_eval_callback)(sched, cb, ud) };
    }
    // SAFETY: the host's function with the host's arguments.
    let r = unsafe { real(sched, graph) };
    CURRENT.set(std::ptr::null_mut());
    r
}
