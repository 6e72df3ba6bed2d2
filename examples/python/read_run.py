#!/usr/bin/env python3
"""Read the latents of a `latent-tap capture` run, memory-mapped.

A thin wrapper over the `latent_tap` package (python/latent_tap/run.py, the same
as `python -m latent_tap.run`); uses this repository's python/ when it is there,
else an installed `latent_tap`. Needs numpy only.

A dataset run (`capture --prompts`: shards latents-NNNNN.safetensors) or a
`capture -p`/`-f` directory (one latents.safetensors; a row's prompt is its
sequence). One or more run directories form one dataset:

    from read_run import Run          # or: from latent_tap import Run
    run = Run(["runs/part0", "runs/part1", "runs/part2"])
    for name, x, prompt, pos in run.rows(layers=[6], prompts=range(0, 1000)):
        ...  # x: [n, width] rows of tensor `name`; prompt, pos: [n] int arrays
    x = run.array("l_out-6")            # every row of one tensor, in prompt order

Command line:  read_run.py DIR [DIR ...] [--tensor NAME] [--layer L] [--prompts A:B]
prints rows, prompts and mean L2 norm per tensor.
"""

import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.isfile(os.path.join(_PY, "latent_tap", "__init__.py")):
    sys.path.insert(0, os.path.normpath(_PY))

from latent_tap.run import Run, Shard, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
