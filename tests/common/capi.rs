//! Helpers for tests that call the C API as a C program would.

use std::ffi::CStr;

use latent_tap::ffi::lt_last_error;

/// The library's last error message on this thread.
pub fn last_error() -> String {
    // SAFETY: lt_last_error never returns NULL.
    unsafe { CStr::from_ptr(lt_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A zeroed struct of the API with its `struct_size` set, as a C caller does.
pub fn sized<T>() -> T {
    // SAFETY: the API's structs are POD; zero is a valid bit pattern for all fields.
    let mut v: T = unsafe { std::mem::zeroed() };
    // SAFETY: every sized struct starts with a u32 struct_size.
    unsafe { (&mut v as *mut T as *mut u32).write(std::mem::size_of::<T>() as u32) };
    v
}
