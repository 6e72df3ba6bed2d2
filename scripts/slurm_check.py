#!/usr/bin/env python3
"""Check that the part directories of a split capture equal one single run.

    slurm_check.py REF COUNT PART [PART ...] [--resumed PART]

REF: a `capture --prompts` run of the whole prompt file; PARTs: the runs of
`--shard-index I --shard-count COUNT`, I = 0..COUNT-1 (scripts/test-slurm).
Both sides ran with --parallel 1, so every row must be equal byte for byte:
the latents of every tensor, their prompt indices and positions (read with
examples/python/read_run.py), and the tokens (tokens.jsonl). --resumed names a
part that was stopped and resumed: it must be complete, with no partial shard
and at least two shards (one kept across the resume).

Prints one PASS or FAIL line per check; exit status 1 when one failed, 2 on a
usage or input error.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "python"))
from read_run import Run  # noqa: E402

failed = 0


def check(ok, what):
    global failed
    print(f"{'PASS' if ok else 'FAIL'} {what}")
    failed += 0 if ok else 1


def manifest(d):
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def tokens(d):
    with open(os.path.join(d, "tokens.jsonl")) as f:
        return [json.loads(line) for line in f]


def distance(g, w):
    """(text, max relative L2 distance per row) between two row sets, rows matched by (prompt, pos)."""
    try:
        def table(rs):
            x = np.concatenate([np.asarray(r[1], dtype=np.float32) for r in rs])
            p, pos = np.concatenate([r[2] for r in rs]), np.concatenate([r[3] for r in rs])
            o = np.lexsort((pos, p))
            return x[o], p[o], pos[o]
        gx, gp, gq = table(g)
        wx, wp, wq = table(w)
        if gx.shape != wx.shape or not (np.array_equal(gp, wp) and np.array_equal(gq, wq)):
            return f" (rows differ: {gx.shape} vs {wx.shape})", float("inf")
        d = np.linalg.norm(gx - wx, axis=1) / np.maximum(np.linalg.norm(wx, axis=1), 1e-30)
        return f" (max relative L2 distance per row {d.max():.2e}, {int((d > 0).sum())} of {len(d)} rows differ)", float(d.max())
    except ValueError as e:
        return f" ({e})", float("inf")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref")
    ap.add_argument("count", type=int)
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--resumed", help="a part that was stopped and resumed")
    a = ap.parse_args(argv)
    try:
        ref = manifest(a.ref)
        parts = sorted(((manifest(p), p) for p in a.parts), key=lambda mp: mp[0]["config"]["shard_index"])
    except (OSError, ValueError, KeyError) as e:
        print(f"slurm_check: error: {e}", file=sys.stderr)
        return 2

    # manifests: COUNT complete parts, contiguous blocks covering the reference's prompts
    n = ref["prompt_lines"]
    check(ref["complete"] and ref["prompt_range"] == [0, n] and ref["prompts_captured"] == n,
          f"reference: complete, prompts [0, {n}) all captured ({ref['prompts_captured']})")
    idx = [m["config"]["shard_index"] for m, _ in parts]
    check(idx == list(range(a.count)) and all(m["config"]["shard_count"] == a.count for m, _ in parts),
          f"{len(parts)} parts, shard indices 0..{a.count - 1} of {a.count} ({idx[:3]}...{idx[-1:]})")
    bad = [p for m, p in parts if not m["complete"] or any(s.get("partial") for s in m["shards"])]
    check(not bad, f"every part complete, no partial shard ({len(bad)} not)")
    ranges = [m["prompt_range"] for m, _ in parts]
    contiguous = ranges[0][0] == 0 and ranges[-1][1] == n and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    check(contiguous and all(r[1] > r[0] for r in ranges),
          f"part prompt ranges are contiguous, non-empty blocks covering [0, {n}): {ranges[:2]}...{ranges[-1:]}")
    for key in ("prompts_captured", "tokens"):
        s = sum(m[key] for m, _ in parts)
        check(s == ref[key], f"{key}: parts sum {s} == reference {ref[key]}")

    # tokens.jsonl: the parts in order == the reference, record for record
    # ("index" is the row's index in its own run directory, so it restarts per part)
    want = tokens(a.ref)
    got = [t for _, p in parts for t in tokens(p)]
    strip = lambda ts: [{k: v for k, v in t.items() if k != "index"} for t in ts]  # noqa: E731
    same = strip(got) == strip(want)
    where = next((i for i, (g, w) in enumerate(zip(strip(got), strip(want))) if g != w), None)
    check(same and len(want) > 0,
          f"tokens: {len(got)} records == reference {len(want)}" + ("" if same else f" (first difference at {where})"))

    # latents: every tensor, every row, byte for byte
    rp, rr = Run([p for _, p in parts]), Run([a.ref])
    check(rp.tensors == rr.tensors and len(rr.tensors) > 0,
          f"tensors: {len(rp.tensors)} in the parts, {len(rr.tensors)} in the reference")
    rows = 0
    diff, worst = [], (0.0, "")
    for name in rr.tensors:
        g = list(rp.rows(tensors=[name]))
        w = list(rr.rows(tensors=[name]))
        cat = lambda rs, i: np.concatenate([r[i] for r in rs]) if rs else np.zeros(0)  # noqa: E731
        gx, wx = cat(g, 1), cat(w, 1)
        ok = (gx.shape == wx.shape and gx.dtype == wx.dtype and gx.tobytes() == wx.tobytes()
              and np.array_equal(cat(g, 2), cat(w, 2)) and np.array_equal(cat(g, 3), cat(w, 3)))
        rows += len(wx)
        if not ok:
            text, dmax = distance(g, w)
            diff.append(f"{name}{text}")
            worst = max(worst, (dmax, name))
    check(not diff and rows > 0,
          f"latents: {rows} rows of {len(rr.tensors)} tensors equal byte for byte (prompt, pos too)"
          + (f"; {len(diff)} differ, the largest distance {worst[0]:.2e} in {worst[1]}: {', '.join(diff[:4])}" if diff else ""))

    if a.resumed:
        m = manifest(a.resumed)
        ok = m["complete"] and len(m["shards"]) >= 2 and not any(s.get("partial") for s in m["shards"])
        check(ok, f"resumed part {os.path.basename(a.resumed)}: complete {m['complete']}, "
                  f"{len(m['shards'])} shards (>= 2), none partial")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
