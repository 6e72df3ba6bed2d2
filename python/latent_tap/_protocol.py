"""The binary record stream of ``latent-tap serve`` (docs/PROTOCOL.md, "Binary
record stream"): length-prefixed records parsed into dicts, and the payload
decoder shared with the JSON and SSE transports. Standard library and numpy only.
"""

import json
import struct

import numpy as np

FRAMES_MEDIA_TYPE = "application/vnd.latent-tap.frames"

# Record kinds.
KIND_FRAME, KIND_TOKEN, KIND_END, KIND_REQUEST, KIND_JSON, KIND_LENS = 1, 2, 3, 4, 5, 7
ROW_PROMPT = 1
DTYPES = {0: "f32", 1: "f16", 2: "bf16"}
ELEM_SIZE = {"f32": 4, "f16": 2, "bf16": 2}

# Fixed-header layouts, little-endian, no padding (the sizes are the documented
# header_size values; readers use the header_size a record carries to find its
# variable part, so longer headers from a newer server still parse).
FRAME_HEADER = struct.Struct("<IIQIIIiIIQ4q64s")  # 144 bytes
ROW_META = np.dtype([("seq_id", "<i4"), ("pos", "<i4"), ("token", "<i4"), ("flags", "<u4")])  # 16
TOKEN_HEADER = struct.Struct("<IIIiiiIIffII")  # 48 bytes
TOP_ENTRY = np.dtype([("id", "<i4"), ("logprob", "<f4")])  # 8
END_RECORD = struct.Struct("<IIQQ")  # 24 bytes
REQUEST_RECORD = struct.Struct("<IIQiIQQ")  # 40 bytes
JSON_HEADER = struct.Struct("<IIQ")  # 16 bytes
assert FRAME_HEADER.size == 144 and TOKEN_HEADER.size == 48 and ROW_META.itemsize == 16
assert END_RECORD.size == 24 and REQUEST_RECORD.size == 40 and JSON_HEADER.size == 16


def decode_payload(raw, dtype, n_rows, width):
    """Little-endian row-major payload -> numpy [n_rows, width].

    ``dtype`` is the wire name: ``f32`` gives float32, ``f16`` float16, and ``bf16``
    is widened to float32 (exactly: bf16 is the upper half of an f32)."""
    if dtype == "f32":
        a = np.frombuffer(raw, dtype="<f4")
    elif dtype == "f16":
        a = np.frombuffer(raw, dtype="<f2")
    elif dtype == "bf16":
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(f"unknown latents dtype {dtype!r} (expected f32, f16 or bf16)")
    if a.size != n_rows * width:
        raise ValueError(f"latents payload holds {a.size} elements, not {n_rows} x {width}")
    return a.reshape(n_rows, width)


def _read_exact(stream, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _check_size(rec, need, what):
    if len(rec) < need:
        raise ValueError(f"{what} record of {len(rec)} bytes is shorter than its {need}-byte header")


def parse_record(rec):
    """One record (without its length prefix) -> dict with a ``kind`` string.

    Kinds: ``frame``, ``token``, ``end``, ``request``, ``json``, ``lens``; a record of
    an unknown kind comes back as ``{"kind": <int>, "raw": bytes}`` (skip it)."""
    if len(rec) < 8:
        raise ValueError(f"record of {len(rec)} bytes is shorter than kind + header_size")
    kind, header_size = struct.unpack_from("<II", rec, 0)
    if kind == KIND_FRAME:
        _check_size(rec, FRAME_HEADER.size, "FRAME")
        (_, _, seq, step, ubatch, tensor_index, layer, dt, n_rows, width, ne0, ne1, ne2, ne3,
         name) = FRAME_HEADER.unpack_from(rec, 0)
        if dt not in DTYPES:
            raise ValueError(f"FRAME record with unknown dtype code {dt}")
        dtype = DTYPES[dt]
        off = header_size
        if off + n_rows * ROW_META.itemsize > len(rec):
            raise ValueError("FRAME record is truncated (row metadata)")
        rows = np.frombuffer(rec, dtype=ROW_META, count=n_rows, offset=off)
        off += n_rows * ROW_META.itemsize
        nbytes = n_rows * width * ELEM_SIZE[dtype]
        if off + nbytes > len(rec):
            raise ValueError("FRAME record is truncated (payload)")
        return {
            "kind": "frame", "seq": seq, "step": step, "ubatch": ubatch,
            "tensor_index": tensor_index, "layer": layer, "dtype": dtype,
            "n_rows": n_rows, "width": width, "ne": (ne0, ne1, ne2, ne3),
            "name": name.split(b"\0", 1)[0].decode("utf-8", "replace"),
            "rows": rows, "data": decode_payload(rec[off:off + nbytes], dtype, n_rows, width),
        }
    if kind == KIND_TOKEN:
        _check_size(rec, TOKEN_HEADER.size, "TOKEN")
        (_, _, step, seq_id, pos, token, flags, n_top, logprob, entropy, piece_len,
         _reserved) = TOKEN_HEADER.unpack_from(rec, 0)
        off = header_size
        if off + n_top * TOP_ENTRY.itemsize + piece_len > len(rec):
            raise ValueError("TOKEN record is truncated")
        top = np.frombuffer(rec, dtype=TOP_ENTRY, count=n_top, offset=off)
        off += n_top * TOP_ENTRY.itemsize
        return {
            "kind": "token", "step": step, "seq_id": seq_id, "pos": pos, "token": token,
            "flags": flags, "prompt": bool(flags & ROW_PROMPT), "logprob": logprob,
            "entropy": entropy, "top": [(int(t["id"]), float(t["logprob"])) for t in top],
            "piece": rec[off:off + piece_len],
        }
    if kind == KIND_END:
        _check_size(rec, END_RECORD.size, "END")
        _, _, frames, drops = END_RECORD.unpack_from(rec, 0)
        return {"kind": "end", "frames": frames, "drops": drops}
    if kind == KIND_REQUEST:
        _check_size(rec, REQUEST_RECORD.size, "REQUEST")
        _, _, request_id, seq_id, event, dropped, n_tokens = REQUEST_RECORD.unpack_from(rec, 0)
        return {"kind": "request", "request_id": request_id, "seq_id": seq_id,
                "event": {1: "begin", 2: "end"}.get(event, event), "dropped": dropped,
                "n_tokens": n_tokens}
    if kind in (KIND_JSON, KIND_LENS):
        _check_size(rec, JSON_HEADER.size, "JSON")
        _, _, n = JSON_HEADER.unpack_from(rec, 0)
        body = rec[header_size:header_size + n]
        return {"kind": "json" if kind == KIND_JSON else "lens", "value": json.loads(body)}
    return {"kind": kind, "raw": rec}  # unknown kind: skip it, the stream goes on


def parse_records(stream):
    """Yield parsed records from a binary stream (each: u32 LE length, then the record).

    ``stream`` is anything with ``read(n)`` (an HTTP response, a file)."""
    while True:
        prefix = _read_exact(stream, 4)
        if not prefix:
            return
        if len(prefix) < 4:
            raise ValueError("stream ends inside a length prefix")
        (n,) = struct.unpack("<I", prefix)
        rec = _read_exact(stream, n)
        if len(rec) < n:
            raise ValueError(f"stream ends inside a record ({len(rec)} of {n} bytes)")
        yield parse_record(rec)
