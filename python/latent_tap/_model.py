"""In-process generation: ``Model`` loads a GGUF model into this process (the
latent-tap library and llama.cpp, compiled into ``latent_tap._native``) and
returns each run's latents as numpy arrays.

The settings and their bounds are the CLI's (``latent-tap capture``): the
native layer passes them to the library's own validators, so a value the CLI
refuses raises ``ValueError`` here with the same reason.
"""

from __future__ import annotations

import json
import types
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._edits import Patch, PatchArg, Steer, SteerArg, edit_list
from ._latents import Latents, Rows
from ._native import LatentTapError

__version__ = _native.__version__

__all__ = ["Model", "Result", "Step", "Token", "Rows", "TensorInfo", "Latents", "LatentTapError"]

_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2")}


class Token(NamedTuple):
    """One token of a run.

    ``id``: token id; ``piece``: its text (a token may hold part of a UTF-8
    character: ``bytes`` has the exact bytes); ``pos``: position in its
    sequence; ``step``: the decode step whose distribution it was drawn from
    (0: the prompt's); ``logprob``, ``entropy`` (nats) and ``top`` (the
    ``top_k`` most likely ``(id, logprob)`` pairs) describe that distribution
    and are ``None`` for prompt tokens.
    """

    id: int
    piece: str
    bytes: bytes
    pos: int
    step: int
    logprob: Optional[float]
    entropy: Optional[float]
    top: Optional[List[Tuple[int, float]]]


class TensorInfo(NamedTuple):
    """A node of the model's graph: ``name`` (what ``tensors=`` patterns
    match), ``layer`` (or ``None``), ``shape`` for one token, ``row_width``
    (elements per token row; ``None``: no per-token row, never captured)."""

    name: str
    layer: Optional[int]
    shape: Tuple[int, ...]
    row_width: Optional[int]





class Result:
    """What ``Model.generate`` returns for one prompt.

    - ``text``: the generated text (prompt not included);
    - ``tokens``: the generated tokens (``Token``, with logprob, entropy, top-k);
    - ``prompt_tokens``: the prompt's tokens (``Token``);
    - ``latents``: tensor name -> ``Rows`` ``[rows, width]`` (``.pos``, ``.seq``,
      ``.step`` label each row), in the order the model computed them;
    - ``stats``: timings and counters of the run (shared by a batch's results);
    - ``edits``: what ``steer=``/``patch=`` applied, as ``serve`` reports it:
      ``{"steer": [{"layers", "positions", "scale", "vector_norm", "tensors",
      "source"}], "patch": [{"tensor", "pos", "norm"}]}`` (only the keys given;
      ``{}`` for an unedited run).
    """

    def __init__(self, prompt: str, tokens: List[Token], prompt_tokens: List[Token], latents: Latents, stats: dict,
                 edits: Optional[dict] = None):
        self.prompt = prompt
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.latents = latents
        self.stats = stats
        self.edits = edits if edits is not None else {}

    @property
    def text(self) -> str:
        """The generated text (pieces joined, then decoded as UTF-8)."""
        return b"".join(t.bytes for t in self.tokens).decode("utf-8", errors="replace")

    @property
    def ids(self) -> List[int]:
        """The generated token ids."""
        return [t.id for t in self.tokens]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.latents.items())
        return f"Result(text={self.text!r}, tokens={len(self.tokens)}, latents={{{shapes}}})"


class Step:
    """One event of ``Model.stream``: a sampled token with the rows its decode
    step computed for its sequence.

    - ``seq``: the prompt's index in the batch; ``token``: the ``Token``;
    - ``latents``: tensor name -> ``Rows`` of this sequence from the decode
      that produced the token's distribution (for the first token: every
      prompt row captured; after that one row per tensor with ``rows="all"``);
    - ``prompt_tokens``: the sequence's prompt tokens on its first step, else ``[]``.
    """

    __slots__ = ("seq", "token", "latents", "prompt_tokens")

    def __init__(self, seq: int, token: Token, latents: Latents, prompt_tokens: List[Token]):
        self.seq = seq
        self.token = token
        self.latents = latents
        self.prompt_tokens = prompt_tokens

    @property
    def piece(self) -> str:
        """The token's text."""
        return self.token.piece

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.latents.items())
        return f"Step(seq={self.seq}, step={self.token.step}, piece={self.token.piece!r}, latents={{{shapes}}})"


