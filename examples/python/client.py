#!/usr/bin/env python3
"""Client for `latent-tap serve`: completions with latents over JSON, SSE and the
binary record stream, and a subscriber that records every request's latents.
Written from docs/PROTOCOL.md; needs only the standard library and numpy
(`safetensors` is used for subscribe recordings when installed, else `.npz`).

    python3 client.py complete  --url http://127.0.0.1:8080 --prompt "The capital of France is" \
                                --tensors 'l_out-*' [--binary | --sse | --json] [--check]
    python3 client.py subscribe --url http://127.0.0.1:8080 --tensors 'l_out-*' --out DIR [--max-requests N]
    python3 client.py selftest  --url http://127.0.0.1:8080

`complete` prints the text and, per tensor, the [n_rows, width] array's shape and
per-row L2 norms. `--check` sends the same greedy request over all three
transports and fails unless text, positions, steps and arrays are identical.
`selftest` runs that check plus a subscriber over 2 requests; exit status 0 only
when everything agrees.
"""

import argparse
import base64
import http.client
import json
import os
import struct
import sys
import threading
import time
import urllib.parse

import numpy as np

FRAMES_MEDIA_TYPE = "application/vnd.latent-tap.frames"

# Record kinds (docs/PROTOCOL.md, "Binary record stream").
KIND_FRAME, KIND_TOKEN, KIND_END, KIND_REQUEST, KIND_JSON = 1, 2, 3, 4, 5
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
    """Little-endian row-major payload -> numpy [n_rows, width] (bf16 widened to f32)."""
    if dtype == "f32":
        a = np.frombuffer(raw, dtype="<f4")
    elif dtype == "f16":
        a = np.frombuffer(raw, dtype="<f2")
    elif dtype == "bf16":
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(f"unknown dtype {dtype!r}")
    return a.reshape(n_rows, width)


