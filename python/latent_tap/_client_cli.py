"""The ``latent_tap.client`` command line (also ``examples/python/client.py``):
completions with latents over JSON, SSE and the binary record stream, a
subscriber that records every request's latents, and a self-test.

    complete  --url URL --prompt TEXT --tensors 'l_out-*' [--binary | --sse | --json] [--check]
    subscribe --url URL --tensors 'l_out-*' --out DIR [--max-requests N]
    selftest  --url URL [--out DIR]

`complete` prints the text and, per tensor, the [n_rows, width] array's shape and
per-row L2 norms. `--check` sends the same greedy request over all three
transports and fails unless text, tokens, positions, steps and arrays are
identical. `subscribe` writes DIR/request-<id>.safetensors (.npz without the
safetensors package) and DIR/requests.jsonl. `selftest` runs the check plus a
subscriber over 2 requests; exit status 0 only when everything agrees.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from .client import TRANSPORTS, Client, load_recording


def compare(results):
    """Messages for every difference between {transport: Completion} (empty: identical)."""
    errors = []
    (ref_name, ref), *rest = results.items()
    for name, r in rest:
        if r.text != ref.text:
            errors.append(f"text differs: {ref_name} {ref.text!r} vs {name} {r.text!r}")
        if r.tokens != ref.tokens:
            errors.append(f"tokens differ: {ref_name} {ref.tokens} vs {name} {r.tokens}")
        if list(r.latents) != list(ref.latents):
            errors.append(f"tensors differ: {ref_name} {list(ref.latents)} vs {name} {list(r.latents)}")
            continue
        for t in r.latents:
            a, b = ref.latents, r.latents
            if not (np.array_equal(a.pos[t], b.pos[t]) and np.array_equal(a.step[t], b.step[t])):
                errors.append(f"{t}: pos/step differ between {ref_name} and {name}")
            x, y = a[t], b[t]
            if x.shape != y.shape or x.dtype != y.dtype:
                errors.append(f"{t}: {ref_name} {x.shape} {x.dtype} vs {name} {y.shape} {y.dtype}")
            elif not np.array_equal(x, y):
                d = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
                errors.append(f"{t}: arrays differ between {ref_name} and {name} (max |diff| {d})")
    if not ref.latents:
        errors.append("no latents came back")
    return errors


def check(client, prompt, quiet=False, **kw):
    """Send one request over every transport; print and return whether they agree."""
    results = {t: client.complete(prompt, transport=t, **kw) for t in TRANSPORTS}
    errors = compare(results)
    if not quiet:
        for name, r in results.items():
            print(f"{name:6s}: " + ", ".join(f"{t} {list(v.shape)}" for t, v in r.latents.items()))
    for e in errors:
        print(f"MISMATCH: {e}", file=sys.stderr)
    if not errors:
        r = results["json"]
        print(f"check: JSON, SSE and binary agree ({len(r.latents)} tensors, text {r.text!r})")
    return not errors


def show(r):
    """Print a Completion: its text, then per tensor the shape, pos, step and row norms."""
    print(f"text: {r.text!r}")
    for name, x in r.latents.items():
        norms = np.linalg.norm(x.astype(np.float32), axis=1)
        print(f"{name}: shape {list(x.shape)} dtype {r.latents.dtype[name]} "
              f"pos {r.latents.pos[name].tolist()} step {r.latents.step[name].tolist()}")
        print(f"    L2 norms: {np.array2string(norms, precision=2, max_line_width=100)}")


def record(sub, out_dir, log=print):
    """Save each recording of `sub` into out_dir (+ requests.jsonl); returns the entries."""
    os.makedirs(out_dir, exist_ok=True)
    done = []
    with open(os.path.join(out_dir, "requests.jsonl"), "a", encoding="utf-8") as jsonl:
        for rec in sub:
            path = rec.save(out_dir)
            entry = {"id": rec.id, "slot": rec.slot, "n_prompt": rec.n_prompt,
                     "n_generated": rec.n_generated, "dropped": rec.dropped,
                     "seq_gaps": rec.seq_gaps, "begin_missed": rec.begin_missed,
                     "prompt_tokens_seen": len(rec.prompt_tokens),
                     "file": path and os.path.basename(path), "text": rec.text,
                     "shapes": {n: list(v.shape) for n, v in rec.latents.items()}}
            jsonl.write(json.dumps(entry) + "\n")
            jsonl.flush()
            done.append((entry, rec))
            log(f"request {rec.id} (slot {rec.slot}): {rec.n_prompt} prompt + "
                f"{rec.n_generated} generated tokens, {len(rec.latents)} tensors, "
                f"dropped {rec.dropped} -> {entry['file']}")
    return done


def _err(msg):
    print(f"selftest: {msg}", file=sys.stderr)
    return False


def selftest(client, out_dir):
    ok = True
    layer0 = client.tensors()["layers"].get("0", [])
    if not any(t["name"] == "l_out-0" for t in layer0):
        return _err("the model has no l_out-0")
    kw = dict(n_predict=3, temperature=0, tensors="l_out-*", layers="0..2")
    ok &= check(client, "The capital of France is", **kw)
    ok &= check(client, "The capital of France is", n_predict=3, temperature=0,
                tensors="l_out-1", rows="last", dtype="f16")
    # Subscribe, then send 2 requests (one JSON, one binary) and compare the
    # recording with what the requesters got. No pause: a request sent after
    # subscribe() returned must be seen whole.
    with client.subscribe("l_out-*", layers="0..2", max_requests=2, timeout=300) as sub:
        got = [client.complete("The capital of France is", **kw),
               client.complete("Hello", transport="binary", **kw)]
        done = record(sub, out_dir)
    if len(done) != 2:
        return _err(f"subscriber recorded {len(done)} requests, not 2")
    for (entry, rec), r in zip(done, got):
        if rec.begin_missed:
            ok = _err(f"subscriber missed the begin of request {rec.id}")
        if rec.dropped or rec.seq_gaps:
            ok = _err(f"subscriber dropped frames: {entry}")
        if rec.tokens != r.tokens:
            ok = _err(f"subscriber saw tokens {rec.tokens}, requester {r.tokens}")
        # Text is compared only when valid UTF-8: invalid bytes may be replaced differently.
        if rec.text != r.text and "\ufffd" not in rec.text + r.text:
            ok = _err(f"subscriber saw {rec.text!r}, requester {r.text!r}")
        saved = load_recording(os.path.join(out_dir, entry["file"]))
        for name, x in r.latents.items():
            y = saved.get(name)
            if y is None or not np.array_equal(y, x) or \
                    not np.array_equal(saved[name + ".pos"], r.latents.pos[name]) or \
                    not np.array_equal(saved[name + ".step"], r.latents.step[name]):
                ok = _err(f"request {rec.id} {name}: recording differs")
    if ok:
        print(f"selftest: subscriber recorded 2 requests identical to the requesters' "
              f"latents ({out_dir})")
    return ok


def _parser():
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
    for t in TRANSPORTS:
        g.add_argument(f"--{t}", dest="transport", action="store_const", const=t)
    c.add_argument("--check", action="store_true",
                   help="send the request over JSON, SSE and binary; fail unless identical")

    s = sub.add_parser("subscribe", parents=[common, sel])
    s.add_argument("--out", required=True)
    s.add_argument("--max-requests", type=int, default=None)
    s.add_argument("--queue-mb", type=int, default=None)

    t = sub.add_parser("selftest", parents=[common])
    t.add_argument("--out", default=None,
                   help="recording folder, kept (default: a temporary one, removed afterwards)")
    return ap


def main(argv=None):
    """Run the command line; returns the exit status (errors: one `error:` line, 1)."""
    a = _parser().parse_args(argv)
    try:
        return _run(a)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(a):
    client = Client(a.url, a.api_key)
    if a.cmd == "complete":
        kw = dict(tensors=a.tensors, layers=a.layers, rows=a.rows, dtype=a.dtype,
                  n_predict=a.n_predict, temperature=a.temperature, seed=a.seed)
        if a.check:
            return 0 if check(client, a.prompt, **kw) else 1
        show(client.complete(a.prompt, transport=a.transport or "binary", **kw))
        return 0
    if a.cmd == "subscribe":
        try:
            import safetensors.numpy  # noqa: F401
            kind = ".safetensors"
        except ImportError:
            kind = ".npz (pip install safetensors for .safetensors)"
        sub = client.subscribe(a.tensors, layers=a.layers, rows=a.rows, dtype=a.dtype,
                               queue_mb=a.queue_mb, max_requests=a.max_requests)
        print(f"subscribed to {a.url}; recording into {a.out} as {kind}", flush=True)
        try:
            with sub:
                record(sub, a.out, log=lambda m: print(m, flush=True))
        except KeyboardInterrupt:
            pass
        return 0
    # selftest: a folder of our own is removed afterwards; one given with --out is kept.
    out = a.out or tempfile.mkdtemp(prefix="latent-tap-selftest-")
    t0 = time.time()
    try:
        ok = selftest(client, out)
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    print(f"selftest: {'PASS' if ok else 'FAIL'} in {time.time() - t0:.1f}s")
    return 0 if ok else 1
