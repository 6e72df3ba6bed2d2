"""Export of a run's rows for SAE training: a Hugging Face ``datasets`` directory
in the layout of SAELens's activation cache (matched against SAELens v6.18.0,
``sae_lens/cache_activations_runner.py``: one column named after the hook,
``Array2D(shape=(context_size, d_in), dtype)``, and ``token_ids``,
``Sequence(Value("int32"), length=context_size)``). Used by
:meth:`latent_tap.Run.to_hf_dataset`; ``datasets`` is imported only here.
"""

import os
import re
import shutil
import tempfile

import numpy as np

# latent-tap (llama.cpp graph) tensor name -> TransformerLens hook, per layer N.
# Checked against llama.cpp's graphs (src/models/llama.cpp, src/models/gemma3.cpp)
# and TransformerLens's TransformerBlock (which, for models with a norm after
# attention and after the MLP, Gemma 2/3, hooks hook_attn_out / hook_mlp_out
# after that norm: "what is added to the residual stream").
_HOOKS = {
    "l_out": "hook_resid_post",          # every architecture: the block's output
    "attn_post_norm": "hook_attn_out",   # Gemma 2/3: attention output after its post-norm
    "ffn_post_norm": "hook_mlp_out",     # Gemma 2/3: MLP output after its post-norm
    "sa_out": "hook_resid_mid",          # Gemma 3: residual after attention
    "ffn_inp": "hook_resid_mid",         # llama-style graphs: residual after attention
    "attn_out": "hook_attn_out",         # llama-style graphs (no post-attention norm)
    "ffn_out": "hook_mlp_out",           # llama-style graphs (no post-MLP norm)
}
# Names whose meaning differs on Gemma: there the hook is the post-norm node.
_NOT_ON_GEMMA = {"attn_out": "attn_post_norm", "ffn_out": "ffn_post_norm"}


def hook_name_for(tensor, arch=None):
    """The TransformerLens hook name of latent-tap tensor ``tensor``:
    ``l_out-6`` -> ``blocks.6.hook_resid_post`` (see docs/python.md for the table).

    ``arch``: the model's architecture (``"gemma3"``, ``"llama"``, ...) when known;
    on Gemma, ``attn_out-N``/``ffn_out-N`` are refused because TransformerLens's
    ``hook_attn_out``/``hook_mlp_out`` are ``attn_post_norm-N``/``ffn_post_norm-N``
    there. Raises ``ValueError`` for names without a known hook (pass ``hook_name=``
    to :meth:`Run.to_hf_dataset` to label them yourself)."""
    m = re.fullmatch(r"([A-Za-z_]+)-(\d+)", tensor or "")
    if not m or m.group(1) not in _HOOKS:
        raise ValueError(f"no TransformerLens hook is known for tensor {tensor!r}; "
                         f"pass hook_name='blocks.N.hook_...' to name the column yourself")
    kind, layer = m.group(1), int(m.group(2))
    if kind in _NOT_ON_GEMMA and arch and "gemma" in arch.lower():
        raise ValueError(f"on {arch}, TransformerLens's blocks.{layer}.{_HOOKS[kind]} is "
                         f"{_NOT_ON_GEMMA[kind]}-{layer} (after the post-norm), not {tensor}; "
                         f"export {_NOT_ON_GEMMA[kind]}-{layer}, or pass hook_name= to label {tensor} anyway")
    return f"blocks.{layer}.{_HOOKS[kind]}"


def _arch(run):
    """The model's architecture as far as the manifests say (capture -p has it; a
    dataset run has only the model path, so a path naming gemma counts as Gemma)."""
    _, m = run.parts[0]
    if m.get("arch"):
        return m["arch"]
    model = m.get("model") or (m.get("config") or {}).get("model") or ""
    return "gemma" if "gemma" in os.path.basename(str(model)).lower() else None


def _windows(p, pos, context_size):
    """Windows of `context_size` consecutive positions of one prompt, cut from its
    first row: lists of row indices into the block. `p`, `pos`: the block's arrays."""
    order = np.lexsort((pos, p))
    ps, qs = p[order], pos[order]
    out = []
    bounds = np.flatnonzero(np.diff(ps)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(ps)]):
        i = a
        while i + context_size <= b:
            j = i + context_size
            steps = np.diff(qs[i:j])
            breaks = np.flatnonzero(steps != 1)
            if len(breaks) == 0:
                out.append((int(ps[i]), order[i:j]))
                i = j
            else:  # a hole in the positions: start again after it
                i = i + int(breaks[0]) + 1
    return out


def to_hf_dataset(run, path, tensor, context_size, hook_name=None, prompts=None, dtype="float32"):
    """See :meth:`latent_tap.Run.to_hf_dataset`."""
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"context_size must be a positive int, not {context_size!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
    if tensor not in run.tensors:
        raise ValueError(f"the run has no tensor {tensor!r} (it has {', '.join(run.tensors)})")
    if hook_name is not None and (not isinstance(hook_name, str) or not hook_name
                                  or hook_name == "token_ids"):
        raise ValueError(f"hook_name must be a non-empty string other than 'token_ids', not {hook_name!r}")
    hook = hook_name or hook_name_for(tensor, _arch(run))
    path = os.fspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} exists and is not an empty directory")
    try:
        from datasets import Array2D, Dataset, Features, Sequence, Value
        from datasets.arrow_writer import ArrowWriter
    except ImportError as e:
        raise ImportError("Run.to_hf_dataset needs the Hugging Face datasets package: "
                          "pip install datasets") from e

    width = run.widths[tensor]
    tokens = run.token_ids()
    features = Features({
        hook: Array2D(shape=(context_size, width), dtype=dtype),
        "token_ids": Sequence(Value(dtype="int32"), length=context_size),
    })
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".latent-tap-export-", dir=parent)
    n = 0
    try:
        arrow = os.path.join(tmp, "windows.arrow")
        writer = ArrowWriter(features=features, path=arrow)
        for _, x, p, pos in run.rows(tensors=[tensor], prompts=prompts):
            p, pos = np.asarray(p), np.asarray(pos)
            for prompt, idx in _windows(p, pos, context_size):
                known = tokens.get(prompt, {})
                try:
                    ids = np.array([known[int(q)] for q in pos[idx]], dtype=np.int32)
                except KeyError as e:
                    raise ValueError(f"tokens.jsonl has no token for prompt {prompt} "
                                     f"position {e.args[0]}") from None
                writer.write({hook: np.asarray(x[idx], dtype=dtype),
                              "token_ids": ids})
                n += 1
        writer.finalize()
        if n == 0:
            raise ValueError(f"no prompt has {context_size} consecutive positions of {tensor}: "
                             f"nothing to export (use a smaller context_size)")
        import datasets
        quiet = datasets.is_progress_bar_enabled()
        if quiet:  # no progress bar for a local copy
            datasets.disable_progress_bars()
        try:
            Dataset.from_file(arrow).save_to_disk(path)
        finally:
            if quiet:
                datasets.enable_progress_bars()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n
