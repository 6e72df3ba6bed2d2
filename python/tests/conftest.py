"""Shared fixtures: the `latent-tap` binary of this checkout, a synthetic model
made by it, and the real model when `scripts/fetch-model` has run."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REAL_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def binary() -> str:
    """The CLI: $LATENT_TAP_BIN, else target/release/latent-tap, else PATH."""
    env = os.environ.get("LATENT_TAP_BIN")
    if env:
        return env
    built = ROOT / "target" / "release" / "latent-tap"
    if built.exists():
        return str(built)
    found = shutil.which("latent-tap")
    if not found:
        pytest.skip("no latent-tap binary: build it (cargo build --release) or set LATENT_TAP_BIN")
    return found


@pytest.fixture(scope="session")
def lt_bin() -> str:
    return binary()


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory, lt_bin) -> str:
    p = tmp_path_factory.mktemp("models") / "synth.gguf"
    subprocess.run([lt_bin, "synth-model", str(p)], check=True, capture_output=True)
    return str(p)


@pytest.fixture(scope="session")
def real_model() -> str:
    """The real model; in CI (CI set) its absence is a failure, elsewhere a skip."""
    if REAL_MODEL.exists():
        return str(REAL_MODEL)
    if os.environ.get("CI"):
        pytest.fail(f"{REAL_MODEL} is missing in CI (scripts/fetch-model)")
    pytest.skip(f"{REAL_MODEL} is missing: run scripts/fetch-model")
