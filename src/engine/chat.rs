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

/// The names of llama.cpp's built-in chat templates (`chatml`, `gemma`,
/// `llama3`, …), as [`apply_chat_template`] accepts them.
pub fn builtin_chat_templates() -> Vec<String> {
    // SAFETY: a NULL output with length 0 only asks for the count.
    let n = unsafe { sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0) };
    let mut names: Vec<*const c_char> = vec![std::ptr::null(); n.max(0) as usize];
    // SAFETY: `names` has room for `names.len()` pointers; llama.cpp fills them
    // with static NUL-terminated strings.
    let n = unsafe { sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    names
        .iter()
        .take(n.max(0) as usize)
        .filter(|p| !p.is_null())
        .map(|&p| {
            // SAFETY: non-NULL entries are llama.cpp's static NUL-terminated names.
            let name = unsafe { std::ffi::CStr::from_ptr(p) };
            name.to_string_lossy().into_owned()
        })
        .collect()
}

/// Whether llama.cpp's built-in engine can render with `tmpl`: a built-in name,
/// or a template text it recognises by its content (it cannot run Jinja).
pub fn chat_template_supported(tmpl: &str) -> bool {
    apply_chat_template(tmpl, &[("user".into(), "hi".into())], true).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names_and_recognised_texts() {
        let names = builtin_chat_templates();
        for n in ["chatml", "gemma", "llama3"] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
            assert!(chat_template_supported(n));
        }
        let msgs = [("user".to_string(), "Hi".to_string())];
        assert_eq!(
            apply_chat_template("gemma", &msgs, true).unwrap(),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        // Recognised by content (Gemma's Jinja template mentions its turn markers).
        assert!(chat_template_supported(
            "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        ));
        assert!(!chat_template_supported("gemmaa"));
        assert!(!chat_template_supported("{{ messages }}"));
    }
}
