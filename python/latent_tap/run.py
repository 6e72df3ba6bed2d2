"""Read the run directories that latent-tap writes, memory-mapped, and export them
for SAE training.

A run directory is one of

- a dataset run (``latent-tap capture --prompts``, or ``latent-tap listen``):
  ``manifest.json`` (format ``latent-tap-dataset/1``), shards
  ``latents-NNNNN.safetensors`` and ``tokens.jsonl``;
- a ``latent-tap capture -p/-f`` directory: one ``latents.safetensors``; a row's
  prompt is its sequence, the order of ``-p``/``-f`` on the command line.

Several directories read as one dataset (prompt indices are global, so the parts
of a run split with ``--shard-index/--shard-count`` read as one)::

    from latent_tap import Run
    run = Run(["runs/part0", "runs/part1"])
    for name, x, prompt, pos in run.rows(layers=[6], prompts=range(0, 1000)):
        ...  # x: [n, width] rows of tensor `name`; prompt, pos: [n] int arrays
    x = run.array("l_out-6")              # every row of one tensor, in prompt order
    run.to_hf_dataset("cache/l6", tensor="l_out-6", context_size=128)   # for SAELens

Shards are complete safetensors files; this reader parses the format itself
(8-byte header length, JSON header, raw little-endian data) with numpy.memmap,
so only the rows you touch are read from disk. Needs numpy only (``torch`` for
:meth:`Run.torch_dataset`, ``datasets`` for :meth:`Run.to_hf_dataset`).

Command line: ``python -m latent_tap.run DIR [DIR ...] [--tensor NAME] [--layer L]
[--prompts A:B]`` prints rows, prompts and mean L2 norm per tensor.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

from ._export import hook_name_for, to_hf_dataset

__all__ = ["Run", "Shard", "hook_name_for"]

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


def _layer(name):
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


class Shard:
    """One memory-mapped safetensors file: ``header`` (the JSON header) and
    :meth:`get`."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self.header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        self.base = 8 + n
        self.mm = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > self.base else None

    def get(self, name):
        """Tensor ``name`` as a read-only memory-mapped numpy array (bf16 is widened
        to float32, which reads it into memory)."""
        if name not in self.header:
            raise KeyError(f"{self.path} has no tensor {name!r}")
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
        "arch": (m.get("model") or {}).get("arch"),
        "model": (m.get("model") or {}).get("path"),
        "capture_p": True,
    }