def _as_array(data: np.ndarray, dtype: str, width: int) -> np.ndarray:
    """Row bytes (uint8, owned by numpy) as ``[rows, width]``: a view for f32
    and f16; bf16, which numpy lacks, is widened to float32 (a copy)."""
    a = data.view(_DTYPES[dtype])
    if dtype == "bf16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.reshape(-1, width) if width else a.reshape(0, 0)


def _check_int(name: str, v, lo: int, hi: Optional[int] = None, none: bool = False):
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..={hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{name} must be {rng}, not {v}")
    return int(v)


def _check_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, not {type(v).__name__}")
    return float(v)


def _check_str(name: str, v, none: bool = False) -> Optional[str]:
    if v is None and none:
        return None
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, not {type(v).__name__}")
    return v


def _patterns(tensors) -> str:
    if tensors is None:
        return ""
    if isinstance(tensors, str):
        return tensors
    if isinstance(tensors, (list, tuple)) and all(isinstance(t, str) for t in tensors):
        return ",".join(tensors)
    raise TypeError(f"tensors must be a str, a list of str or None, not {type(tensors).__name__}")


def _prompts(prompt) -> Tuple[List[str], bool]:
    if isinstance(prompt, str):
        return [prompt], False
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt must be a str (decode bytes first), not bytes")
    if isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise ValueError("no prompt given: the list is empty")
        return list(prompt), True
    raise TypeError(f"prompt must be a str or a list of str, not {type(prompt).__name__}")


def _token(id_, piece: bytes, pos: int, step: int, logprob, entropy, top) -> Token:
    return Token(id_, piece.decode("utf-8", errors="replace"), piece, pos, step, logprob, entropy, top)


class Model:
    """A GGUF model loaded into this process.

    ``Model(path, threads=None, n_ctx=4096, n_batch=512, n_ubatch=None, gpu_layers=-1, rpc=None)``

    - ``threads``: CPU threads for llama.cpp (default: the CLI's, one per core
      but one spare);
    - ``n_ctx``: context positions shared by a run's prompts (each prompt plus
      ``n_predict`` must fit); ``n_batch``/``n_ubatch``: llama.cpp's logical and
      physical batch;
    - ``gpu_layers``: layers to offload where the build has a GPU backend, or to
      the RPC workers of ``rpc``;
    - ``rpc``: llama.cpp RPC workers ``"HOST:PORT,..."`` (``latent-tap rpc-server``)
      that take the offloaded layers, as the CLI's ``--rpc``.

    Use it as a context manager, or call ``close()``; a closed model raises
    ``ValueError``. Two models can be used from two threads at once; one model
    runs one generation per call (calls from several threads each get their
    own llama.cpp context). The GIL is released while llama.cpp computes.
    """

    def __init__(
        self,
        path,
        *,
        threads: Optional[int] = None,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: Optional[int] = None,
        gpu_layers: int = -1,
        rpc: Optional[str] = None,
    ):
        import os

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or a path, not {type(path).__name__}")
        self._threads = _check_int("threads", threads, 1, none=True)
        self._n_ctx = _check_int("n_ctx", n_ctx, 1)
        self._n_batch = _check_int("n_batch", n_batch, 1)
        self._n_ubatch = _check_int("n_ubatch", n_ubatch, 1, none=True)
        self._native = _native.NativeModel(os.fspath(path), _check_int("gpu_layers", gpu_layers, -1),
                                           _check_str("rpc", rpc, none=True))

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Release the model (a run in flight finishes first). Idempotent."""
        self._native.close()

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran."""
        return self._native.closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"Model({str(self._native.path)!r}, closed)"
        return f"Model({str(self._native.path)!r}, arch={self.arch!r}, n_layer={self.n_layer}, n_embd={self.n_embd})"

    # -- facts -----------------------------------------------------------------
    @property
    def path(self) -> str:
        """The GGUF file."""
        return str(self._native.path)

    @property
    def arch(self) -> str:
        """Architecture (e.g. ``gemma3``)."""
        return self._native.arch

    @property
    def n_layer(self) -> int:
        """Number of layers (``l_out-0`` .. ``l_out-{n_layer-1}``)."""
        return self._native.n_layer

    @property
    def n_embd(self) -> int:
        """Width of the residual stream."""
        return self._native.n_embd

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return self._native.n_vocab

    def tokenize(self, text: str, add_special: bool = True) -> List[int]:
        """Token ids of ``text`` (with the BOS token generation adds, unless ``add_special=False``)."""
        return self._native.tokenize(_check_str("text", text), bool(add_special))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (bytes joined, then decoded as UTF-8)."""
        return b"".join(self._native.token_bytes(_check_int("token id", i, 0)) for i in ids).decode(
            "utf-8", errors="replace"
        )

    def tensors(self, pattern: Optional[str] = None) -> List[TensorInfo]:
        """The nodes of the model's graph (one-token probe), or those matching the
        glob ``pattern`` (comma lists allowed, as for ``tensors=``). Only nodes
        with a ``row_width`` can be captured."""
        from fnmatch import fnmatchcase

        nodes = [TensorInfo(n, l, tuple(s), w) for n, l, s, w in self._native.graph(self._threads)]
        if pattern is None:
            return nodes
        pats = [p.strip() for p in _check_str("pattern", pattern).split(",") if p.strip()]
        if not pats:
            raise ValueError("the pattern is blank: give globs such as 'l_out-*'")
        return [n for n in nodes if any(fnmatchcase(n.name, p) for p in pats)]

    # -- logit lens ------------------------------------------------------------
    def lens_logits(self, x) -> np.ndarray:
        """The logit lens: the model's final norm and unembedding applied to
        residual-stream rows ``x`` (``[rows, n_embd]`` or one ``[n_embd]`` row,
        e.g. ``result.latents["l_out-6"]``), giving float32 logits
        ``[rows, n_vocab]`` (``[n_vocab]`` for one row). On the last layer's
        rows these are the model's own logits. The weights are read on first use."""
        a = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
        one = a.ndim == 1
        if one:
            a = a[None, :]
        if a.ndim != 2:
            raise ValueError(f"x must be [rows, n_embd] or [n_embd], not of shape {a.shape}")
        out = self._native.lens_logits(a, self._threads)
        return out[0] if one else out

    def lens_top(self, x, k: int = 5) -> List[List[Tuple[str, float]]]:
        """Per row of ``x``: the ``k`` tokens the logit lens ranks highest, as
        ``(piece, probability)`` pairs, most likely first."""
        k = _check_int("k", k, 1, self.n_vocab)
        logits = self.lens_logits(np.atleast_2d(np.asarray(x, dtype=np.float32)))
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        out = []
        for row in logp:
            ids = np.argpartition(-row, k - 1)[:k]
            ids = ids[np.argsort(-row[ids])]
            out.append([(self.detokenize([int(i)]), float(np.exp(row[i]))) for i in ids])
        return out

    # -- generation ------------------------------------------------------------
    def _start(self, prompt, n_predict, tensors, layers, rows, dtype, top_k, temperature, sample_top_k, top_p, min_p,
               seed, capture_mode, ring_mb, block_timeout, steer, patch):
        prompts, batch = _prompts(prompt)
        steers = [s._native() for s in edit_list("steer", steer, Steer)]
        patches = [p._native() for p in edit_list("patch", patch, Patch)]
        settings = types.SimpleNamespace(
            n_predict=_check_int("n_predict", n_predict, 1),
            tensors=_patterns(tensors),
            layers=None if layers is None else _check_str("layers", str(layers) if isinstance(layers, int) else layers),
            rows=_check_str("rows", rows),
            dtype=_check_str("dtype", dtype),
            top_k=_check_int("top_k", top_k, 0),
            temperature=_check_float("temperature", temperature),
            sample_top_k=_check_int("sample_top_k", sample_top_k, -(2**31), 2**31 - 1),
            top_p=_check_float("top_p", top_p),
            min_p=_check_float("min_p", min_p),
            seed=_check_int("seed", seed, 0, 2**32 - 1),
            n_ctx=self._n_ctx,
            n_batch=self._n_batch,
            n_ubatch=self._n_ubatch,
            threads=self._threads,
            capture_mode=_check_str("capture_mode", capture_mode),
            ring_mb=_check_int("ring_mb", ring_mb, 1, none=True),
            block_timeout=_check_float("block_timeout", block_timeout),
        )
        return prompts, batch, _native.NativeRun.start(self._native, prompts, settings, steers, patches)

    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        *,
        n_predict: int = 16,
        tensors: Union[str, Sequence[str], None] = "l_out-*",
        layers: Union[str, int, None] = None,
        rows: str = "all",
        dtype: str = "f32",
        top_k: int = 10,
        temperature: float = 0.0,
        sample_top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        capture_mode: str = "auto",
        ring_mb: Optional[int] = None,
        block_timeout: float = 10.0,
        steer: SteerArg = None,
        patch: PatchArg = None,
    ) -> Union[Result, List[Result]]:
        """Generate from ``prompt`` and return the tokens and latents.

        ``prompt``: a str (returns one ``Result``) or a list of str, decoded
        together as one batch, one sequence each (returns a list of ``Result``).

        - ``n_predict``: tokens to sample per prompt (at least 1; stops early at
          an end-of-generation token);
        - ``tensors``: glob(s) over graph node names (``"l_out-*"``,
          ``"attn_out-6,ffn_out-6"``, a list of globs); ``None`` or ``""``: tokens only.
          ``Model.tensors()`` lists the names;
        - ``layers``: keep only these layers, e.g. ``"4..12"``, ``"0,3,5..8"``, ``6``;
        - ``rows``: ``"all"`` (every token's row) or ``"last"`` (only rows whose
          next-token distribution is computed: the prompt's last, each generated);
        - ``dtype``: ``"f32"``, ``"f16"`` or ``"bf16"`` (bf16 arrives widened to float32);
        - ``top_k``: alternatives reported per generated token (``Token.top``);
        - sampling: ``temperature`` (0: greedy), ``sample_top_k`` (0: off),
          ``top_p``, ``min_p``, ``seed``;
        - ``capture_mode``: ``"auto"``, ``"deferred"`` or ``"callback"`` (see the
          repository's docs/capture-modes.md); ``ring_mb``: transport ring size;
          ``block_timeout``: seconds the decode may wait on a full ring;
        - ``steer``: a ``Steer`` or a list of them, vectors added to the
          ``l_out-N`` rows (``Steer(file=PATH)`` reads a control-vector GGUF);
          ``patch``: a ``Patch`` or a list of them, rows replaced. They apply to
          this call only (every sequence of a batch); ``Result.edits`` says what
          was applied. Bad values raise ``ValueError`` naming the argument
          (``steer[0].vector: …``), a missing file ``FileNotFoundError``.

        Latents: ``result.latents[name]`` is a ``Rows`` array ``[rows, width]``
        with ``.pos``/``.seq``/``.step``. For one prompt the f32/f16 rows are the
        library's own buffer, handed to numpy without a copy; a batch's results
        each hold a copy of their sequence's rows.

        Ctrl-C cancels the decode and raises ``KeyboardInterrupt``. Bad values
        raise ``TypeError``/``ValueError`` with the reason; llama.cpp failures
        raise ``LatentTapError``.
        """
        prompts, batch, run = self._start(prompt, n_predict, tensors, layers, rows, dtype, top_k, temperature,
                                          sample_top_k, top_p, min_p, seed, capture_mode, ring_mb, block_timeout,
                                          steer, patch)
        tokens, tensors_raw, _gaps = run.collect()
        stats = json.loads(run.stats() or "{}")
        edits = json.loads(run.edits or "{}")
        stats["skipped"] = dict(run.skipped)
        arrays = {
            name: (_as_array(data, dt, width), pos, seq, step)
            for name, dt, width, data, pos, seq, step in tensors_raw
        }
        dtypes = {name: dt for name, dt, *_ in tensors_raw}
        results = []
        for s, text in enumerate(prompts):
            gen, prm = [], []
            for seq, pos, id_, piece, is_prompt, step, lp, ent, top in tokens:
                if seq == s:
                    (prm if is_prompt else gen).append(_token(id_, piece, pos, step, lp, ent, top))
            lat = Latents()
            for name, (a, pos, seq, step) in arrays.items():
                if len(prompts) == 1:
                    lat[name] = Rows(a, pos, step, seq)
                else:
                    m = seq == s
                    lat[name] = Rows(a[m], pos[m], step[m], seq[m])
                lat.dtype[name] = dtypes[name]
            results.append(Result(text, gen, prm, lat, stats, edits))
        return results if batch else results[0]

    def stream(
        self,
        prompt: Union[str, Sequence[str]],
        *,
        n_predict: int = 16,
        tensors: Union[str, Sequence[str], None] = "l_out-*",
        layers: Union[str, int, None] = None,
        rows: str = "all",
        dtype: str = "f32",
        top_k: int = 10,
        temperature: float = 0.0,
        sample_top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        capture_mode: str = "auto",
        ring_mb: Optional[int] = None,
        block_timeout: float = 60.0,
        steer: SteerArg = None,
        patch: PatchArg = None,
    ) -> Iterator[Step]:
        """Generate like ``generate`` (same arguments), yielding a ``Step`` per
        sampled token as soon as it is sampled, with the rows its decode step
        computed for its sequence (the first step of a sequence carries its
        prompt's rows and ``prompt_tokens``).

        The decode runs ahead while the loop body runs, until the transport ring
        is full; it then waits up to ``block_timeout`` seconds for the loop
        (default 60 here) before the run fails with a ring time-out. Breaking
        out of the loop cancels the decode. Concatenating a sequence's steps
        gives exactly what ``generate`` returns for it (``steer``/``patch``
        included; their values are checked when ``stream`` is called, before
        the first step).
        """
        _prompts_, _batch, run = self._start(prompt, n_predict, tensors, layers, rows, dtype, top_k, temperature,
                                             sample_top_k, top_p, min_p, seed, capture_mode, ring_mb, block_timeout,
                                             steer, patch)
        return _steps(run)


def _steps(run) -> Iterator[Step]:
    dt = run.dtype
    widths = dict(run.selection)
    try:
        while True:
            ev = run.next_event()
            if ev is None:
                return
            seq, pos, step, id_, piece, lp, ent, top, prompt, parts = ev
            lat = Latents()
            for name, data, ppos in parts:
                n = len(ppos)
                lat[name] = Rows(_as_array(data, dt, widths[name]), ppos, np.full(n, step), np.full(n, seq))
                lat.dtype[name] = dt
            prompt_tokens = [_token(i, p, k, 0, None, None, None) for k, (i, p) in enumerate(prompt)]
            yield Step(seq, _token(id_, piece, pos, step, lp, ent, top), lat, prompt_tokens)
    finally:
        run.cancel()