def _read_exact(stream, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def parse_record(rec):
    """One record (without its length prefix) -> dict with a 'kind' string."""
    if len(rec) < 8:
        raise ValueError(f"record of {len(rec)} bytes is shorter than kind + header_size")
    kind, header_size = struct.unpack_from("<II", rec, 0)
    if kind == KIND_FRAME:
        (_, _, seq, step, ubatch, tensor_index, layer, dt, n_rows, width, ne0, ne1, ne2, ne3,
         name) = FRAME_HEADER.unpack_from(rec, 0)
        dtype = DTYPES[dt]
        off = header_size
        rows = np.frombuffer(rec, dtype=ROW_META, count=n_rows, offset=off)
        off += n_rows * ROW_META.itemsize
        nbytes = n_rows * width * ELEM_SIZE[dtype]
        if off + nbytes > len(rec):
            raise ValueError("frame record is truncated")
        return {
            "kind": "frame", "seq": seq, "step": step, "ubatch": ubatch,
            "tensor_index": tensor_index, "layer": layer, "dtype": dtype,
            "n_rows": n_rows, "width": width, "ne": (ne0, ne1, ne2, ne3),
            "name": name.split(b"\0", 1)[0].decode("utf-8", "replace"),
            "rows": rows, "data": decode_payload(rec[off:off + nbytes], dtype, n_rows, width),
        }
    if kind == KIND_TOKEN:
        (_, _, step, seq_id, pos, token, flags, n_top, logprob, entropy, piece_len,
         _reserved) = TOKEN_HEADER.unpack_from(rec, 0)
        off = header_size
        top = np.frombuffer(rec, dtype=TOP_ENTRY, count=n_top, offset=off)
        off += n_top * TOP_ENTRY.itemsize
        return {
            "kind": "token", "step": step, "seq_id": seq_id, "pos": pos, "token": token,
            "flags": flags, "prompt": bool(flags & ROW_PROMPT), "logprob": logprob,
            "entropy": entropy, "top": [(int(t["id"]), float(t["logprob"])) for t in top],
            "piece": rec[off:off + piece_len],
        }
    if kind == KIND_END:
        _, _, frames, drops = END_RECORD.unpack_from(rec, 0)
        return {"kind": "end", "frames": frames, "drops": drops}
    if kind == KIND_REQUEST:
        _, _, request_id, seq_id, event, dropped, n_tokens = REQUEST_RECORD.unpack_from(rec, 0)
        return {"kind": "request", "request_id": request_id, "seq_id": seq_id,
                "event": {1: "begin", 2: "end"}.get(event, event), "dropped": dropped,
                "n_tokens": n_tokens}
    if kind == KIND_JSON:
        _, _, n = JSON_HEADER.unpack_from(rec, 0)
        body = rec[header_size:header_size + n]
        return {"kind": "json", "value": json.loads(body)}
    return {"kind": kind, "raw": rec}  # unknown kind: skip it, the stream goes on


def parse_records(stream):
    """Yield parsed records from a binary stream (each: u32 LE length, then the record)."""
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


# ---------------------------------------------------------------- HTTP


class Server:
    def __init__(self, url, api_key=None, timeout=600):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit(f"only http:// URLs are supported, not {url}")
        self.host, self.port = u.hostname, u.port or 80
        self.api_key, self.timeout = api_key, timeout

    def request(self, method, path, body=None, accept=None):
        """Send a request; returns the open response (caller reads and closes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {}
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if accept:
            headers["Accept"] = accept
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")
            conn.close()
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {text}")
        resp.conn = conn
        return resp

    def json(self, method, path, body=None):
        resp = self.request(method, path, body)
        try:
            return json.loads(resp.read())
        finally:
            resp.conn.close()


class Latents:
    """Rows of one tensor in arrival order: data [rows, width], pos, step."""

    def __init__(self):
        self.blocks, self.pos, self.step, self.dtype = [], [], [], None

    def add(self, data, pos, step, dtype):
        self.blocks.append(data)
        self.pos.extend(int(p) for p in pos)
        self.step.extend(int(s) for s in step)
        self.dtype = dtype

    def array(self):
        return np.concatenate(self.blocks, axis=0)


def add_json_latents(acc, obj):
    """Merge a JSON `latents` object into {name: Latents}."""
    for name, t in (obj or {}).items():
        rows, width = t["shape"]
        data = decode_payload(base64.b64decode(t["data"]), t["dtype"], rows, width)
        acc.setdefault(name, Latents()).add(data, t["pos"], t["step"], t["dtype"])


def complete_json(srv, body):
    v = srv.json("POST", "/completion", dict(body, stream=False))
    acc = {}
    add_json_latents(acc, v.get("latents"))
    return v["content"], acc, {"tokens_predicted": v["tokens_predicted"]}


def complete_sse(srv, body):
    resp = srv.request("POST", "/completion", dict(body, stream=True))
    acc, text, final = {}, [], None
    try:
        for line in resp:
            line = line.rstrip(b"\r\n")
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):]
            if payload == b"[DONE]":
                break
            c = json.loads(payload)
            if "error" in c:
                raise RuntimeError(f"server error in stream: {c['error']}")
            text.append(c.get("content", ""))
            add_json_latents(acc, c.get("latents"))
            if c.get("stop"):
                final = c
                break
    finally:
        resp.conn.close()
    if final is None:
        raise RuntimeError("SSE stream ended without a final chunk")
    return "".join(text), acc, {"tokens_predicted": final["tokens_predicted"]}


def complete_binary(srv, body, records=None):
    """The binary transport; `records` (a list) receives every parsed record."""
    resp = srv.request("POST", "/completion", dict(body, stream=False), accept=FRAMES_MEDIA_TYPE)
    acc, summary, end, n_frames, last_seq = {}, None, None, 0, None
    try:
        for r in parse_records(resp):
            if records is not None:
                records.append(r)
            if r["kind"] == "frame":
                n_frames += 1
                if last_seq is not None and r["seq"] != last_seq + 1:
                    raise RuntimeError(f"frame seq gap {last_seq} -> {r['seq']}")
                last_seq = r["seq"]
                acc.setdefault(r["name"], Latents()).add(
                    r["data"], r["rows"]["pos"], [r["step"]] * r["n_rows"], r["dtype"])
            elif r["kind"] == "end":
                end = r
            elif r["kind"] == "json":
                summary = r["value"]
    finally:
        resp.conn.close()
    if summary is None or end is None:
        raise RuntimeError("binary stream ended without END and JSON records")
    if "error" in summary:
        raise RuntimeError(f"server error: {summary['error']}")
    if end["frames"] != n_frames:
        raise RuntimeError(f"END says {end['frames']} frames, {n_frames} arrived")
    return summary["content"], acc, {"tokens_predicted": summary["tokens_predicted"]}


TRANSPORTS = {"json": complete_json, "sse": complete_sse, "binary": complete_binary}


def request_body(a):
    lat = {"tensors": a.tensors, "rows": a.rows, "dtype": a.dtype}
    if a.layers:
        lat["layers"] = a.layers
    return {"prompt": a.prompt, "n_predict": a.n_predict, "temperature": a.temperature,
            "seed": a.seed, "latents": lat}


def show(text, acc):
    print(f"text: {text!r}")
    for name, t in acc.items():
        x = t.array().astype(np.float32)
        norms = np.linalg.norm(x, axis=1)
        print(f"{name}: shape {list(x.shape)} dtype {t.dtype} pos {t.pos} step {t.step}")
        print(f"    L2 norms: {np.array2string(norms, precision=2, max_line_width=100)}")


def compare(results):
    """Fail (list of messages) unless every transport produced the same thing."""
    errors = []
    (ref_name, (ref_text, ref_acc, ref_meta)), *rest = results.items()
    for name, (text, acc, meta) in rest:
        if text != ref_text:
            errors.append(f"text differs: {ref_name} {ref_text!r} vs {name} {text!r}")
        if meta != ref_meta:
            errors.append(f"counts differ: {ref_name} {ref_meta} vs {name} {meta}")
        if list(acc) != list(ref_acc):
            errors.append(f"tensors differ: {ref_name} {list(ref_acc)} vs {name} {list(acc)}")
            continue
        for t in acc:
            a, b = ref_acc[t], acc[t]
            if a.pos != b.pos or a.step != b.step:
                errors.append(f"{t}: pos/step differ between {ref_name} and {name}")
            x, y = a.array(), b.array()
            if x.shape != y.shape or x.dtype != y.dtype:
                errors.append(f"{t}: {ref_name} {x.shape} {x.dtype} vs {name} {y.shape} {y.dtype}")
            elif not np.array_equal(x, y):
                d = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
                errors.append(f"{t}: arrays differ between {ref_name} and {name} (max |diff| {d})")
    if not ref_acc:
        errors.append("no latents came back")
    return errors


def check(srv, body, quiet=False):
    results = {name: fn(srv, body) for name, fn in TRANSPORTS.items()}
    errors = compare(results)
    text, acc, _ = results["json"]
    if not quiet:
        for name, (_, a, _) in results.items():
            print(f"{name:6s}: " + ", ".join(f"{t} {list(v.array().shape)}" for t, v in a.items()))
    if errors:
        for e in errors:
            print(f"MISMATCH: {e}", file=sys.stderr)
    else:
        print(f"check: JSON, SSE and binary agree ({len(acc)} tensors, text {text!r})")
    return not errors


# ---------------------------------------------------------------- subscribe


def save_tensors(path_base, tensors):
    """Write {name: array}; safetensors when installed, else .npz. Returns the path."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        np.savez(path_base + ".npz", **tensors)
        return path_base + ".npz"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path_base + ".safetensors")
    return path_base + ".safetensors"


