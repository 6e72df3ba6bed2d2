"""latent_tap.Run on real capture runs of a synthetic model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROMPTS, ROOT
from latent_tap import Run


def manifest(d):
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def tokens_jsonl(d):
    with open(os.path.join(d, "tokens.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_dataset_run_rows_equal_the_shards(dataset_run):
    st = pytest.importorskip("safetensors.numpy")
    run = Run(dataset_run)
    m = manifest(dataset_run)
    assert run.complete and run.tensors == [t["name"] for t in m["tensors"]]
    assert set(run.tensors) == {f"{k}-{i}" for k in ("l_out", "attn_out") for i in range(3)}
    shards = [st.load_file(os.path.join(dataset_run, s["file"])) for s in m["shards"]]
    for name in run.tensors:
        want = np.concatenate([s[name] for s in shards])
        got = run.array(name)
        assert got.shape == (m["rows"][name], 64)
        np.testing.assert_array_equal(got, want)
        blocks = list(run.rows(tensors=name))
        np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]),
                                      np.concatenate([s[name + ".prompt"] for s in shards]))
        np.testing.assert_array_equal(np.concatenate([b[3] for b in blocks]),
                                      np.concatenate([s[name + ".pos"] for s in shards]))


def test_dataset_run_rows_match_the_token_stream(dataset_run):
    run = Run(dataset_run)
    toks = tokens_jsonl(dataset_run)
    # rows: all -> every position but the last generated token's has a row of l_out-0
    per_prompt = {}
    for t in toks:
        per_prompt.setdefault(t["prompt_index"], []).append(t["pos"])
    assert sorted(per_prompt) == list(range(len(PROMPTS)))
    got = {}
    for _, _, p, pos in run.rows(tensors="l_out-0"):
        for a, b in zip(p.tolist(), pos.tolist()):
            got.setdefault(a, []).append(b)
    for p, positions in per_prompt.items():
        assert sorted(got[p]) == sorted(positions)[:-1], p
    table = run.token_ids()
    assert table == {p: {t["pos"]: t["token"] for t in toks if t["prompt_index"] == p}
                     for p in per_prompt}
    assert table[0][0] == toks[0]["token"]


def test_filters(dataset_run):
    run = Run(dataset_run)
    blocks = list(run.rows(layers=[1], prompts=range(1, 3)))
    assert sorted({b[0] for b in blocks}) == ["attn_out-1", "l_out-1"]
    assert sorted({int(v) for b in blocks for v in b[2]}) == [1, 2]
    for name, x, p, pos in blocks:
        full = [(pp, q) for _, _, P, Q in run.rows(tensors=name) for pp, q in zip(P, Q)]
        assert len(x) == sum(1 for pp, _ in full if pp in (1, 2))
    # a collection of prompts, a single layer, a single tensor
    rows = list(run.rows(tensors="l_out-0", prompts=[3, 0]))
    assert [b[0] for b in rows] == ["l_out-0"]
    assert sorted(set(np.concatenate([b[2] for b in rows]).tolist())) == [0, 3]
    x3 = run.array("l_out-0", prompts=[3])
    every = run.array("l_out-0")
    p_all = np.concatenate([b[2] for b in run.rows(tensors="l_out-0")])
    np.testing.assert_array_equal(x3, every[p_all == 3])
    assert [b[0] for b in run.rows(layers=2)] == ["attn_out-2", "l_out-2"]
    assert run.array("l_out-0", prompts=range(10, 20)).shape == (0, 64)


def test_several_directories_read_as_one(dataset_run, split_runs):
    one, parts = Run(dataset_run), Run(list(reversed(split_runs)))  # order does not matter
    assert parts.tensors == one.tensors and parts.complete
    assert [manifest(d)["prompt_range"] for d in split_runs] == [[0, 2], [2, 4]]
    for name in one.tensors:  # --parallel 1: bit-identical rows
        np.testing.assert_array_equal(parts.array(name), one.array(name))
    assert parts.token_ids() == one.token_ids()
    # prompts of the second part only read the second directory
    got = {int(v) for _, _, p, _ in parts.rows(prompts=range(2, 4)) for v in p}
    assert got == {2, 3}


def test_capture_p_directory(capture_p_run):
    st = pytest.importorskip("safetensors.numpy")
    run = Run(str(capture_p_run))
    f = st.load_file(os.path.join(capture_p_run, "latents.safetensors"))
    assert run.tensors == [f"{k}-{i}" for i in range(3) for k in ("attn_out", "l_out")]
    for name in run.tensors:
        np.testing.assert_array_equal(run.array(name), f[name])
    seq = f["l_out-1.seq"]
    assert set(seq.tolist()) == {0, 1}
    rows = list(run.rows(tensors="l_out-1", prompts=[1]))
    assert sum(len(b[2]) for b in rows) == int((seq == 1).sum())
    np.testing.assert_array_equal(np.concatenate([b[1] for b in rows]), f["l_out-1"][seq == 1])
    table = run.token_ids()
    assert sorted(table) == [0, 1] and table[0][0] == table[1][0]  # both start with BOS


def test_bad_input(dataset_run, capture_p_run, tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        Run(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no run directories"):
        Run([])
    with pytest.raises(TypeError):
        Run(42)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Run(tmp_path / "junk")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a dataset run"):
        Run(tmp_path / "other")
    run = Run(dataset_run)
    with pytest.raises(ValueError, match="no tensor 'zz'"):
        run.array("zz")


def test_different_tensors_are_refused(dataset_run, synth_model, tmp_path):
    from conftest import lt
    other = tmp_path / "l0"
    lt("capture", "-m", synth_model, "-p", "x", "--tensors", "l_out-0", "-n", "1", "-q", "-o", other)
    with pytest.raises(ValueError, match="different tensors"):
        Run([dataset_run, other])


def test_torch_dataset(dataset_run, monkeypatch):
    run = Run(dataset_run)
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torch"):
            run.torch_dataset("l_out-1")
        pytest.skip("torch is not installed (checked the ImportError only)")
    ds = run.torch_dataset("l_out-1")
    x = run.array("l_out-1")
    assert len(ds) == len(x)
    for i in (0, len(x) // 2, len(x) - 1, -1):
        np.testing.assert_array_equal(ds[i].numpy(), x[i])
    with pytest.raises(IndexError):
        ds[len(x)]


def test_module_cli_and_example(dataset_run):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    p = subprocess.run([sys.executable, "-m", "latent_tap.run", str(dataset_run), "--layer", "1"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    m = manifest(dataset_run)
    lines = p.stdout.splitlines()
    assert [line.split(" mean_l2")[0] for line in lines] == [
        f"attn_out-1 rows {m['rows']['attn_out-1']} prompts 4", f"l_out-1 rows {m['rows']['l_out-1']} prompts 4"]
    x = Run(dataset_run).array("l_out-1")
    assert float(lines[1].split()[-1]) == pytest.approx(np.linalg.norm(x, axis=1).mean(), abs=1e-4)
    script = os.path.join(ROOT, "examples", "python", "read_run.py")
    p = subprocess.run([sys.executable, script, str(dataset_run), "--tensor", "l_out-1", "--prompts", "0:2"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("l_out-1 rows ") and " prompts 2 " in p.stdout
    p = subprocess.run([sys.executable, script, str(dataset_run), "--prompts", "x"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--prompts must be A:B" in p.stderr
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(script)!r});"
                        "from read_run import Run; print(type(Run).__name__, Run.__module__)"],
                       capture_output=True, text=True)
    assert p.stdout.strip() == "type latent_tap.run", p.stderr


def test_torch_dataset_indexing_with_a_stand_in_torch(split_runs, monkeypatch):
    """The row indexing of torch_dataset, checked without PyTorch: a stand-in
    module gives it Dataset and from_numpy (the real one is tested above when
    torch is installed)."""
    import types
    fake = types.ModuleType("torch")
    fake.from_numpy = lambda a: ("tensor", a)
    fake.utils = types.ModuleType("torch.utils")
    fake.utils.data = types.ModuleType("torch.utils.data")
    fake.utils.data.Dataset = object
    for name, mod in (("torch", fake), ("torch.utils", fake.utils), ("torch.utils.data", fake.utils.data)):
        monkeypatch.setitem(sys.modules, name, mod)
    run = Run(split_runs)
    ds = run.torch_dataset("l_out-1", prompts=range(1, 4))
    x = run.array("l_out-1", prompts=range(1, 4))
    assert len(list(run.rows("l_out-1", prompts=range(1, 4)))) == 2  # rows from both parts
    assert len(ds) == len(x) and len(x) > 0
    for i in range(-len(x), len(x)):
        kind, row = ds[i]
        assert kind == "tensor" and row.dtype == np.float32
        np.testing.assert_array_equal(row, x[i])
    with pytest.raises(IndexError):
        ds[len(x)]
