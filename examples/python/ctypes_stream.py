#!/usr/bin/env python3
"""Mode 1 from Python through ctypes + numpy: same arguments and same output as
examples/c/generate.c.

    python3 examples/python/ctypes_stream.py model.gguf "The capital of France is" 8

The library is LATENT_TAP_LIB, else target/c-install/lib/liblatent_tap.so under
the repository root (scripts/install-c builds it). Frames are numpy views of
the ring (no copy), shaped [n_rows, width]; like every lt_event pointer they
are valid only until the next lt_session_next / lt_session_release call.
"""

import ctypes
import os
import sys
from ctypes import (
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- latent_tap.h

LT_VERSION_MAJOR = 0

LT_EVENT_FRAME = 1
LT_EVENT_TOKEN = 2
LT_EVENT_END = 3
LT_ROWS_ALL = 0
LT_ROWS_LAST = 1
LT_DTYPE_F32 = 0
LT_DTYPE_F16 = 1
LT_DTYPE_BF16 = 2
LT_ROW_PROMPT = 1

LT_OK = 0
LT_TIMEOUT = 10
LT_END = 11

lt_status = ctypes.c_int32  # typedef int32_t lt_status


class lt_capture_params(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("rows", c_uint32),
        ("patterns", c_char_p),
        ("layers", c_char_p),
        ("dtype", c_uint32),
        ("policy", c_uint32),
        ("ring_bytes", c_uint64),
        ("block_timeout_ms", c_uint32),
        ("reserved", c_uint32),
    ]


class lt_context_params(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("n_ctx", c_uint32),
        ("n_batch", c_uint32),
        ("n_ubatch", c_uint32),
        ("n_threads", c_int32),
        ("n_gpu_layers", c_int32),
        ("f32_kv", c_uint32),
        ("reserved", c_uint32),
    ]


class lt_sampling_params(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("n_predict", c_uint32),
        ("temperature", c_float),
        ("top_k", c_int32),
        ("top_p", c_float),
        ("seed", c_uint32),
        ("report_top_k", c_uint32),
        ("reserved", c_uint32),
    ]


class lt_frame_header(Structure):
    _fields_ = [
        ("kind", c_uint32),
        ("header_size", c_uint32),
        ("seq", c_uint64),
        ("step", c_uint32),
        ("ubatch", c_uint32),
        ("tensor_index", c_uint32),
        ("layer", c_int32),
        ("dtype", c_uint32),
        ("n_rows", c_uint32),
        ("width", c_uint64),
        ("ne", c_int64 * 4),
        ("name", c_uint8 * 64),
    ]


class lt_row_meta(Structure):
    _fields_ = [
        ("seq_id", c_int32),
        ("pos", c_int32),
        ("token", c_int32),
        ("flags", c_uint32),
    ]


class lt_token_header(Structure):
    _fields_ = [
        ("kind", c_uint32),
        ("header_size", c_uint32),
        ("step", c_uint32),
        ("seq_id", c_int32),
        ("pos", c_int32),
        ("token", c_int32),
        ("flags", c_uint32),
        ("n_top", c_uint32),
        ("logprob", c_float),
        ("entropy", c_float),
        ("piece_len", c_uint32),
        ("reserved", c_uint32),
    ]


class lt_top_entry(Structure):
    _fields_ = [("id", c_int32), ("logprob", c_float)]


class lt_event(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("kind", c_uint32),
        ("frame", POINTER(lt_frame_header)),
        ("rows", POINTER(lt_row_meta)),
        ("data", c_void_p),
        ("data_len", c_size_t),
        ("token", POINTER(lt_token_header)),
        ("top", POINTER(lt_top_entry)),
        ("piece", POINTER(c_char)),
        ("end_frames", c_uint64),
        ("end_drops", c_uint64),
        ("end_status", lt_status),
        ("reserved", c_uint32),
        ("end_message", ctypes.c_char_p),
    ]


# Layouts written out from the header (x86-64 / aarch64 LP64), checked here so a
# header change that this file missed fails loudly instead of reading garbage.
assert ctypes.sizeof(lt_capture_params) == 48
assert ctypes.sizeof(lt_context_params) == 32
assert ctypes.sizeof(lt_sampling_params) == 32
assert ctypes.sizeof(lt_frame_header) == 144
assert ctypes.sizeof(lt_row_meta) == 16
assert ctypes.sizeof(lt_token_header) == 48
assert ctypes.sizeof(lt_top_entry) == 8
assert ctypes.sizeof(lt_event) == 96


def load_library():
    path = os.environ.get("LATENT_TAP_LIB")
    if not path:
        root = Path(__file__).resolve().parent.parent.parent
        path = str(root / "target" / "c-install" / "lib" / "liblatent_tap.so")
    lib = ctypes.CDLL(path)
    proto = [
        ("lt_status_str", c_char_p, [ctypes.c_int32]),
        ("lt_last_error", c_char_p, []),
        ("lt_version", c_uint32, []),
        ("lt_capture_params_default", lt_status, [POINTER(lt_capture_params)]),
        ("lt_context_params_default", lt_status, [POINTER(lt_context_params)]),
        ("lt_sampling_params_default", lt_status, [POINTER(lt_sampling_params)]),
        ("lt_model_new", lt_status, [c_char_p, POINTER(lt_context_params), POINTER(c_void_p)]),
        ("lt_model_free", None, [c_void_p]),
        ("lt_session_new", lt_status,
         [c_void_p, POINTER(lt_context_params), POINTER(lt_capture_params), POINTER(c_void_p)]),
        ("lt_session_free", None, [c_void_p]),
        ("lt_session_submit", lt_status, [c_void_p, c_char_p, POINTER(lt_sampling_params)]),
        ("lt_session_next", lt_status, [c_void_p, c_uint32, POINTER(lt_event)]),
        ("lt_session_release", lt_status, [c_void_p]),
    ]
    for name, restype, argtypes in proto:
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


class LtError(Exception):
    def __init__(self, lib, what, status):
        self.status = status
        super().__init__(
            f"{what}: {lib.lt_status_str(status).decode()}: {lib.lt_last_error().decode(errors='replace')}"
        )


def check(lib, what, status):
    if status != LT_OK:
        raise LtError(lib, what, status)


def check_size(what, written, struct):
    """The library writes sizeof() of its struct: it must equal ours."""
    if written != ctypes.sizeof(struct):
        raise RuntimeError(
            f"{what}: library says {written} bytes, ctypes declares {ctypes.sizeof(struct)}"
        )


def frame_array(ev):
    """The frame payload as a numpy view [n_rows, width] (zero-copy)."""
    f = ev.frame.contents
    shape = (f.n_rows, f.width)
    ctype = {LT_DTYPE_F32: c_float, LT_DTYPE_F16: c_uint16, LT_DTYPE_BF16: c_uint16}[f.dtype]
    n = f.n_rows * f.width
    assert ev.data_len >= n * ctypes.sizeof(ctype), "payload shorter than n_rows * width"
    if n == 0:
        return np.empty(shape, dtype=np.float32)
    arr = np.ctypeslib.as_array(ctypes.cast(ev.data, POINTER(ctype)), shape=shape)
    if f.dtype == LT_DTYPE_F16:
        arr = arr.view(np.float16)
    # bf16 stays uint16 bits; (arr.astype(np.uint32) << 16).view(np.float32) converts (copying).
    assert arr.ctypes.data == ev.data and not arr.flags.owndata, "frame was copied"
    return arr


def row_l2(arr):
    """L2 norm of each row, accumulated in double like generate.c."""
    if arr.dtype == np.uint16:  # bf16 bits
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    a = arr.astype(np.float64)  # a double copy for the arithmetic only
    return np.sqrt(np.einsum("ij,ij->i", a, a))


def frame_name(f):
    raw = bytes(f.name)
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def main(argv):
    if len(argv) < 4:
        sys.stderr.write(f"usage: {argv[0]} MODEL.gguf PROMPT N_PREDICT\n")
        return 2
    lib = load_library()
    if lib.lt_version() >> 16 != LT_VERSION_MAJOR:
        raise RuntimeError(f"library ABI major {lib.lt_version() >> 16} != {LT_VERSION_MAJOR}")

    # Every struct carries its size, so the library and this file can grow apart.
    cp, cap, sp = lt_context_params(), lt_capture_params(), lt_sampling_params()
    for s in (cp, cap, sp):
        s.struct_size = ctypes.sizeof(s)
    check(lib, "lt_context_params_default", lib.lt_context_params_default(ctypes.byref(cp)))
    check(lib, "lt_capture_params_default", lib.lt_capture_params_default(ctypes.byref(cap)))
    check(lib, "lt_sampling_params_default", lib.lt_sampling_params_default(ctypes.byref(sp)))
    check_size("lt_context_params", cp.struct_size, lt_context_params)
    check_size("lt_capture_params", cap.struct_size, lt_capture_params)
    check_size("lt_sampling_params", sp.struct_size, lt_sampling_params)
    patterns = b"l_out-*"  # kept alive: cap.patterns points into it
    cp.n_ctx = 512
    cap.patterns = patterns
    cap.rows = LT_ROWS_LAST
    sp.n_predict = int(argv[3])
    sp.report_top_k = 3

    model, session = c_void_p(), c_void_p()
    out = sys.stdout
    try:
        check(lib, "lt_model_new", lib.lt_model_new(argv[1].encode(), ctypes.byref(cp), ctypes.byref(model)))
        check(lib, "lt_session_new",
              lib.lt_session_new(model, ctypes.byref(cp), ctypes.byref(cap), ctypes.byref(session)))
        check(lib, "lt_session_submit", lib.lt_session_submit(session, argv[2].encode(), ctypes.byref(sp)))
        ev = lt_event()
        ev.struct_size = ctypes.sizeof(ev)
        while True:
            st = lib.lt_session_next(session, 1000, ctypes.byref(ev))
            if st == LT_TIMEOUT:
                continue
            check(lib, "lt_session_next", st)
            check_size("lt_event", ev.struct_size, lt_event)
            if ev.kind == LT_EVENT_FRAME:
                f = ev.frame.contents
                check_size("lt_frame_header", f.header_size, lt_frame_header)
                name = frame_name(f)
                norms = row_l2(frame_array(ev))
                for r in range(f.n_rows):
                    row = ev.rows[r]
                    out.write(f"frame name={name} step={f.step} seq={row.seq_id} pos={row.pos} l2={norms[r]:.6f}\n")
            elif ev.kind == LT_EVENT_TOKEN:
                t = ev.token.contents
                check_size("lt_token_header", t.header_size, lt_token_header)
                if t.flags & LT_ROW_PROMPT:
                    continue
                out.write(f"token step={t.step} seq={t.seq_id} pos={t.pos} id={t.token} logprob={t.logprob:.6f}\n")
            elif ev.kind == LT_EVENT_END:
                out.write(f"end frames={ev.end_frames} drops={ev.end_drops}\n")
                out.flush()
                if ev.end_status != 0:
                    status = lib.lt_status_str(ev.end_status).decode()
                    sys.stderr.write(f"error: generation: {status}: {ev.end_message.decode(errors='replace')}\n")
                    return 1
                return 0
    except LtError as e:
        out.flush()
        sys.stderr.write(f"error: {e}\n")
        return 1
    finally:
        lib.lt_session_free(session)
        lib.lt_model_free(model)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
