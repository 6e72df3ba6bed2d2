//! RAII wrapper over `llama_model` plus its vocabulary helpers.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use super::backend;
use crate::error::{Error, ErrorKind, Result};
use crate::settings;

/// Token id as llama.cpp uses it.
pub type Token = i32;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Layers to offload to a GPU backend or RPC workers (negative: all).
    /// Ignored on CPU-only builds without `rpc_servers`.
    pub n_gpu_layers: i32,
    /// llama.cpp RPC workers (`HOST:PORT`, see [`crate::rpc::parse_servers`])
    /// whose devices take offloaded layers, as llama-server's `--rpc`.
    pub rpc_servers: Vec<String>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            n_gpu_layers: -1,
            rpc_servers: Vec::new(),
        }
    }
}

/// A loaded GGUF model. Shared through `Arc` so that no context outlives it.
#[derive(Debug)]
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    path: PathBuf,
    // False for a model borrowed from an app (C plugin mode): not ours to free.
    owned: bool,
}

// SAFETY: llama_model is immutable after loading and llama.cpp allows using one model
// from several contexts on several threads.
unsafe impl Send for Model {}
// SAFETY: see above; all methods take &self and only read the model.
unsafe impl Sync for Model {}

impl Model {
    /// Load a GGUF model. Missing, unreadable, truncated or non-GGUF files, and
    /// hyperparameters llama.cpp would abort on (see [`crate::gguf`]), give an
    /// [`ErrorKind::ModelLoad`] error with a one-line reason.
    pub fn load(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Arc<Self>> {
        let path = path.as_ref();
        opts.validate()?;
        crate::gguf::check_file(path)?;
        backend::init();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::new(ErrorKind::ModelLoad, "model path contains a NUL byte"))?;
        // SAFETY: plain value returned by llama.cpp.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = opts.n_gpu_layers;
        // Null-terminated; must live until the load returns.
        let mut devices = super::rpc::model_devices(&opts.rpc_servers)?;
        if let Some(d) = devices.as_mut() {
            d.push(std::ptr::null_mut());
            params.devices = d.as_mut_ptr();
        }
        backend::take_last_llama_error(); // only this load's lines may explain its failure
                                          // SAFETY: c_path is a valid NUL-terminated string; params is a valid struct.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), params) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            let why = backend::take_last_llama_error()
                .unwrap_or_else(|| "llama.cpp could not load it".into());
            Error::new(
                ErrorKind::ModelLoad,
                format!(
                    "cannot load model {}: {why} (run with LATENT_TAP_LOG=1 to see llama.cpp's log)",
                    path.display()
                ),
            )
        })?;
        Ok(Arc::new(Self {
            ptr,
            path: path.to_path_buf(),
            owned: true,
        }))
    }

    /// Wrap a model that an application loaded itself; it is never freed here.
    ///
    /// # Safety
    /// `ptr` must be a valid `llama_model` that outlives every use of the result.
    pub(crate) unsafe fn borrow_raw(ptr: *mut sys::llama_model) -> Arc<Self> {
        Arc::new(Self {
            ptr: NonNull::new(ptr).expect("borrow_raw: NULL model"),
            path: PathBuf::from("<app model>"),
            owned: false,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model pointer is valid for self's lifetime.
        unsafe { sys::llama_model_get_vocab(self.as_ptr()) }
    }

    /// Path the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of transformer layers.
    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_layer(self.as_ptr()) as usize }
    }

    /// Width of the residual stream.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_embd(self.as_ptr()) as usize }
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer owned by the model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) as usize }
    }

    /// A metadata string, e.g. `general.architecture`.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf is writable for buf.len() bytes; key is NUL-terminated.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    /// Architecture name from the GGUF metadata.
    pub fn arch(&self) -> String {
        self.meta("general.architecture").unwrap_or_default()
    }

    /// Tokenize `text`, adding BOS when the model asks for it.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<Token>> {
        self.tokenize_ext(text, add_special, false)
    }

    /// Tokenize `text`; `parse_special` turns control-token text (`<bos>`,
    /// `<start_of_turn>`…) into those tokens, as llama-server does for prompts.
    pub fn tokenize_ext(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).map_err(|_| Error::invalid("prompt is too long"))?;
        let mut out = vec![0; text.len() + 8];
        for _ in 0..2 {
            // SAFETY: text is valid for len bytes; out is writable for out.len() tokens.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const c_char,
                    len,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            out.resize((-n) as usize, 0);
        }
        Err(Error::new(
            ErrorKind::Internal,
            "tokenizer did not converge",
        ))
    }

    /// The text of one token (raw bytes; may be a partial UTF-8 sequence).
    /// Control tokens render as nothing.
    pub fn token_bytes(&self, token: Token) -> Vec<u8> {
        self.piece(token, false)
    }

    /// The token's text with control tokens rendered (`<bos>`, `<end_of_turn>`…).
    pub fn token_bytes_special(&self, token: Token) -> Vec<u8> {
        self.piece(token, true)
    }

    fn piece(&self, token: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        loop {
            // SAFETY: buf is writable for buf.len() bytes.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// The most bytes of prompt text one token can stand for, when every byte
    /// of a prompt ends up in some token: the longest text a token renders to
    /// (control tokens included, as prompts parse them). `None` when the
    /// tokenizer may drop or merge text: WordPiece and Unigram (they collapse
    /// whitespace), RWKV and other types, a token that strips the whitespace
    /// next to it (lstrip/rstrip), and a BPE vocabulary without a token for
    /// every byte (llama.cpp's BPE drops a byte it has no token for).
    /// SentencePiece gives every byte it has no piece for a byte token. One pass
    /// over the vocabulary (what [`crate::sched::Scheduler`] does once).
    pub fn max_token_text_bytes(&self) -> Option<usize> {
        let vocab = self.vocab();
        // SAFETY: valid vocab pointer.
        let kind = unsafe { sys::llama_vocab_type(vocab) };
        if kind != sys::LLAMA_VOCAB_TYPE_SPM && kind != sys::LLAMA_VOCAB_TYPE_BPE {
            return None;
        }
        let strips = sys::LLAMA_TOKEN_ATTR_LSTRIP | sys::LLAMA_TOKEN_ATTR_RSTRIP;
        let mut bytes = [false; 256];
        let mut longest = 0;
        for t in 0..self.n_vocab() as Token {
            // SAFETY: valid vocab pointer; t is in range.
            if unsafe { sys::llama_vocab_get_attr(vocab, t) } & strips != 0 {
                return None;
            }
            let piece = self.token_bytes_special(t);
            if let [b] = piece[..] {
                bytes[b as usize] = true;
            }
            longest = longest.max(piece.len());
        }
        let every_byte = kind == sys::LLAMA_VOCAB_TYPE_SPM || bytes.iter().all(|&b| b);
        (every_byte && longest > 0).then_some(longest)
    }

    /// The token's text, lossily decoded as UTF-8.
    pub fn token_piece(&self, token: Token) -> String {
        String::from_utf8_lossy(&self.token_bytes(token)).into_owned()
    }

    /// The chat template stored in the GGUF, if any.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: valid model; NULL name asks for the default template; the returned
        // string (if any) lives as long as the model.
        let p = unsafe { sys::llama_model_chat_template(self.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: llama.cpp returns a NUL-terminated string owned by the model.
        let s = unsafe { std::ffi::CStr::from_ptr(p) };
        Some(s.to_string_lossy().into_owned())
    }

    /// True when `token` ends generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: we own the pointer; every Context holds an Arc<Model>, so none is alive.
            unsafe { sys::llama_model_free(self.as_ptr()) }
        }
    }
}

impl ModelOptions {
    /// Check the bounds: `n_gpu_layers` is -1 (all) or at least 0.
    pub fn validate(&self) -> Result<()> {
        settings::check_gpu_layers(self.n_gpu_layers)?;
        if !self.rpc_servers.is_empty() {
            crate::rpc::parse_servers(&self.rpc_servers.join(","))?;
        }
        Ok(())
    }
}
