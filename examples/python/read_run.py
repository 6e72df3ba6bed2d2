#!/usr/bin/env python3
"""Read the latents of a `latent-tap capture --prompts` run, memory-mapped.

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
prints rows, width and mean L2 norm per tensor.
"""

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


class Run:
    """Several run directories read as one dataset."""

    def __init__(self, dirs):
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        self.parts = []
        for d in dirs:
            with open(os.path.join(d, "manifest.json")) as f:
                m = json.load(f)
            if not m.get("format", "").startswith("latent-tap-dataset/"):
                raise ValueError(f"{d}: not a latent-tap dataset run")
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
                    x, p, pos = sh.get(name), sh.get(name + ".prompt"), sh.get(name + ".pos")
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
    dirs, tensor, layer, prompts = [], None, None, None
    it = iter(argv)
    for a in it:
        if a == "--tensor":
            tensor = next(it)
        elif a == "--layer":
            layer = int(next(it))
        elif a == "--prompts":
            a_, b_ = next(it).split(":")
            prompts = range(int(a_), int(b_))
        else:
            dirs.append(a)
    if not dirs:
        print(__doc__, file=sys.stderr)
        return 2
    run = Run(dirs)
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
