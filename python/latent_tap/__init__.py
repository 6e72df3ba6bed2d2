"""latent-tap for Python: per-layer latents of a llama.cpp model as numpy arrays.

Three ways in, one package:

- ``Model``: generate in this process (the library itself, through PyO3), with
  the latents of every step as numpy arrays; ``Steer`` and ``Patch`` edit the
  residual stream of a run (also through ``Client``).
- ``Client``: talk to a running ``latent-tap serve`` (JSON, SSE, the binary
  record stream, subscribers).
- ``Run``: read the run directories that ``latent-tap capture``, dataset capture
  and ``latent-tap listen`` write, and export them for SAE training.
"""

from importlib import import_module as _import_module

__all__ = ["Model", "Result", "Step", "Token", "Latents", "Rows", "Steer", "Patch", "Client", "Run", "LatentTapError",
           "__version__"]

# Submodules are imported on first use, so ``import latent_tap`` stays cheap and
# the pure-Python parts (Client, Run) import without loading llama.cpp.
_LAZY = {
    "Model": "._model",
    "Result": "._model",
    "Step": "._model",
    "Latents": "._latents",
    "Rows": "._latents",
    "Token": "._model",
    "Steer": "._edits",
    "Patch": "._edits",
    "LatentTapError": "._model",
    "__version__": "._model",
    "Client": ".client",
    "Run": ".run",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'latent_tap' has no attribute {name!r}")
    value = getattr(_import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
