//! The tap's state and the functions it interposes.
//!
//! - [`callback`]: the per-scheduler table of the host's eval callbacks and the
//!   tap's own eval callback;
//! - [`compute`]: around each graph compute, attaching to the listener,
//!   labelling the graph's rows and installing the callback;
//! - [`frame`]: one selected node's labelled rows written as a frame;
//! - [`batch`]: request boundaries and the labels of `llama_batch`es and of the
//!   extended batches' shadows;
//! - [`interpose`]: the exported C functions.

use std::cell::{Cell, RefCell};
use std::panic::catch_unwind;
use std::sync::{Mutex, OnceLock};

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::config::Config;
use crate::labels::{Batch, GraphRows, Label};
use crate::link::Link;
use crate::select::NameHasher;

mod batch;
mod callback;
mod compute;
mod frame;
pub mod interpose;

/// Log a line on stderr (unless `LATENT_TAP_LOG=0`).
fn log(msg: &str) {
    if config().is_none_or(|c| c.log) {
        eprintln!("latent-tap: {msg}");
    }
}

/// The settings, or why there are none (logged once).
fn config() -> Option<&'static Config> {
    static CFG: OnceLock<Option<Config>> = OnceLock::new();
    CFG.get_or_init(|| match Config::from_env() {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("latent-tap: {}: the tap is off", e.message());
            None
        }
    })
    .as_ref()
}

/// Milliseconds on a coarse monotonic clock (vDSO, no syscall).
fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Everything that changes while the host runs. Only the thread computing a
/// graph touches it (see [`STATE`]).
#[derive(Debug, Default)]
struct State {
    link: Option<Link>,
    connections: u32,
    next_connect_ms: u64,
    next_check_ms: u64,
    /// Graph computes seen (`FrameHeader::step`).
    graphs: u32,
    /// Frames produced on this connection, dropped ones included.
    frame_seq: u64,
    frames_dropped: u64,
    /// Graphs computed while attached whose rows could not be labelled.
    graphs_skipped: u64,
    /// The current graph's inputs and row labels (empty labels: not tapped).
    rows: GraphRows,
    labels: Vec<Label>,
    /// Rows of the current frame: (source row, label index).
    pick: Vec<usize>,
    /// Device tensors that need conversion are staged here.
    staging: Vec<u8>,
    /// Selection by node name, remembered: glob matching allocates, and the
    /// eval callback asks about every node of every tapped graph.
    names: HashMap<Box<[u8]>, Option<u32>, BuildHasherDefault<NameHasher>>,
    /// Permanently off, and why (logged once).
    off: Option<String>,
    layout_checked: bool,
    unlabelled_logged: bool,
    too_large_logged: bool,
}

/// Distinct node names remembered (a model's graph has a few hundred).
const MAX_NAMES: usize = 4096;

impl State {
    /// `cfg.select(name)`, allocation-free once a name has been seen.
    fn selected(&mut self, cfg: &Config, name: &[u8]) -> Option<u32> {
        if let Some(&s) = self.names.get(name) {
            return s;
        }
        let s = cfg.select(name);
        if self.names.len() < MAX_NAMES {
            self.names.insert(name.into(), s);
        }
        s
    }
}

/// The tap. `try_lock` only: a thread that finds it taken computes its graph
/// untapped rather than wait (two host threads computing at once is rare;
/// waiting on the compute thread is never acceptable).
static STATE: Mutex<Option<State>> = Mutex::new(None);

thread_local! {
    /// While this thread computes a tapped graph: the state it holds locked.
    static CURRENT: Cell<*mut State> = const { Cell::new(std::ptr::null_mut()) };
    /// The host's answer to the last "ask" of the eval callback.
    static HOST_WANTED: Cell<bool> = const { Cell::new(false) };
    /// The batch being decoded on this thread.
    static BATCH: RefCell<Batch> = RefCell::new(Batch::default());
}

/// Turn the tap off for good, with one log line.
fn turn_off(st: &mut State, why: String) {
    if st.off.is_none() {
        log(&format!("{why}; the tap is off, the host runs untouched"));
        st.link = None;
        st.off = Some(why);
    }
}

/// At load: note glibc's `dlsym` and log the settings. Nothing of the host
/// is looked up here: a program may load llama.cpp long after start-up
/// (ctypes), so the host's functions are found when first called and the
/// version guard runs at the first graph.
extern "C" fn at_load() {
    let _ = catch_unwind(|| {
        interpose::init_dlsym();
        let Some(cfg) = config() else { return };
        log(&format!(
            "loaded: tensors {}, layers {}, rows {}; frames go to a listener at {}",
            cfg.tensors,
            cfg.layers_text,
            if cfg.last_only { "last" } else { "all" },
            cfg.sink
        ));
    });
}

#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_is_remembered_per_name_and_agrees_with_the_patterns() {
        let cfg = Config::from_lookup(|k| {
            (k == "LATENT_TAP_TENSORS").then(|| "attn_out-*,l_out-*".to_string())
        })
        .unwrap();
        let mut st = State::default();
        for _ in 0..3 {
            for name in [&b"l_out-3"[..], b"attn_out-0", b"norm-2", b"l_out-3"] {
                assert_eq!(st.selected(&cfg, name), cfg.select(name), "{name:?}");
            }
        }
        // Three distinct names, each matched once.
        assert_eq!(st.names.len(), 3);
        assert_eq!(st.names.get(&b"norm-2"[..]), Some(&None));
    }
}
