#!/usr/bin/env python3
"""Client for `latent-tap serve`: completions with latents over JSON, SSE and the
binary record stream, and a subscriber that records every request's latents.

A thin command line over the `latent_tap` package (python/latent_tap/client.py,
the same as `python -m latent_tap.client`); uses this repository's python/ when
it is there, else an installed `latent_tap`. Needs numpy (`safetensors` for
.safetensors recordings, else `.npz`).

    python3 client.py complete  --url http://127.0.0.1:8080 --prompt "The capital of France is" \
                                --tensors 'l_out-*' [--binary | --sse | --json] [--check]
    python3 client.py subscribe --url http://127.0.0.1:8080 --tensors 'l_out-*' --out DIR [--max-requests N]
    python3 client.py selftest  --url http://127.0.0.1:8080
"""

import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.isfile(os.path.join(_PY, "latent_tap", "__init__.py")):
    sys.path.insert(0, os.path.normpath(_PY))

from latent_tap.client import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