def new_state(request_id, slot, n_prompt):
    return {"id": request_id, "slot": slot, "n_prompt": n_prompt, "lat": {}, "text": b"",
            "prompt_seen": 0, "begin_missed": False}


def subscribe(srv, query, out_dir, max_requests=None, on_ready=None, log=print):
    """Record every request's latents: DIR/request-<id>.safetensors + DIR/requests.jsonl.
    Returns the list of requests.jsonl entries written."""
    os.makedirs(out_dir, exist_ok=True)
    q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    resp = srv.request("GET", "/latents/subscribe?" + q)
    if on_ready:
        on_ready()
    live = {}  # slot -> state of the request that holds it
    done, last_seq, gaps = [], None, 0
    jsonl = open(os.path.join(out_dir, "requests.jsonl"), "a", encoding="utf-8")
    try:
        for r in parse_records(resp):
            k = r["kind"]
            if k == "request" and r["event"] == "begin":
                live[r["seq_id"]] = new_state(r["request_id"], r["seq_id"], r["n_tokens"])
            elif k == "frame":
                if last_seq is not None and r["seq"] != last_seq + 1:
                    gaps += r["seq"] - last_seq - 1
                last_seq = r["seq"]
                slot = int(r["rows"]["seq_id"][0])  # a frame's rows are one slot's
                st = live.setdefault(slot, new_state(None, slot, None))
                st["lat"].setdefault(r["name"], Latents()).add(
                    r["data"], r["rows"]["pos"], [r["step"]] * r["n_rows"], r["dtype"])
            elif k == "token":
                st = live.setdefault(r["seq_id"], new_state(None, r["seq_id"], None))
                if r["prompt"]:
                    st["prompt_seen"] += 1
                else:
                    st["text"] += r["piece"]
            elif k == "request" and r["event"] == "end":
                st = live.pop(r["seq_id"], None) or new_state(None, r["seq_id"], None)
                if st["id"] is None:
                    # Joined mid-request (its begin notice came before we did).
                    st["id"], st["n_prompt"], st["begin_missed"] = r["request_id"], None, True
                tensors = {}
                for name, t in st["lat"].items():
                    tensors[name] = t.array()
                    tensors[name + ".pos"] = np.asarray(t.pos, dtype=np.int32)
                    tensors[name + ".step"] = np.asarray(t.step, dtype=np.int32)
                path = None
                if tensors:
                    path = save_tensors(os.path.join(out_dir, f"request-{st['id']}"), tensors)
                entry = {"id": st["id"], "slot": st["slot"], "n_prompt": st["n_prompt"],
                         "n_generated": r["n_tokens"], "dropped": r["dropped"],
                         "seq_gaps": gaps, "begin_missed": st["begin_missed"],
                         "prompt_tokens_seen": st["prompt_seen"], "file": path and os.path.basename(path),
                         "text": st["text"].decode("utf-8", "replace"),
                         "shapes": {n: list(v.shape) for n, v in tensors.items()
                                    if not n.endswith((".pos", ".step"))}}
                jsonl.write(json.dumps(entry) + "\n")
                jsonl.flush()
                done.append(entry)
                log(f"request {st['id']} (slot {st['slot']}): {st['n_prompt']} prompt + "
                    f"{r['n_tokens']} generated tokens, {len(st['lat'])} tensors, "
                    f"dropped {r['dropped']} -> {entry['file']}")
                if max_requests and len(done) >= max_requests:
                    break
    finally:
        jsonl.close()
        resp.conn.close()
    return done


