#!/usr/bin/env python3
"""Check a latent-tap run (`latent-tap listen --out DIR`, or `capture --prompts`)
against what the model served.

Two sources of truth for the requests:

  --requests FILE   JSON written by scripts/attach_client.py: a list of
                    {"prompt": str, "prompt_tokens": [ids] (POST /tokenize with
                    add_special), "response": <llama-server /completion reply
                    with return_tokens and n_probs >= 1>}
  --from-capture    take prompts and generated tokens from the run's own
                    tokens.jsonl (a `latent-tap capture --prompts` run): used to
                    validate this checker where no listener exists

Checks:
  rows   for every request, the rows of each captured l_out-K (K < last layer)
         lie in one request-level group (NAME.prompt) and one sequence, with
         positions 0..n-1, and the run's input tokens at those positions are the
         tokenized prompt followed by the generated tokens (n = prompt +
         generated - 1, or + generated when the last one was fed back too)
  lens   for each generation step, the last layer's l_out row at that step's
         position, put through the model's final RMSNorm (output_norm.weight,
         eps from the GGUF; converted Gemma weights already hold the +1) and the
         output matrix (output.weight, or the tied token_embd.weight, dequantized
         with gguf-py), has its argmax at the token the server produced. Also
         compares the log-softmax of that token with the server's logprob.
  same   (--same A B) two reply files of the same requests (e.g. tapped and
         untapped server, requests sent one at a time) have identical generated
         tokens, content and logprobs
         (--similar A B) the same comparison, informational only: concurrent
         requests are batched together depending on their timing, and
         llama-server's logprobs then move by up to ~0.1 between two runs of
         the same server, so a near-tie can flip a greedy token

Needs python3 + numpy; gguf-py (llama.cpp's gguf-py folder, numpy only) from
--gguf-py, $GGUF_PY, an installed `gguf`, or the test-attach cache folder.
Exit status 0 on PASS, 1 on FAIL, 2 on a usage / input error.
"""

import argparse
import glob
import json
import os
import struct
import sys

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


