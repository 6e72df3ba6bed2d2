"""The one container of latents every part of the package returns
(``Model.generate``/``stream``, ``Client`` completions and subscriptions):
``Latents``, a dict of tensor name -> ``Rows``, a numpy array with per-row labels."""

from typing import Optional

import numpy as np

__all__ = ["Rows", "Latents"]


class Rows(np.ndarray):
    """The ``[rows, width]`` latents of one tensor, with per-row labels:
    ``.pos`` (int32 position in the sequence), ``.step`` (int32 decode step: 0
    for the prompt's rows, k for the decode of generated token k) and ``.seq``
    (int32 sequence: the prompt's index in a batch; ``None`` where the source
    has one sequence per request, as ``Client``).

    It is a numpy array; indexing it and computing with it give plain
    ``numpy.ndarray`` results (the labels belong to the whole array only:
    index ``.pos`` the same way).
    """

    pos: np.ndarray
    step: np.ndarray
    seq: Optional[np.ndarray]

    def __new__(cls, data, pos, step, seq=None) -> "Rows":
        obj = np.asarray(data).view(cls)
        obj.pos = np.asarray(pos, dtype=np.int32).reshape(-1)
        obj.step = np.asarray(step, dtype=np.int32).reshape(-1)
        obj.seq = None if seq is None else np.asarray(seq, dtype=np.int32).reshape(-1)
        return obj

    def __array_finalize__(self, obj) -> None:
        if obj is not None:
            self.pos = getattr(obj, "pos", None)
            self.step = getattr(obj, "step", None)
            self.seq = getattr(obj, "seq", None)

    def __getitem__(self, key):
        return np.asarray(self)[key]

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        arr = np.asarray(arr)
        return arr[()] if return_scalar else arr

    def __reduce__(self):
        return (Rows, (np.asarray(self), self.pos, self.step, self.seq))


class Latents(dict):
    """Tensor name -> ``Rows`` ``[rows, width]`` (float32, or float16 when
    requested as ``f16``; ``bf16`` is widened to float32), rows in the order
    the model computed them (step order, positions increasing within a step).

    Besides ``latents[name].pos`` / ``.step`` / ``.seq``, the same labels are
    available per tensor as ``latents.pos[name]``, ``latents.step[name]`` and
    ``latents.seq[name]``; ``latents.dtype[name]`` is the dtype the rows were
    captured in (``f32``, ``f16`` or ``bf16``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dtype = {}

    @property
    def pos(self):
        """name -> each row's position."""
        return {k: v.pos for k, v in self.items()}

    @property
    def step(self):
        """name -> each row's decode step."""
        return {k: v.step for k, v in self.items()}

    @property
    def seq(self):
        """name -> each row's sequence (``None`` for a single-sequence source)."""
        return {k: v.seq for k, v in self.items()}

    def __repr__(self):
        inner = ", ".join(f"{k!r}: {list(v.shape)}" for k, v in self.items())
        return f"Latents({{{inner}}})"

    def equals(self, other) -> bool:
        """True when both hold the same tensors with identical arrays, positions,
        steps and dtypes (bit for bit)."""
        return list(self) == list(other) and all(
            self[k].dtype == other[k].dtype
            and np.array_equal(self[k], other[k])
            and np.array_equal(self[k].pos, other[k].pos)
            and np.array_equal(self[k].step, other[k].step)
            and self.dtype.get(k) == other.dtype.get(k)
            for k in self
        )