class Run:
    """Several run directories read as one dataset.

    ``Run(dirs)``: one directory (str or path) or a list of them. Attributes:
    ``tensors`` (captured tensor names, in the runs' order), ``widths``
    (``{name: row width}``), ``complete`` (False while a dataset run can still be
    resumed), ``dirs``. Raises ``ValueError`` for a directory that is not a
    latent-tap run, or runs that captured different tensors."""

    def __init__(self, dirs):
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        try:
            dirs = [os.fspath(d) for d in dirs]
        except TypeError:
            raise TypeError(f"dirs must be a path or a list of paths, not {dirs!r}") from None
        if not dirs:
            raise ValueError("no run directories given")
        self.dirs, self.parts = dirs, []
        for d in dirs:
            path = os.path.join(d, "manifest.json")
            if not os.path.isfile(path):
                raise ValueError(f"{d}: no manifest.json (not a latent-tap run directory)")
            try:
                with open(path, encoding="utf-8") as f:
                    m = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            if not str(m.get("format", "")).startswith("latent-tap-dataset/"):
                m = _capture_manifest(d, m)
            self.parts.append((d, m))
        self.parts.sort(key=lambda p: p[1]["prompt_range"][0])
        names = [[t["name"] for t in m["tensors"]] for _, m in self.parts]
        if any(n != names[0] for n in names):
            raise ValueError("the runs captured different tensors")
        self.tensors = names[0]
        self.widths = {t["name"]: int(t["width"]) for t in self.parts[0][1]["tensors"]}
        self.complete = all(m["complete"] for _, m in self.parts)

    def __repr__(self):
        return f"Run({self.dirs!r}, tensors={len(self.tensors)}, complete={self.complete})"

    def _select(self, tensors, layers):
        out = self.tensors
        if tensors is not None:
            tensors = [tensors] if isinstance(tensors, str) else list(tensors)
            unknown = [t for t in tensors if t not in self.tensors]
            if unknown:
                raise ValueError(f"the run has no tensor {unknown[0]!r} "
                                 f"(it has {', '.join(self.tensors)})")
            out = [t for t in out if t in tensors]
        if layers is not None:
            layers = {layers} if isinstance(layers, int) else set(layers)
            out = [t for t in out if _layer(t) in layers]
        return out

    def rows(self, tensors=None, layers=None, prompts=None):
        """Yield ``(name, x, prompt, pos)`` per tensor and shard, in prompt order.

        ``x``: the rows ``[n, width]`` (memory-mapped when unfiltered); ``prompt``
        (int64) and ``pos`` (int32): ``[n]``. Rows of one shard come in capture
        order (several prompts may interleave; sort by ``(prompt, pos)`` if needed).
        ``tensors``: a name or names (None: all); ``layers``: an int or ints;
        ``prompts``: None, a range, or any collection of prompt indices."""
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
        """Every row of tensor ``name`` (optionally of some prompts) as one array
        ``[rows, width]``, in the order of :meth:`rows`."""
        parts = [x for _, x, _, _ in self.rows(tensors=[name], prompts=prompts)]
        if not parts:
            return np.zeros((0, self.widths.get(name, 0)), dtype=np.float32)
        return np.concatenate(parts)

    def token_ids(self):
        """``{prompt: {pos: token id}}`` from the runs' ``tokens.jsonl`` (every
        position any tensor carried). Raises ``ValueError`` when a directory has
        no tokens.jsonl."""
        table = {}
        for d, m in self.parts:
            path = os.path.join(d, "tokens.jsonl")
            if not os.path.isfile(path):
                raise ValueError(f"{d}: no tokens.jsonl (token ids are unknown)")
            limit = m.get("tokens_bytes")
            with open(path, "rb") as f:
                data = f.read(limit) if isinstance(limit, int) else f.read()
            for line in data.splitlines():
                if not line.strip():
                    continue
                t = json.loads(line)
                p = t["prompt_index"] if "prompt_index" in t else t["seq"]
                table.setdefault(int(p), {})[int(t["pos"])] = int(t["token"])
        return table

    def torch_dataset(self, name, prompts=None):
        """A ``torch.utils.data.Dataset`` of the rows of tensor ``name`` (each item a
        float32 tensor ``[width]``), read from the memory-mapped shards on access.
        Needs torch (imported here; ``ImportError`` with a hint otherwise)."""
        try:
            import torch
            from torch.utils.data import Dataset
        except ImportError as e:
            raise ImportError("Run.torch_dataset needs PyTorch: pip install torch") from e
        blocks = [x for _, x, _, _ in self.rows(tensors=[name], prompts=prompts)]
        starts = np.cumsum([0] + [len(x) for x in blocks])

        class RowDataset(Dataset):
            def __len__(self):
                return int(starts[-1])

            def __getitem__(self, i):
                i = int(i)
                if i < 0:
                    i += len(self)
                if not 0 <= i < len(self):
                    raise IndexError(f"row {i} out of range for {len(self)} rows")
                b = int(np.searchsorted(starts, i, side="right")) - 1
                return torch.from_numpy(np.array(blocks[b][i - starts[b]], dtype=np.float32))

        return RowDataset()

    def to_hf_dataset(self, path, tensor="l_out-6", context_size=128, hook_name=None,
                      prompts=None, dtype="float32"):
        """Write tensor ``tensor`` as a Hugging Face ``datasets`` directory in the
        layout of SAELens's activation cache (``CacheActivationsRunner``), so SAELens
        trains from it with ``use_cached_activations=True`` and
        ``cached_activations_path=path``. See docs/python.md, "Export for SAE
        training", for the layout, the hook names and what is dropped.

        One row per window of ``context_size`` consecutive positions of one prompt:
        column ``hook_name`` (default: the TransformerLens hook of ``tensor``, see
        :func:`hook_name_for`) is ``Array2D((context_size, width), dtype)``, column
        ``token_ids`` is ``Sequence(int32, length=context_size)``. A prompt's rows
        are cut into windows from position 0; the remainder (and a prompt shorter
        than ``context_size``) is dropped, as SAELens drops incomplete batches:
        nothing is padded. Returns the number of windows written. Needs the
        ``datasets`` package (``ImportError`` with a hint otherwise)."""
        return to_hf_dataset(self, path, tensor, context_size, hook_name, prompts, dtype)


def main(argv=None):
    """The command line; returns the exit status."""
    ap = argparse.ArgumentParser(
        description="Rows, prompts and mean L2 norm per tensor of latent-tap run directories "
        "(capture --prompts runs, or capture -p/-f directories).")
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="run directory (several: one dataset)")
    ap.add_argument("--tensor", help="only this tensor")
    ap.add_argument("--layer", type=int, help="only tensors of this layer")
    ap.add_argument("--prompts", metavar="A:B", help="only prompts A to B-1")
    a = ap.parse_args(argv)
    prompts = None
    if a.prompts is not None:
        try:
            a_, b_ = a.prompts.split(":")
            prompts = range(int(a_), int(b_))
        except ValueError:
            ap.error(f"--prompts must be A:B (e.g. 0:100), not {a.prompts!r}")
    try:
        run = Run(a.dirs)
        stats = {}
        for name, x, p, _ in run.rows(tensors=a.tensor, layers=a.layer, prompts=prompts):
            n, s, ps = stats.get(name, (0, 0.0, set()))
            x = np.asarray(x, dtype=np.float32)
            stats[name] = (n + len(x), s + float(np.linalg.norm(x, axis=1).sum()),
                           ps | set(np.unique(p).tolist()))
        names = run._select(a.tensor, a.layer)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in names:
        n, s, ps = stats.get(name, (0, 0.0, set()))
        print(f"{name} rows {n} prompts {len(ps)} mean_l2 {s / max(n, 1):.4f}")
    if not run.complete:
        print("incomplete run (resume it with --resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
