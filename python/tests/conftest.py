"""Fixtures: the latent-tap binary (env LATENT_TAP_BIN, default `latent-tap` on
PATH), a synthetic model, a running `latent-tap serve`, and capture runs."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if importlib.util.find_spec("latent_tap") is None:  # neither installed nor on PYTHONPATH
    sys.path.insert(0, os.path.join(ROOT, "python"))

API_KEY = "test-key"
PROMPTS = ["hello world", "the cat sat on the mat and looked around for a while",
           "short", "a fourth prompt about nothing in particular"]


def binary():
    """The CLI: $LATENT_TAP_BIN, else this checkout's target/release/latent-tap, else PATH."""
    built = os.path.join(ROOT, "target", "release", "latent-tap")
    b = os.environ.get("LATENT_TAP_BIN") or (built if os.path.isfile(built) else shutil.which("latent-tap"))
    if not b or not os.path.isfile(b):
        pytest.fail("latent-tap binary not found: set LATENT_TAP_BIN, build it (cargo build --release) "
                    "or put latent-tap on PATH")
    return b


@pytest.fixture(scope="session")
def lt_bin():
    return binary()


def lt(*args, cwd=None):
    """Run latent-tap; fail the test with its stderr when it fails."""
    p = subprocess.run([binary(), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 0, f"latent-tap {' '.join(map(str, args))}:\n{p.stderr}"
    return p


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "synth.gguf"
    lt("synth-model", path)
    return path


@pytest.fixture(scope="session")
def real_model():
    path = os.environ.get("LATENT_TAP_MODEL") or os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
    if not os.path.isfile(path):
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI (scripts/fetch-model)")
        pytest.skip(f"real model not found at {path} (run scripts/fetch-model or set LATENT_TAP_MODEL)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(synth_model, tmp_path_factory):
    """A `latent-tap serve` of the synthetic model with an API key; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([binary(), "serve", "-m", str(synth_model), "--port", str(port),
                                 "--api-key", API_KEY, "-t", "2"], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"latent-tap serve exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"latent-tap serve not ready in 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


CAPTURE = ["--tensors", "l_out-*,attn_out-*", "-n", "3", "--parallel", "1", "-t", "2", "-q"]


@pytest.fixture(scope="session")
def dataset_run(synth_model, prompts_file, tmp_path_factory):
    """A dataset run (capture --prompts) of the 4 prompts, 3 generated tokens each."""
    out = tmp_path_factory.mktemp("runs") / "ds"
    lt("capture", "-m", synth_model, "--prompts", prompts_file, *CAPTURE, "-o", out)
    return out


@pytest.fixture(scope="session")
def split_runs(synth_model, prompts_file, tmp_path_factory):
    """The same dataset captured as 2 parts (--shard-index/--shard-count 2)."""
    base = tmp_path_factory.mktemp("split")
    outs = []
    for i in range(2):
        out = base / f"part{i}"
        lt("capture", "-m", synth_model, "--prompts", prompts_file, *CAPTURE,
           "--shard-index", i, "--shard-count", 2, "-o", out)
        outs.append(out)
    return outs


@pytest.fixture(scope="session")
def capture_p_run(synth_model, tmp_path_factory):
    """A `capture -p` directory of two prompts."""
    out = tmp_path_factory.mktemp("runs") / "cp"
    lt("capture", "-m", synth_model, "-p", PROMPTS[0], "-p", PROMPTS[1], *CAPTURE[:4], "-t", "2",
       "-q", "-o", out)
    return out
