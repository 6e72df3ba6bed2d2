//! Chat messages → prompt text with llama.cpp's built-in template engine.

use std::ffi::{c_char, CString};

use llama_cpp_sys_2 as sys;

use crate::error::{Error, Result};

/// Render `(role, content)` messages with template `tmpl` (a template text from
/// a GGUF, or a built-in name such as `chatml`); `add_assistant` opens the
/// assistant's turn.
pub fn apply_chat_template(
    tmpl: &str,
    messages: &[(String, String)],
    add_assistant: bool,
) -> Result<String> {
    let nul = |what: &str| Error::invalid(format!("{what} contains a NUL byte"));
    let c_tmpl = CString::new(tmpl).map_err(|_| nul("the chat template"))?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|(r, c)| {
            Ok((
                CString::new(r.as_str()).map_err(|_| nul("a message role"))?,
                CString::new(c.as_str()).map_err(|_| nul("a message"))?,
            ))
        })
        .collect::<Result<_>>()?;
    let msgs: Vec<sys::llama_chat_message> = owned
        .iter()
        .map(|(r, c)| sys::llama_chat_message {
            role: r.as_ptr(),
            content: c.as_ptr(),
        })
        .collect();
    let total: usize = messages.iter().map(|(r, c)| r.len() + c.len()).sum();
    let mut buf = vec![0u8; total * 2 + 256];
    for _ in 0..2 {
        let len =
            i32::try_from(buf.len()).map_err(|_| Error::invalid("the conversation is too long"))?;
        // SAFETY: every pointer is a valid NUL-terminated string alive for the call;
        // buf is writable for len bytes.
        let n = unsafe {
            sys::llama_chat_apply_template(
                c_tmpl.as_ptr(),
                msgs.as_ptr(),
                msgs.len(),
                add_assistant,
                buf.as_mut_ptr() as *mut c_char,
                len,
            )
        };
        if n < 0 {
            return Err(Error::invalid(
                "the model's chat template is not one llama.cpp's built-in template engine supports",
            ));
        }
        let n = n as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return String::from_utf8(buf)
                .map_err(|_| Error::invalid("the rendered chat is not valid UTF-8"));
        }
        buf.resize(n, 0);
    }
    Err(Error::invalid("chat template output did not converge"))
}
