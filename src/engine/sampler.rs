//! RAII wrapper over a llama.cpp sampler chain.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::error::Result;
use crate::settings;

/// Sampling settings. `temperature <= 0` means greedy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: i32,
    /// Nucleus sampling threshold (1.0: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Random seed for the final draw.
    pub seed: u32,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

/// An owned sampler chain.
#[derive(Debug)]
pub struct Sampler {
    ptr: NonNull<sys::llama_sampler>,
}

// SAFETY: a sampler chain is plain owned state, used from one thread at a time.
unsafe impl Send for Sampler {}

impl Sampler {
    /// Build llama.cpp's chain for `opts`.
    pub fn new(opts: &SamplingOptions) -> Self {
        // SAFETY: llama.cpp constructors return owned samplers; the chain takes ownership
        // of each one added to it.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            if opts.temperature <= 0.0 {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy());
            } else {
                if opts.top_k > 0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_k(opts.top_k));
                }
                if opts.top_p < 1.0 {
                    sys::llama_sampler_chain_add(
                        chain,
                        sys::llama_sampler_init_top_p(opts.top_p, 1),
                    );
                }
                if opts.min_p > 0.0 {
                    sys::llama_sampler_chain_add(
                        chain,
                        sys::llama_sampler_init_min_p(opts.min_p, 1),
                    );
                }
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_temp(opts.temperature));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(opts.seed));
            }
            Self {
                ptr: NonNull::new(chain).expect("llama_sampler_chain_init returned NULL"),
            }
        }
    }

    pub(crate) fn as_ptr(&mut self) -> *mut sys::llama_sampler {
        self.ptr.as_ptr()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: we own the chain, which frees the samplers added to it.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) }
    }
}

impl SamplingOptions {
    /// Check the bounds ([`settings::check_sampling`]).
    pub fn validate(&self) -> Result<()> {
        settings::check_sampling(self.temperature, self.top_p, self.top_k, self.min_p)
    }
}