def selftest(srv, out_dir):
    ok = True
    tensors = srv.json("GET", "/latents/tensors")
    layer0 = tensors["layers"].get("0", [])
    if not any(t["name"] == "l_out-0" for t in layer0):
        print("selftest: the model has no l_out-0", file=sys.stderr)
        return False
    body = {"prompt": "The capital of France is", "n_predict": 3, "temperature": 0,
            "latents": {"tensors": "l_out-*", "layers": "0..2"}}
    ok &= check(srv, body)
    body_f16 = dict(body, latents={"tensors": "l_out-1", "rows": "last", "dtype": "f16"})
    ok &= check(srv, body_f16)

    # Subscribe, then send 2 requests (one JSON, one binary) and compare the recording
    # with what the requesters got.
    ready = threading.Event()
    box = {}

    def run_sub():
        try:
            box["done"] = subscribe(srv, {"tensors": "l_out-*", "layers": "0..2"}, out_dir,
                                    max_requests=2, on_ready=ready.set)
        except Exception as e:  # reported below
            box["error"] = e
            ready.set()

    th = threading.Thread(target=run_sub, daemon=True)
    th.start()
    if not ready.wait(60) or "error" in box:
        print(f"selftest: subscribe failed: {box.get('error')}", file=sys.stderr)
        return False
    # No pause: a request sent after the subscribe answer's headers must be seen whole.
    got = [complete_json(srv, body), complete_binary(srv, dict(body, prompt="Hello"))]
    th.join(300)
    if th.is_alive() or "error" in box:
        print(f"selftest: subscriber did not finish: {box.get('error')}", file=sys.stderr)
        return False
    done = box["done"]
    if len(done) != 2:
        print(f"selftest: subscriber recorded {len(done)} requests, not 2", file=sys.stderr)
        return False
    for entry, (text, acc, meta) in zip(done, got):
        if entry["begin_missed"]:
            print(f"selftest: subscriber missed the begin of request {entry['id']}",
                  file=sys.stderr)
            ok = False
        if entry["dropped"] or entry["seq_gaps"]:
            print(f"selftest: subscriber dropped frames: {entry}", file=sys.stderr)
            ok = False
        # Text is compared only when valid UTF-8: invalid bytes may be replaced differently.
        if entry["n_generated"] != meta["tokens_predicted"] or (
                entry["text"] != text and "\ufffd" not in entry["text"] + text):
            print(f"selftest: subscriber saw {entry['n_generated']} tokens {entry['text']!r}, "
                  f"requester {meta['tokens_predicted']} {text!r}", file=sys.stderr)
            ok = False
        rec = load_recording(os.path.join(out_dir, entry["file"]))
        for name, t in acc.items():
            x = rec.get(name)
            if x is None or not np.array_equal(x, t.array()) or \
                    list(rec[name + ".pos"]) != t.pos or list(rec[name + ".step"]) != t.step:
                print(f"selftest: request {entry['id']} {name}: recording differs", file=sys.stderr)
                ok = False
    if ok:
        print(f"selftest: subscriber recorded 2 requests identical to the requesters' "
              f"latents ({out_dir})")
    return ok


