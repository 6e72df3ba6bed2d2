//! The host's llama.cpp/ggml as this library sees it: a mirror of the few
//! public structs it reads, and the functions it calls, all resolved at run
//! time with `dlsym` (this library links no llama.cpp of its own; see
//! [`crate::resolve`]).

use std::ffi::{c_char, c_void};
use std::sync::OnceLock;

/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// `GGML_MAX_SRC`.
pub const MAX_SRC: usize = 10;
/// `GGML_MAX_NAME`.
pub const MAX_NAME: usize = 64;
/// `sizeof(struct ggml_object)`: `ggml_tensor_overhead()` minus the tensor.
pub const OBJECT_SIZE: usize = 32;

/// `GGML_TYPE_F32`.
pub const TYPE_F32: i32 = 0;
/// `GGML_TYPE_F16`.
pub const TYPE_F16: i32 = 1;
/// `GGML_TYPE_BF16`.
pub const TYPE_BF16: i32 = 30;
/// `GGML_TYPE_I32`.
pub const TYPE_I32: i32 = 26;

/// `struct ggml_tensor` (ggml.h), unchanged in layout across the llama.cpp
/// releases this library targets; [`Host::check_layout`] verifies it against
/// the host before anything is read through it.
#[repr(C)]
#[derive(Debug)]
pub struct Tensor {
    pub typ: i32,
    pub buffer: *mut c_void,
    pub ne: [i64; MAX_DIMS],
    pub nb: [usize; MAX_DIMS],
    pub op: i32,
    pub op_params: [i32; 16],
    pub flags: i32,
    pub src: [*mut Tensor; MAX_SRC],
    pub view_src: *mut Tensor,
    pub view_offs: usize,
    pub data: *mut c_void,
    pub name: [u8; MAX_NAME],
    pub extra: *mut c_void,
    pub padding: [u8; 8],
}

impl Tensor {
    /// The name up to its NUL.
    pub fn name(&self) -> &[u8] {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(MAX_NAME);
        &self.name[..end]
    }
}

/// `struct llama_batch` (llama.h), passed by value to `llama_decode`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LlamaBatch {
    pub n_tokens: i32,
    pub token: *mut i32,
    pub embd: *mut f32,
    pub pos: *mut i32,
    pub n_seq_id: *mut i32,
    pub seq_id: *mut *mut i32,
    pub logits: *mut i8,
}

/// `struct llama_embd` (llama.h, extended batch API), passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LlamaEmbd {
    pub data: *const f32,
    pub n_rows: usize,
    pub n_embd: usize,
}

/// `ggml_backend_sched_eval_callback`.
pub type EvalCallback = Option<unsafe extern "C" fn(*mut Tensor, bool, *mut c_void) -> bool>;

macro_rules! host_fns {
    ($( $field:ident : $name:literal => fn($($arg:ty),*) $(-> $ret:ty)? ;)*) => {
        /// The host's ggml functions this library calls.
        #[derive(Debug, Clone, Copy)]
        pub struct Host {
            $( pub $field: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
        }

        impl Host {
            /// Resolve every function, or name the first one missing.
            fn resolve() -> Result<Self, &'static str> {
                Ok(Self {
                    $( $field: {
                        let Some(p) = crate::resolve::resolve($name, 0) else {
                            return Err($name.to_str().unwrap_or("?"));
                        };
                        // SAFETY: the symbol is the host's function of this
                        // name, whose C signature (ggml.h / ggml-backend.h)
                        // is the one declared here.
                        unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p) }
                    }, )*
                })
            }
        }
    };
}

host_fns! {
    set_eval_callback: c"ggml_backend_sched_set_eval_callback" => fn(*mut c_void, EvalCallback, *mut c_void);
    compute_async: c"ggml_backend_sched_graph_compute_async" => fn(*mut c_void, *mut c_void) -> i32;
    compute: c"ggml_backend_sched_graph_compute" => fn(*mut c_void, *mut c_void) -> i32;
    tensor_get: c"ggml_backend_tensor_get" => fn(*const Tensor, *mut c_void, usize, usize);
    buffer_is_host: c"ggml_backend_buffer_is_host" => fn(*mut c_void) -> bool;
    graph_n_nodes: c"ggml_graph_n_nodes" => fn(*mut c_void) -> i32;
    graph_node: c"ggml_graph_node" => fn(*mut c_void, i32) -> *mut Tensor;
    graph_get_tensor: c"ggml_graph_get_tensor" => fn(*mut c_void, *const c_char) -> *mut Tensor;
    tensor_overhead: c"ggml_tensor_overhead" => fn() -> usize;
    nelements: c"ggml_nelements" => fn(*const Tensor) -> i64;
    get_name: c"ggml_get_name" => fn(*const Tensor) -> *const c_char;
}

/// The host's functions, resolved once, at the first graph the host computes
/// (by then it has loaded ggml, however late); `Err` names the first missing
/// one (the host is not a shared-library llama.cpp build this library can
/// serve).
pub fn host() -> Result<&'static Host, &'static str> {
    static HOST: OnceLock<Result<Host, &'static str>> = OnceLock::new();
    HOST.get_or_init(Host::resolve).as_ref().map_err(|e| *e)
}

impl Host {
    /// Whether the host's `struct ggml_tensor` is laid out as [`Tensor`]:
    /// its size (from `ggml_tensor_overhead`), and for a real tensor of the
    /// host the address of `name` and the element count read through the
    /// mirror. `Err` says what differs.
    ///
    /// # Safety
    ///
    /// `t` must point to a live tensor of the host.
    pub unsafe fn check_layout(&self, t: *const Tensor) -> Result<(), String> {
        // SAFETY: plain query without arguments.
        let overhead = unsafe { (self.tensor_overhead)() };
        if overhead != std::mem::size_of::<Tensor>() + OBJECT_SIZE {
            return Err(format!(
                "ggml_tensor_overhead() is {overhead}, expected {}",
                std::mem::size_of::<Tensor>() + OBJECT_SIZE
            ));
        }
        // SAFETY: `t` is a live host tensor (caller), of at least the size just
        // checked; the two host functions only read it.
        unsafe {
            let name = (self.get_name)(t) as *const u8;
            let mine = std::ptr::addr_of!((*t).name) as *const u8;
            if name != mine {
                return Err("ggml_get_name() does not point at the mirrored name field".into());
            }
            let n: i64 = (*t).ne.iter().product();
            let theirs = (self.nelements)(t);
            if n != theirs {
                return Err(format!(
                    "element count {n} through the mirror, {theirs} by ggml_nelements()"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_mirror_has_ggmls_size() {
        // sizeof(struct ggml_tensor) on 64-bit targets, for every llama.cpp
        // release since the `grad` fields left the struct.
        assert_eq!(std::mem::size_of::<Tensor>(), 336);
        assert_eq!(std::mem::offset_of!(Tensor, name), 256);
        assert_eq!(std::mem::offset_of!(Tensor, data), 248);
        assert_eq!(std::mem::offset_of!(Tensor, src), 152);
        assert_eq!(std::mem::offset_of!(Tensor, ne), 16);
        assert_eq!(std::mem::offset_of!(Tensor, nb), 48);
        assert_eq!(std::mem::offset_of!(LlamaBatch, logits), 48);
        assert_eq!(std::mem::size_of::<LlamaBatch>(), 56);
    }
}
