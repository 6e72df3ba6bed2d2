"""Fixtures: the latent-tap binary (env LATENT_TAP_BIN, default `latent-tap` on
PATH), synthetic models (3 and 6 layers), a control vector, a running
`latent-tap serve`, and capture runs."""

import contextlib
import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import numpy as np
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
def model6(tmp_path_factory):
    path = tmp_path_factory.mktemp("m6") / "synth6.gguf"
    lt("synth-model", "--layers", 6, path)
    return path


@pytest.fixture(scope="session")
def cv_file(model6, tmp_path_factory):
    """A control vector of model6 made by `latent-tap steer-vector` (layers 1..=5)."""
    d = tmp_path_factory.mktemp("cv")
    (d / "pos.txt").write_text("I love this, it is wonderful\nwhat a happy bright day\n")
    (d / "neg.txt").write_text("I hate this, it is terrible\nwhat a sad grey day\n")
    lt("steer-vector", "-m", model6, "--positive", d / "pos.txt", "--negative", d / "neg.txt",
       "--out", d / "v.gguf", "-t", 1)
    return d / "v.gguf"


def read_control_vector(path):
    """{N: direction.N} of a control-vector GGUF (an independent reader: GGUF v3,
    F32 tensors only)."""
    b = open(path, "rb").read()
    at = 0

    def take(fmt):
        nonlocal at
        v = struct.unpack_from("<" + fmt, b, at)
        at += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal at
        n = take("Q")
        at += n
        return b[at - n:at].decode()

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalar[t])

    assert b[:4] == b"GGUF" and take("4sI")[1] == 3
    n_tensors, n_kv = take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        k = string()
        kv[k] = value(take("I"))
    assert kv["general.architecture"] == "controlvector"
    infos = []
    for _ in range(n_tensors):
        name, nd = string(), take("I")
        dims = [take("Q") for _ in range(nd)]
        typ, off = take("I"), take("Q")
        assert typ == 0, "F32"
        infos.append((name, int(np.prod(dims)), off))
    align = kv.get("general.alignment", 32)
    data = (at + align - 1) // align * align
    return {int(name.split(".")[1]): np.frombuffer(b, "<f4", n, data + off) for name, n, off in infos}


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


@contextlib.contextmanager
def serving(model, log, *args):
    """Run `latent-tap serve -m MODEL ARGS...` with the API key until the block
    ends; yields its URL once /health answers."""
    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen([binary(), "serve", "-m", str(model), "--port", str(port),
                                 "--api-key", API_KEY, "-t", "2", *map(str, args)],
                                stdout=f, stderr=subprocess.STDOUT)
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
def server(synth_model, tmp_path_factory):
    """A `latent-tap serve` of the synthetic model with an API key; yields its URL."""
    with serving(synth_model, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


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