def die(msg):
    print(f"attach_check: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- run reading


def read_shard(path):
    """{name: array} of one safetensors file (numpy, whole file read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        blob = f.read()
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        dt = np.dtype(_DTYPES[h["dtype"]]).newbyteorder("<")
        arr = np.frombuffer(blob[a:b], dtype=dt).reshape(h["shape"])
        if h["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64)
    return out


class RunData:
    def __init__(self, d):
        mpath = os.path.join(d, "manifest.json")
        if not os.path.exists(mpath):
            die(f"{d}: no manifest.json (did the listener finish writing the run?)")
        with open(mpath) as f:
            self.manifest = json.load(f)
        shards = sorted(glob.glob(os.path.join(d, "latents-*.safetensors")))
        if not shards:
            die(f"{d}: no latents-*.safetensors")
        self.rows = {}  # name -> dict(x, pos, seq, prompt)
        for s in shards:
            for name, arr in read_shard(s).items():
                if name.endswith((".pos", ".seq", ".prompt")):
                    base, col = name.rsplit(".", 1)
                else:
                    base, col = name, "x"
                self.rows.setdefault(base, {}).setdefault(col, []).append(arr)
        for base, cols in self.rows.items():
            for col in list(cols):
                cols[col] = np.concatenate(cols[col], axis=0)
            missing = {"x", "pos", "seq", "prompt"} - set(cols)
            if missing:
                die(f"{d}: tensor {base} lacks column(s) {sorted(missing)}")
        self.tokens = {}  # (prompt_index, pos) -> token
        self.lines = {}  # (prompt_index, pos) -> the tokens.jsonl object
        self.token_lines = []
        tpath = os.path.join(d, "tokens.jsonl")
        if not os.path.exists(tpath):
            die(f"{d}: no tokens.jsonl")
        with open(tpath) as f:
            for line in f:
                if not line.strip():
                    continue
                t = json.loads(line)
                self.token_lines.append(t)
                key = (int(t["prompt_index"]), int(t["pos"]))
                self.tokens[key] = int(t["token"])
                self.lines[key] = t

    def layer_names(self):
        out = []
        for name in self.rows:
            if name.startswith("l_out-") and name[6:].isdigit():
                out.append((int(name[6:]), name))
        return [n for _, n in sorted(out)]


# ---------------------------------------------------------------- requests


class Request:
    def __init__(self, label, prompt_tokens, generated, top_ids=None, logprobs=None, content=None):
        self.label = label
        self.prompt_tokens = [int(t) for t in prompt_tokens]
        self.generated = [int(t) for t in generated]
        self.top_ids = top_ids  # per step: server's top-1 id (pre-sampling), or None
        self.logprobs = logprobs  # per step: server's logprob of the generated token, or None
        self.content = content


def requests_from_file(path):
    with open(path) as f:
        items = json.load(f)
    if isinstance(items, dict):  # attach_client.py run: {"wall_s", "items"}
        items = items["items"]
    reqs = []
    for i, it in enumerate(items):
        r = it["response"]
        gen = r.get("tokens") or []
        if not gen and r.get("tokens_predicted", 0) > 0:
            die(f"{path}: request {i} has no 'tokens' (send return_tokens: true)")
        probs = r.get("completion_probabilities")
        top_ids = logprobs = None
        if probs is not None:
            if len(probs) == len(gen):
                top_ids = [p["top_logprobs"][0]["id"] if p.get("top_logprobs") else None for p in probs]
                logprobs = [p.get("logprob") for p in probs]
                for k, p in enumerate(probs):
                    if p.get("id") is not None and p["id"] != gen[k]:
                        die(f"{path}: request {i}: completion_probabilities[{k}].id {p['id']} != tokens[{k}] {gen[k]}")
            else:
                print(f"note: request {i}: {len(probs)} completion_probabilities for {len(gen)} tokens "
                      "(incomplete UTF-8 steps have none); using the generated tokens only", file=sys.stderr)
        label = f"{os.path.basename(path)}[{i}] ({it['prompt'][:40]!r})"
        reqs.append(Request(label, it["prompt_tokens"], gen, top_ids, logprobs, r.get("content")))
    return reqs


def requests_from_capture(run):
    by = {}
    for t in run.token_lines:
        by.setdefault(int(t["prompt_index"]), []).append(t)
    reqs = []
    for p in sorted(by):
        ts = sorted(by[p], key=lambda t: t["pos"])
        prompt = [t["token"] for t in ts if t["prompt"]]
        gen = [t for t in ts if not t["prompt"]]
        top = [t["top"][0][0] if t.get("top") else None for t in gen]
        lp = [t.get("logprob") for t in gen]
        reqs.append(Request(f"prompt {p}", prompt, [t["token"] for t in gen], top, lp))
    return reqs


# ---------------------------------------------------------------- model (gguf)


def import_gguf(path):
    cands = []
    if path:
        cands.append(path)
    if os.environ.get("GGUF_PY"):
        cands.append(os.environ["GGUF_PY"])
    cache = os.environ.get("LATENT_TAP_CACHE", os.path.expanduser("~/.cache/latent-tap"))
    cands += sorted(glob.glob(os.path.join(cache, "llama-server-*", "src", "*", "llama.cpp", "gguf-py")), reverse=True)
    cands += sorted(glob.glob(os.path.join(cache, "llama-server-*", "*", "llama.cpp", "gguf-py")), reverse=True)
    for c in cands:
        if os.path.isdir(os.path.join(c, "gguf")):
            sys.path.insert(0, c)
            break
    try:
        import gguf  # noqa: F401
        from gguf.quants import dequantize  # noqa: F401
    except ImportError as e:
        die(f"cannot import gguf-py ({e}); pass --gguf-py /path/to/llama.cpp/gguf-py (tried {cands})")
    import gguf

    return gguf


def quantize_activations(x, wtype):
    """Round x [m, n] as ggml's CPU matmul does before a dot with weights of
    type wtype: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 quantize the activations to Q8_0/Q8_1
    (blocks of 32, scale max|x|/127 stored as f16), K-quants to Q8_K (blocks of
    256, scale -max/127 in f32 where max is the element of largest magnitude).
    Float weights: x unchanged. This takes the lens' logprobs from ~1e-2 to
    ~1e-3 of the server's."""
    m, n = x.shape
    if wtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") and n % 32 == 0:
        b = x.reshape(m, n // 32, 32).astype(np.float32)
        d = (np.abs(b).max(axis=-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        return (np.round(b * inv) * d).reshape(m, n)
    if wtype.endswith("_K") and n % 256 == 0:
        b = x.reshape(m, n // 256, 256).astype(np.float32)
        idx = np.abs(b).argmax(axis=-1)[..., None]
        mx = np.take_along_axis(b, idx, axis=-1)
        iscale = np.divide(-127.0, mx, out=np.zeros_like(mx), where=mx != 0)
        q = np.minimum(np.round(iscale * b), 127)  # ggml: nearest_int, then MIN(127, ...)
        d = np.divide(1.0, iscale, out=np.zeros_like(iscale), where=iscale != 0)
        return (q * d).reshape(m, n)
    return x


class Head:
    """Final norm + output matrix of a GGUF model, for the logit lens."""

    def __init__(self, model_path, gguf_path, act_quant=True):
        self.act_quant = act_quant
        gguf = import_gguf(gguf_path)
        self.gguf = gguf
        r = gguf.GGUFReader(model_path)
        self.reader = r

        def field(key, default=None):
            f = r.fields.get(key)
            return default if f is None else f.contents()

        self.arch = field("general.architecture")
        a = self.arch
        self.n_layer = int(field(f"{a}.block_count"))
        self.n_embd = int(field(f"{a}.embedding_length"))
        self.eps = field(f"{a}.attention.layer_norm_rms_epsilon")
        if self.eps is None:
            die(f"{model_path}: no {a}.attention.layer_norm_rms_epsilon (this check assumes an RMSNorm model)")
        self.softcap = field(f"{a}.final_logit_softcapping", 0.0) or 0.0
        tensors = {t.name: t for t in r.tensors}
        self.norm_w = np.array(tensors["output_norm.weight"].data, dtype=np.float32).reshape(-1)
        self.out = tensors.get("output.weight")
        self.tied = self.out is None
        if self.tied:
            self.out = tensors["token_embd.weight"]
        self.n_vocab = int(self.out.shape[-1])  # gguf shape is [n_embd, n_vocab]

    def normed(self, h):
        h = h.astype(np.float32)
        ms = np.mean(h.astype(np.float64) ** 2, axis=-1, keepdims=True)
        return (h / np.sqrt(ms + self.eps)).astype(np.float32) * self.norm_w

    def logits(self, hs, chunk_rows=16384):
        """[m, n_vocab] logits for hidden rows hs [m, n_embd], dequantizing the
        output matrix a chunk of vocab rows at a time."""
        data = self.out.data  # [n_vocab, row_bytes] for quantized, [n_vocab, n_embd] for float
        qt = self.out.tensor_type
        x = self.normed(np.asarray(hs))
        if self.act_quant:
            x = quantize_activations(x, qt.name)
        x = x.T.copy()  # [n_embd, m]
        out = np.empty((x.shape[1], self.n_vocab), dtype=np.float32)
        for a in range(0, self.n_vocab, chunk_rows):
            b = min(a + chunk_rows, self.n_vocab)
            w = self.gguf.quants.dequantize(np.asarray(data[a:b]), qt).astype(np.float32, copy=False)
            w = w.reshape(b - a, self.n_embd)
            out[:, a:b] = (w @ x).T
        if self.softcap:
            out = np.tanh(out / self.softcap) * self.softcap
        return out


# ---------------------------------------------------------------- checks


def group_rows(run, name):
    c = run.rows[name]
    groups = {}
    for i, p in enumerate(c["prompt"]):
        groups.setdefault(int(p), []).append(i)
    return {p: np.array(ix) for p, ix in groups.items()}


def find_group(run, req, first_layer, taken=()):
    """The prompt_index (not in taken) whose rows of first_layer carry req's tokens."""
    want = req.prompt_tokens + req.generated
    best = None
    for p, ix in group_rows(run, first_layer).items():
        if p in taken:
            continue
        pos = np.sort(run.rows[first_layer]["pos"][ix])
        toks = [run.tokens.get((p, int(q))) for q in pos]
        n = len(toks)
        if n >= len(req.prompt_tokens) and toks == want[:n]:
            if best is None or n > best[1]:
                best = (p, n)
    return None if best is None else best[0]


def closest(run, req, first_layer):
    """'; closest: ...' naming the group sharing the longest token prefix with req."""
    want = req.prompt_tokens + req.generated
    best = None
    for p, ix in group_rows(run, first_layer).items():
        pos = np.sort(run.rows[first_layer]["pos"][ix])
        toks = [run.tokens.get((p, int(q))) for q in pos]
        k = next((i for i, (a, b) in enumerate(zip(toks, want)) if a != b), min(len(toks), len(want)))
        if best is None or k > best[1]:
            best = (p, k, toks, pos)
    if best is None:
        return "; the run has no rows"
    p, k, toks, pos = best
    return (f"; closest: prompt_index {p} ({len(toks)} rows, positions {int(pos[0])}..{int(pos[-1])}) agrees on "
            f"the first {k} tokens, then has {toks[k:k + 3]} where the request has {want[k:k + 3]}")


def check_rows(run, reqs, layers, fails):
    last = layers[-1]
    body = [n for n in layers if n != last] or layers
    matched = {}
    for r in reqs:
        want = r.prompt_tokens + r.generated
        p = find_group(run, r, body[0], set(matched.values()))
        if p is None:
            fails.append(f"rows: {r.label}: no request group in the run carries its tokens "
                         f"({len(r.prompt_tokens)} prompt + {len(r.generated)} generated){closest(run, r, body[0])}")
            continue
        matched[r.label] = p
        bad = []
        for name in body:
            c = run.rows[name]
            ix = np.nonzero(c["prompt"] == p)[0]
            seqs = set(int(s) for s in c["seq"][ix])
            pos = c["pos"][ix]
            n = len(ix)
            ok_n = n in (len(want) - 1, len(want))
            contiguous = sorted(pos.tolist()) == list(range(n))
            ordered = pos.tolist() == list(range(n))
            toks = [run.tokens.get((p, q)) for q in range(n)]
            if len(seqs) != 1 or not ok_n or not contiguous or toks != want[:n]:
                bad.append(f"{name}: {n} rows (want {len(want) - 1}), seqs {sorted(seqs)}, "
                           f"positions {'0..n-1' if contiguous else 'not contiguous'}, "
                           f"tokens {'match' if toks == want[:n] else 'differ'}")
            elif not ordered:
                print(f"  note: {r.label}: {name} rows are not in position order")
        # listener runs: each row's sampled_next (the token sampled from its logits, null when unknown)
        sn_checked = 0
        L, G = len(r.prompt_tokens), len(r.generated)
        for pos in range(len(want)):
            t = run.lines.get((p, pos))
            if t is None or "sampled_next" not in t:
                continue
            sn = t["sampled_next"]
            k = pos - (L - 1)  # generation step whose logits this row gave
            if 0 <= k < G:
                sn_checked += 1
                if sn is not None and sn != r.generated[k]:
                    bad.append(f"tokens.jsonl pos {pos}: sampled_next {sn}, the server generated {r.generated[k]}")
                elif sn is None and k < G - 1:
                    bad.append(f"tokens.jsonl pos {pos}: sampled_next null, the server generated {r.generated[k]} "
                               "(its successor row exists)")
            elif sn is not None:
                bad.append(f"tokens.jsonl pos {pos}: sampled_next {sn} on a prompt row that gave no token")
        if sn_checked and not bad:
            print(f"  sampled_next ok: {r.label}: {sn_checked} output rows name the token the server generated")
        if bad:
            fails.append(f"rows: {r.label} (prompt_index {p}): " + "; ".join(bad[:3]) +
                         (f"; ... {len(bad) - 3} more" if len(bad) > 3 else ""))
        else:
            c = run.rows[body[0]]
            seq = int(c["seq"][c["prompt"] == p][0])
            n = int((c["prompt"] == p).sum())
            print(f"  rows ok: {r.label}: prompt_index {p}, seq {seq}, positions 0..{n - 1} "
                  f"({len(r.prompt_tokens)} prompt + {n - len(r.prompt_tokens)} generated fed back) "
                  f"in {len(body)} tensors")
    used = set(matched.values())
    others = sorted(set(int(p) for p in run.rows[body[0]]["prompt"]) - used)
    if others:
        print(f"  note: {len(others)} request group(s) in the run match no request: {others[:10]}"
              " (e.g. llama-server's warmup decode)")
    return matched


def check_lens(run, head, reqs, matched, last, fails, gap_tol, lp_tol):
    c = run.rows[last]
    steps = []  # (req, k, row index)
    for r in reqs:
        p = matched.get(r.label)
        if p is None:
            continue
        ix = np.nonzero(c["prompt"] == p)[0]
        by_pos = {int(c["pos"][i]): i for i in ix}
        missing = []
        for k in range(len(r.generated)):
            pos = len(r.prompt_tokens) - 1 + k
            if pos in by_pos:
                steps.append((r, k, by_pos[pos]))
            else:
                missing.append(pos)
        if missing:
            fails.append(f"lens: {r.label}: no {last} row at position(s) {missing[:8]} (generation steps)")
        extra = len(ix) - (len(r.generated) - len(missing))
        if extra > 0:
            print(f"  note: {r.label}: {last} has {extra} rows beyond the output rows (last layer not pruned)")
    if not steps:
        fails.append("lens: no steps to check")
        return
    hs = c["x"][[s[2] for s in steps]]
    logits = head.logits(hs)
    mx = logits.max(axis=1, keepdims=True)
    lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1)))
    n_match = n_top = n_top_checked = 0
    lp_diffs = []
    mism = []
    for i, (r, k, _) in enumerate(steps):
        am = int(np.argmax(logits[i]))
        tok = r.generated[k]
        if am == tok:
            n_match += 1
        else:
            gap = float(logits[i, am] - logits[i, tok])
            mism.append((r, k, am, tok, gap))
        if r.top_ids is not None and r.top_ids[k] is not None:
            n_top_checked += 1
            n_top += int(am == r.top_ids[k])
        if r.logprobs is not None and r.logprobs[k] is not None:
            lp_diffs.append(abs(float(logits[i, tok] - lse[i]) - float(r.logprobs[k])))
    print(f"  lens: {n_match}/{len(steps)} steps: argmax of output(norm({last})) == the generated token"
          + (f"; {n_top}/{n_top_checked} == the server's top-1" if n_top_checked else ""))
    if lp_diffs:
        d = np.array(lp_diffs)
        print(f"  lens: |log-softmax(token) - server logprob|: median {np.median(d):.2e}, max {d.max():.2e}"
              f" over {len(d)} steps")
        if d.max() > lp_tol:
            fails.append(f"lens: logprob difference {d.max():.3g} above {lp_tol}")
    for r, k, am, tok, gap in mism:
        kind = "near-tie" if gap <= gap_tol else "MISMATCH"
        print(f"  {kind}: {r.label} step {k}: lens argmax {am}, generated {tok}, logit gap {gap:.4f}")
        if gap > gap_tol:
            fails.append(f"lens: {r.label} step {k}: argmax {am} != generated {tok} (gap {gap:.4f} > {gap_tol})")


def compare(path_a, path_b, fails, strict):
    ra, rb = requests_from_file(path_a), requests_from_file(path_b)
    what = "same" if strict else "similar"
    if len(ra) != len(rb):
        fails.append(f"{what}: {path_a} has {len(ra)} replies, {path_b} {len(rb)}")
        return
    for a, b in zip(ra, rb):
        if a.prompt_tokens != b.prompt_tokens:
            fails.append(f"{what}: {a.label} and {b.label} are not the same prompt")
            continue
        n = next((i for i, (x, y) in enumerate(zip(a.generated, b.generated)) if x != y), None)
        if n is None and len(a.generated) != len(b.generated):
            n = min(len(a.generated), len(b.generated))
        k = len(a.generated) if n is None else n
        d = 0.0
        if a.logprobs and b.logprobs and k:
            d = max(abs(x - y) for x, y in zip(a.logprobs[:k], b.logprobs[:k]))
        if n is None and a.content == b.content:
            msg = f"  {what}: {a.label} vs {b.label}: {k} tokens and content identical, max |logprob diff| {d:.2e}"
            if strict and d > 1e-4:
                fails.append(f"same: {a.label} vs {b.label}: logprobs differ by {d:.3g}")
            print(msg)
            continue
        msg = (f"{a.label} vs {b.label}: tokens differ from step {n}: {a.generated[n:n + 4]} vs "
               f"{b.generated[n:n + 4]} (max |logprob diff| before it {d:.2e}")
        if a.logprobs and b.logprobs and n is not None and n < min(len(a.logprobs), len(b.logprobs)):
            msg += f"; at it {a.logprobs[n]:.4f} vs {b.logprobs[n]:.4f}"
        msg += ")"
        if strict:
            fails.append("same: " + msg)
        else:
            print(f"  similar (informational): {msg}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (listen --out / capture --prompts --out)")
    ap.add_argument("--model", required=True, help="the GGUF the server ran")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--requests", action="append",
                     help="JSON from attach_client.py (prompts, tokenized prompts, responses); may be repeated")
    src.add_argument("--from-capture", action="store_true", help="take requests from the run's tokens.jsonl")
    ap.add_argument("--same", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="reply files (attach_client.py JSON) of the same requests that must agree exactly")
    ap.add_argument("--similar", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="reply files to compare for information only (concurrent requests)")
    ap.add_argument("--gguf-py", help="llama.cpp's gguf-py folder")
    ap.add_argument("--no-act-quant", action="store_true",
                    help="compute the lens in plain float (default: round the activations as ggml's CPU "
                         "matmul does for the output matrix's type)")
    ap.add_argument("--gap-tol", type=float, default=0.05,
                    help="a lens argmax that differs from the generated token is a near-tie (not a failure) "
                         "when its logit exceeds the generated token's by at most this [0.05]")
    ap.add_argument("--logprob-tol", type=float, default=0.05,
                    help="largest allowed |lens log-softmax - server logprob| [0.05]")
    a = ap.parse_args()

    run = RunData(a.run)
    reqs = requests_from_capture(run) if a.from_capture else [r for f in a.requests for r in requests_from_file(f)]
    head = Head(a.model, a.gguf_py, act_quant=not a.no_act_quant)
    layers = run.layer_names()
    fails = []
    print(f"attach_check: {a.run}: {len(reqs)} requests, tensors {layers[0]}..{layers[-1] if layers else '-'}, "
          f"model {head.arch} n_layer {head.n_layer} n_embd {head.n_embd} n_vocab {head.n_vocab} "
          f"({'tied token_embd' if head.tied else 'output.weight'} {head.out.tensor_type.name}, eps {head.eps:g}"
          f"{', softcap %g' % head.softcap if head.softcap else ''}"
          f"{', activations rounded as ggml does' if head.act_quant else ''})")
    last = f"l_out-{head.n_layer - 1}"
    if not layers:
        fails.append("run has no l_out-K tensors")
    elif last not in run.rows:
        fails.append(f"run lacks the last layer's {last} (has {layers[0]}..{layers[-1]})")
    else:
        w = run.rows[last]["x"].shape[1]
        if w != head.n_embd:
            die(f"{last} is {w} wide, the model's n_embd is {head.n_embd}: wrong --model?")
    if layers:
        matched = check_rows(run, reqs, layers, fails)
        if last in run.rows:
            check_lens(run, head, reqs, matched, last, fails, a.gap_tol, a.logprob_tol)
    for x, y in a.same:
        compare(x, y, fails, strict=True)
    for x, y in a.similar:
        compare(x, y, fails, strict=False)
    if fails:
        print("FAIL")
        for f in fails:
            print("  - " + f)
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
