//! Finding the host's definition of a function at the moment it is first
//! needed, wherever and however the host loaded it.
//!
//! A program linked against libllama has it loaded before this library's
//! functions are first called, and `dlsym(RTLD_NEXT)` finds its definitions.
//! A program that loads libllama later with `dlopen(RTLD_LOCAL)` (Python's
//! ctypes, as llama-cpp-python does; node-llama-cpp) differs twice:
//!
//! - its libraries are not in the global scope, so `RTLD_NEXT` (and
//!   `RTLD_DEFAULT`) find nothing, yet libllama's calls into libggml-base
//!   still bind to this library first (a library's own lookups start with the
//!   global scope, where `LD_PRELOAD` put this one): [`resolve`] then asks
//!   every loaded object (`dl_iterate_phdr`, `dlopen(path, RTLD_NOLOAD)`,
//!   `dlsym(handle)`), skipping this library's own definitions;
//! - it calls llama.cpp through pointers from `dlsym(handle, "llama_decode")`,
//!   which bypass this library entirely: this library defines `dlsym` too
//!   ([`dlsym_impl`]) and, for the names it interposes, hands out its own
//!   function after noting the host's as the one to forward to.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// glibc's `dlsym` (0 until first needed).
static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// glibc's own `dlsym`, found with `dlvsym` (which this library does not
/// define) under the versions glibc has exported it with.
pub fn real_dlsym() -> Option<DlsymFn> {
    let mut p = REAL_DLSYM.load(Ordering::Acquire);
    if p == 0 {
        for v in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
            // SAFETY: NUL-terminated strings; dlvsym has no other preconditions.
            p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), v.as_ptr()) } as usize;
            if p != 0 {
                break;
            }
        }
        REAL_DLSYM.store(p, Ordering::Release);
    }
    // SAFETY: 0 or glibc's dlsym, whose signature is `DlsymFn`.
    unsafe { std::mem::transmute::<usize, Option<DlsymFn>>(p) }
}

/// Base address of the object holding `p` (0: none).
fn object_of(p: usize) -> usize {
    // SAFETY: all-zero is a valid Dl_info.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables; `info` is a valid out-parameter.
    if unsafe { libc::dladdr(p as *const c_void, &mut info) } == 0 {
        return 0;
    }
    info.dli_fbase as usize
}

/// Base address of this library (or of the executable it is linked into).
fn this_object() -> usize {
    static BASE: AtomicUsize = AtomicUsize::new(0);
    let mut b = BASE.load(Ordering::Relaxed);
    if b == 0 {
        b = object_of(this_object as *const () as usize);
        BASE.store(b, Ordering::Relaxed);
    }
    b
}

/// Paths of the loaded objects other than the executable and this library.
fn loaded_objects() -> Vec<CString> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Vec` passed below, `info` the loader's entry,
        // valid for this call.
        let (v, info) = unsafe { (&mut *(data as *mut Vec<(usize, CString)>), &*info) };
        if !info.dlpi_name.is_null() {
            // SAFETY: the loader's NUL-terminated path.
            let name = unsafe { CStr::from_ptr(info.dlpi_name) };
            if !name.is_empty() {
                v.push((info.dlpi_addr as usize, name.to_owned()));
            }
        }
        0
    }
    let mut v: Vec<(usize, CString)> = Vec::new();
    // SAFETY: `each` only pushes into `v`, which outlives the call; no
    // loader function is called from inside the iteration.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut v as *mut _ as *mut c_void) };
    let me = this_object();
    v.into_iter()
        .filter(|(base, _)| *base != me)
        .map(|(_, n)| n)
        .collect()
}

/// The host's definition of `name`: not `ours` and not in this library.
/// First `dlsym(RTLD_NEXT)`, then every loaded object (libraries opened with
/// `RTLD_LOCAL`). `None`: nowhere in the process (yet).
pub fn resolve(name: &CStr, ours: usize) -> Option<usize> {
    let real = real_dlsym()?;
    let me = this_object();
    let usable = |p: usize| p != 0 && p != ours && object_of(p) != me;
    // SAFETY: NUL-terminated name; called from this library, so RTLD_NEXT
    // means "after this library".
    let p = unsafe { real(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    if usable(p) {
        return Some(p);
    }
    for path in loaded_objects() {
        // SAFETY: NOLOAD only takes a reference on an object already loaded.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        if h.is_null() {
            continue;
        }
        // SAFETY: a live handle; NUL-terminated name.
        let p = unsafe { real(h, name.as_ptr()) } as usize;
        // SAFETY: drops the reference taken above; the object stays loaded
        // (the host holds it), so `p` stays valid.
        unsafe { libc::dlclose(h) };
        if usable(p) {
            return Some(p);
        }
    }
    None
}

/// The body of this library's `dlsym`: glibc's answer, except that for a
/// name this library interposes, looked up in a handle of the host's, it
/// returns this library's function and remembers the host's as the one to
/// forward to (`lookup` gives both for a name).
///
/// # Safety
///
/// As `dlsym`.
pub unsafe fn dlsym_impl(
    handle: *mut c_void,
    name: *const c_char,
    lookup: fn(&[u8]) -> Option<(usize, &'static AtomicUsize)>,
) -> *mut c_void {
    let Some(real) = real_dlsym() else {
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's arguments, as dlsym's.
    let p = unsafe { real(handle, name) };
    if p.is_null() || name.is_null() || handle == libc::RTLD_DEFAULT || handle == libc::RTLD_NEXT {
        return p;
    }
    // SAFETY: dlsym found a symbol of this name, so it is NUL-terminated.
    let n = unsafe { CStr::from_ptr(name) };
    let Some((ours, slot)) = lookup(n.to_bytes()) else {
        return p;
    };
    let p = p as usize;
    if p == ours || object_of(p) == this_object() {
        return p as *mut c_void;
    }
    let _ = slot.compare_exchange(0, p, Ordering::AcqRel, Ordering::Acquire);
    if slot.load(Ordering::Acquire) == p {
        ours as *mut c_void
    } else {
        // Another library's definition than the one the tap forwards to:
        // the host gets it untouched.
        p as *mut c_void
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libcs_functions_and_not_its_own() {
        assert!(real_dlsym().is_some());
        let p = resolve(c"getpid", 0).expect("getpid");
        assert_ne!(object_of(p), this_object());
        assert!(resolve(c"latent_tap_no_such_function", 0).is_none());
    }
}