def load_recording(path):
    if path.endswith(".npz"):
        return dict(np.load(path))
    from safetensors.numpy import load_file
    return load_file(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8080")
    common.add_argument("--api-key", default=os.environ.get("LATENT_TAP_API_KEY"))
    sel = argparse.ArgumentParser(add_help=False)
    sel.add_argument("--tensors", default="l_out-*")
    sel.add_argument("--layers", default=None, help="e.g. 4..12, 4..=12, 7, 0,3,5..8")
    sel.add_argument("--rows", default="all", choices=["all", "last"])
    sel.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])

    c = sub.add_parser("complete", parents=[common, sel])
    c.add_argument("--prompt", required=True)
    c.add_argument("-n", "--n-predict", type=int, default=8)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--binary", dest="transport", action="store_const", const="binary")
    g.add_argument("--sse", dest="transport", action="store_const", const="sse")
    g.add_argument("--json", dest="transport", action="store_const", const="json")
    c.add_argument("--check", action="store_true",
                   help="send the request over JSON, SSE and binary; fail unless identical")

    s = sub.add_parser("subscribe", parents=[common, sel])
    s.add_argument("--out", required=True)
    s.add_argument("--max-requests", type=int, default=None)
    s.add_argument("--queue-mb", type=int, default=None)

    t = sub.add_parser("selftest", parents=[common])
    t.add_argument("--out", default=None,
                   help="recording folder, kept (default: a temporary one, removed afterwards)")

    a = ap.parse_args(argv)
    srv = Server(a.url, a.api_key)
    if a.cmd == "complete":
        body = request_body(a)
        if a.check:
            return 0 if check(srv, body) else 1
        text, acc, _ = TRANSPORTS[a.transport or "binary"](srv, body)
        show(text, acc)
        return 0
    if a.cmd == "subscribe":
        q = {"tensors": a.tensors, "layers": a.layers, "rows": a.rows, "dtype": a.dtype,
             "queue_mb": a.queue_mb}
        try:
            import safetensors.numpy  # noqa: F401
            kind = ".safetensors"
        except ImportError:
            kind = ".npz (pip install safetensors for .safetensors)"
        print(f"subscribed to {a.url}; recording into {a.out} as {kind}", flush=True)
        try:
            subscribe(srv, q, a.out, a.max_requests, log=lambda m: print(m, flush=True))
        except KeyboardInterrupt:
            pass
        return 0
    if a.cmd == "selftest":
        import shutil
        import tempfile
        # A folder of our own is removed afterwards; one given with --out is kept.
        out = a.out or tempfile.mkdtemp(prefix="latent-tap-selftest-")
        t0 = time.time()
        try:
            ok = selftest(srv, out)
        finally:
            if a.out is None:
                shutil.rmtree(out, ignore_errors=True)
        print(f"selftest: {'PASS' if ok else 'FAIL'} in {time.time() - t0:.1f}s")
        return 0 if ok else 1
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
