#!/usr/bin/env python3
"""Read the latents of a `latent-tap capture` run, memory-mapped.

A dataset run (`capture --prompts`: shards latents-NNNNN.safetensors) or a
`capture -p`/`-f` directory (one latents.safetensors; a row's prompt is its
sequence, the order of -p/-f on the command line).

One or more run directories form one dataset (prompt indices are global, so the
directories of a run split with --shard-index/--shard-count read as one):

    from read_run import Run
    run = Run(["runs/part0", "runs/part1", "runs/part2"])
    for name, x, prompt, pos in run.rows(layers=[6], prompts=range(0, 1000)):
        ...  # x: [n, width] rows of tensor `name`; prompt, pos: [n] int arrays

    x = run.array("l_out-6")            # every row of one tensor, in prompt order

Shards are complete safetensors files; this reader parses the format itself
(8-byte header length, JSON header, raw little-endian data) with numpy.memmap,
so only the rows you touch are read from disk. Needs numpy only; the files
also load with `safetensors.numpy.load_file` or `safetensors.torch.load_file`.

Command line:  read_run.py DIR [DIR ...] [--tensor NAME] [--layer L] [--prompts A:B]
prints rows, prompts and mean L2 norm per tensor.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


def _layer(name):
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


class Shard:
    """One memory-mapped safetensors file."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.base = 8 + n
        self.mm = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > self.base else None

    def get(self, name):
        h = self.header[name]
        dt = np.dtype(_DTYPES[h["dtype"]]).newbyteorder("<")
        a, b = h["data_offsets"]
        if a == b:
            return np.zeros(h["shape"], dtype=dt)
        arr = self.mm[self.base + a : self.base + b].view(dt).reshape(h["shape"])
        if h["dtype"] == "BF16":  # widen bfloat16 to float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def _capture_manifest(d, m):
    """A `capture -p`/`-f` manifest seen as a one-shard dataset run."""
    if "prompt" not in m or not os.path.isfile(os.path.join(d, "latents.safetensors")):
        raise ValueError(f"{d}: neither a dataset run (capture --prompts) nor a capture -p/-f directory")
    n = len(m["prompt"])
    return {
        "prompt_range": [0, n],
        "complete": True,
        "tensors": m["tensors"],
        "shards": [{"file": "latents.safetensors", "prompts": [0, n]}],
    }


class Run:
    """Several run directories read as one dataset."""

    def __init__(self, dirs):
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        self.parts = []
        for d in dirs:
            path = os.path.join(d, "manifest.json")
            if not os.path.isfile(path):
                raise ValueError(f"{d}: no manifest.json (not a latent-tap run directory)")
            with open(path) as f:
                m = json.load(f)
            if not m.get("format", "").startswith("latent-tap-dataset/"):
                m = _capture_manifest(d, m)
            self.parts.append((d, m))
        self.parts.sort(key=lambda p: p[1]["prompt_range"][0])
        names = [[t["name"] for t in m["tensors"]] for _, m in self.parts]
        if any(n != names[0] for n in names):
            raise ValueError("the runs captured different tensors")
        self.tensors = names[0] if names else []
        self.complete = all(m["complete"] for _, m in self.parts)

    def _select(self, tensors, layers):
        out = self.tensors
        if tensors is not None:
            tensors = [tensors] if isinstance(tensors, str) else list(tensors)
            out = [t for t in out if t in tensors]
        if layers is not None:
            layers = {layers} if isinstance(layers, int) else set(layers)
            out = [t for t in out if _layer(t) in layers]
        return out

    def rows(self, tensors=None, layers=None, prompts=None):
        """Yield (name, x, prompt, pos) per tensor and shard, in prompt order.
        `prompts`: None, a range, or any collection of prompt indices."""
        names = self._select(tensors, layers)
        lo = hi = None
        if isinstance(prompts, range) and prompts.step == 1:
            lo, hi = prompts.start, prompts.stop
        elif prompts is not None:
            prompts = np.fromiter(prompts, dtype=np.int64)
            lo, hi = (int(prompts.min()), int(prompts.max()) + 1) if len(prompts) else (0, 0)
        for name in names:
            for d, m in self.parts:
                for s in m["shards"]:
                    a, b = s["prompts"]
                    if lo is not None and (b <= lo or a >= hi):
                        continue
                    sh = Shard(os.path.join(d, s["file"]))
                    x, pos = sh.get(name), sh.get(name + ".pos")
                    # capture -p/-f: no NAME.prompt; the sequence is the prompt.
                    p = sh.get(name + ".prompt") if name + ".prompt" in sh.header else sh.get(name + ".seq").astype(np.int64)
                    if prompts is not None:
                        keep = (p >= lo) & (p < hi) if not isinstance(prompts, np.ndarray) else np.isin(p, prompts)
                        if not keep.all():
                            x, p, pos = x[keep], p[keep], pos[keep]
                    if len(p):
                        yield name, x, p, pos

    def array(self, name, prompts=None):
        """Every row of tensor `name` (optionally of some prompts) as one array."""
        parts = [x for _, x, _, _ in self.rows(tensors=[name], prompts=prompts)]
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts)


def main(argv):
    ap = argparse.ArgumentParser(
        description="Rows, prompts and mean L2 norm per tensor of latent-tap run directories "
        "(capture --prompts runs, or capture -p/-f directories).")
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="run directory (several: one dataset)")
    ap.add_argument("--tensor", help="only this tensor")
    ap.add_argument("--layer", type=int, help="only tensors of this layer")
    ap.add_argument("--prompts", metavar="A:B", help="only prompts A to B-1")
    a = ap.parse_args(argv)
    dirs, tensor, layer, prompts = a.dirs, a.tensor, a.layer, None
    if a.prompts is not None:
        try:
            a_, b_ = a.prompts.split(":")
            prompts = range(int(a_), int(b_))
        except ValueError:
            ap.error(f"--prompts must be A:B (e.g. 0:100), not {a.prompts!r}")
    try:
        run = Run(dirs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = {}
    for name, x, p, _ in run.rows(tensors=tensor, layers=layer, prompts=prompts):
        n, s, ps = stats.get(name, (0, 0.0, set()))
        x = np.asarray(x, dtype=np.float32)
        stats[name] = (n + len(x), s + float(np.linalg.norm(x, axis=1).sum()), ps | set(np.unique(p).tolist()))
    for name in run._select(tensor, layer):
        n, s, ps = stats.get(name, (0, 0.0, set()))
        print(f"{name} rows {n} prompts {len(ps)} mean_l2 {s / max(n, 1):.4f}")
    if not run.complete:
        print("incomplete run (resume it with --resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
