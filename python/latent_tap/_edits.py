"""Steering and patching: ``Steer`` adds a vector to the residual stream
(``scale × direction`` to the ``l_out-N`` rows of the steered layers),
``Patch`` replaces one row of a graph node. Both are given to
``Model.generate``/``Model.stream`` and ``Client.complete``/``Client.chat``
as ``steer=``/``patch=`` (one object or a list).

Only what Python alone can tell is checked here (types, array dimensions);
every value (widths, finiteness, layers, positions, scale, node names) is
checked by the library itself when the run starts (in this process for
``Model``, by the server for ``Client``), with errors naming the argument
(``steer[0].vector: …``, ``patch[1].pos: …``).
"""

from __future__ import annotations

import base64
import numbers
import os
from typing import List, Optional, Sequence, Union

import numpy as np

__all__ = ["Steer", "Patch"]


def _floats(name: str, value, ndims) -> np.ndarray:
    """``value`` as a read-only float32 array of one of ``ndims`` dimensions."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be numbers (an array or a list of floats), not {type(value).__name__}")
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as e:  # ragged lists
        raise TypeError(f"{name} must be an array of numbers: {e}") from None
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be an array of real numbers, not of dtype {raw.dtype}")
    with np.errstate(over="ignore"):  # beyond float32: inf, which the library refuses by index
        a = np.array(raw, dtype=np.float32, order="C")  # a copy: later changes to value do not leak in
    if a.ndim not in ndims:
        want = " or ".join(("[n_embd]", "[n_layer, n_embd]")[:len(ndims)])
        raise ValueError(f"{name} must be {want}, not of shape {a.shape}")
    a.setflags(write=False)
    return a


def _layers(layers) -> Optional[str]:
    if layers is None:
        return None
    if isinstance(layers, str):
        return layers
    if isinstance(layers, bool):
        raise TypeError("layers must be a layer list like '6..10', an int or a list of ints, not a bool")
    if isinstance(layers, numbers.Integral):
        return str(int(layers))
    if isinstance(layers, range) and layers.step == 1 and len(layers):
        return f"{layers.start}..{layers.stop}"
    if isinstance(layers, (list, tuple, range)) and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in layers):
        return ",".join(str(int(x)) for x in layers)
    raise TypeError(f"layers must be a layer list like '6..10', an int or a list of ints, not {layers!r}")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


class Steer:
    """Add a steering vector to the residual stream.

    ``Steer(vector=None, *, file=None, layers=None, scale=1.0, positions="all", tensor=None)``

    - ``vector``: anything numpy makes float32: ``[n_embd]`` (one direction for
      every layer) or ``[n_layer, n_embd]`` (row ``N`` for layer ``N``; row 0 is
      unused: layer 0 is never steered);
    - ``file``: instead of ``vector``, a control-vector GGUF (llama.cpp's format,
      ``latent-tap steer-vector``'s output): a local path for ``Model``, a file
      name inside the server's ``--steer-dir`` for ``Client``;
    - ``layers``: the layers steered (``"6..10"`` half-open, ``"6..=9"``,
      ``"3,5"``, an int, a list of ints or a ``range``); default: every layer the
      vector has (``1..n_layer``);
    - ``scale``: multiplies the vector (any finite number; negative steers the
      other way; 0 changes nothing, bit for bit);
    - ``positions``: the rows steered: ``"all"``, ``"prompt"``, ``"generated"``,
      ``"A..B"`` (half-open) or ``"A..=B"`` (positions from 0);
    - ``tensor``: the node family steered, ``TENSOR-N`` for layer ``N``
      (``"attn_out"``, …: each ``TENSOR-N`` must have one float32 row of
      ``n_embd`` values per token); default ``l_out``.

    What is added: ``scale × direction.N``, each product rounded to float32
    once, to the chosen rows of ``l_out-N`` (llama.cpp's control-vector
    convention); captured ``l_out-N`` rows hold the steered values.
    """

    __slots__ = ("vector", "file", "layers", "scale", "positions", "tensor")

    def __init__(self, vector=None, *, file=None, layers=None, scale: float = 1.0, positions: str = "all",
                 tensor=None):
        if (vector is None) == (file is None):
            raise ValueError("Steer needs a vector or a file= (one of the two)")
        self.vector = None if vector is None else _floats("vector", vector, (1, 2))
        if file is not None and not isinstance(file, (str, os.PathLike)):
            raise TypeError(f"file must be a str or a path, not {type(file).__name__}")
        self.file = None if file is None else os.fspath(file)
        self.layers = _layers(layers)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a number, not {type(scale).__name__}")
        self.scale = float(scale)
        if isinstance(positions, range) and positions.step == 1:
            positions = f"{positions.start}..{positions.stop}"
        if not isinstance(positions, str):
            raise TypeError(f"positions must be a str ('all', 'prompt', 'generated', 'A..B'), "
                            f"not {type(positions).__name__}")
        self.positions = positions
        if tensor is not None and not isinstance(tensor, str):
            raise TypeError(f"tensor must be a str such as 'attn_out', not {type(tensor).__name__}")
        self.tensor = tensor

    def __repr__(self) -> str:
        what = f"file={self.file!r}" if self.file is not None else f"vector=<{self.vector.shape} float32>"
        layers = "" if self.layers is None else f", layers={self.layers!r}"
        tensor = "" if self.tensor is None else f", tensor={self.tensor!r}"
        return f"Steer({what}{layers}, scale={self.scale!r}, positions={self.positions!r}{tensor})"

    def _native(self):
        return (self.vector, self.file, self.layers, self.scale, self.positions, self.tensor)

    def _wire(self) -> dict:
        """The entry of a ``serve`` request's ``steer`` array (docs/PROTOCOL.md)."""
        v = {"scale": self.scale, "positions": self.positions}
        if self.vector is not None:
            v["vector"] = _b64(self.vector)
        else:
            v["file"] = self.file
        if self.layers is not None:
            v["layers"] = self.layers
        if self.tensor is not None:
            v["tensor"] = self.tensor
        return v


class Patch:
    """Replace one row of a graph node while the graph runs.

    ``Patch(tensor, pos, data)``: the row at position ``pos`` of node
    ``tensor`` (``"l_out-6"``, ``"attn_out-6"``: any node the graph computes
    once with float32 rows of ``n_embd`` values; ``Model.tensors()`` lists
    them) becomes ``data`` (``n_embd`` finite values, anything numpy makes
    float32), in every sequence of the run. Later nodes compute from the new
    row; a captured row of ``tensor`` at ``pos`` equals ``data``.
    """

    __slots__ = ("tensor", "pos", "data")

    def __init__(self, tensor: str, pos: int, data):
        if not isinstance(tensor, str):
            raise TypeError(f"tensor must be a str such as 'l_out-6', not {type(tensor).__name__}")
        if isinstance(pos, bool) or not isinstance(pos, numbers.Integral):
            raise TypeError(f"pos must be an int, not {type(pos).__name__}")
        self.tensor = tensor
        self.pos = int(pos)
        self.data = _floats("data", data, (1,))

    def __repr__(self) -> str:
        return f"Patch({self.tensor!r}, pos={self.pos}, data=<{self.data.shape} float32>)"

    def _native(self):
        return (self.tensor, self.pos, self.data)

    def _wire(self) -> dict:
        """The entry of a ``serve`` request's ``patch`` array."""
        return {"tensor": self.tensor, "pos": self.pos, "data": _b64(self.data)}


def edit_list(name: str, value, cls) -> List:
    """``steer=``/``patch=``: None, one ``cls`` or a list/tuple of them."""
    if value is None:
        return []
    if isinstance(value, cls):
        return [value]
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if not isinstance(v, cls):
                raise TypeError(f"{name}[{i}] must be a latent_tap.{cls.__name__}, not {type(v).__name__}")
        return list(value)
    raise TypeError(f"{name} must be a latent_tap.{cls.__name__} or a list of them, not {type(value).__name__}")


def wire_fields(steer, patch) -> dict:
    """The ``steer``/``patch`` request fields of ``steer=``/``patch=`` (none when not given)."""
    out = {}
    s, p = edit_list("steer", steer, Steer), edit_list("patch", patch, Patch)
    for i, x in enumerate(s):
        if not np.isfinite(x.scale):  # the library's check, but JSON cannot even carry the value
            raise ValueError(f"steer[{i}].scale: scale {x.scale} is not a finite number")
    if s:
        out["steer"] = [x._wire() for x in s]
    if p:
        out["patch"] = [x._wire() for x in p]
    return out


SteerArg = Union[Steer, Sequence[Steer], None]
PatchArg = Union[Patch, Sequence[Patch], None]
