"""Run.to_hf_dataset: SAELens's activation-cache layout (datasets' load_from_disk)."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import lt
from latent_tap import Run
from latent_tap._export import _windows
from latent_tap.run import hook_name_for


def expected_windows(run, tensor, cs, toks_dir):
    """(rows, token ids) per window, computed here from the run's rows and tokens.jsonl:
    each prompt's rows by position, cut into runs of cs, remainder dropped."""
    with open(os.path.join(toks_dir, "tokens.jsonl")) as f:
        tok = {}
        for line in f:
            t = json.loads(line)
            tok[(t.get("prompt_index", t.get("seq")), t["pos"])] = t["token"]
    x = run.array(tensor)
    p = np.concatenate([b[2] for b in run.rows(tensors=tensor)])
    pos = np.concatenate([b[3] for b in run.rows(tensors=tensor)])
    out = []
    for prompt in sorted(set(p.tolist())):
        idx = np.flatnonzero(p == prompt)
        idx = idx[np.argsort(pos[idx])]
        assert np.all(np.diff(pos[idx]) == 1)  # every position of the prompt is there
        for k in range(len(idx) // cs):
            w = idx[k * cs:(k + 1) * cs]
            out.append((x[w], [tok[(prompt, int(q))] for q in pos[w]]))
    return out


def test_export_layout_and_values(dataset_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    from datasets import Array2D, Features, Sequence, Value
    run, cs = Run(dataset_run), 4
    want = expected_windows(run, "l_out-1", cs, dataset_run)
    assert len(want) >= 8  # the 4 prompts give several windows, and remainders
    n = run.to_hf_dataset(tmp_path / "cache", tensor="l_out-1", context_size=cs)
    assert n == len(want)
    ds = datasets.load_from_disk(str(tmp_path / "cache"))
    hook = "blocks.1.hook_resid_post"
    # exactly the features SAELens's CacheActivationsRunner builds (v6.18.0)
    assert ds.features == Features({hook: Array2D(shape=(cs, 64), dtype="float32"),
                                    "token_ids": Sequence(Value(dtype="int32"), length=cs)})
    assert ds.column_names == [hook, "token_ids"] and ds.num_rows == n
    # read it as SAELens's ActivationsStore does: set_format, then slice a batch
    ds.set_format(type="numpy", columns=[hook, "token_ids"])
    batch = ds[0:n]
    assert batch[hook].shape == (n, cs, 64) and batch[hook].dtype == np.float32
    assert batch["token_ids"].shape == (n, cs)
    assert str(ds.data.schema.field("token_ids").type).startswith("fixed_size_list<item: int32>[4]")
    for i, (x, ids) in enumerate(want):
        np.testing.assert_array_equal(batch[hook][i], x)
        assert batch["token_ids"][i].tolist() == ids


def test_export_last_layer_prompt_filter_and_options(dataset_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    run = Run(dataset_run)
    # the last layer has only output rows (last prompt token + decodes): 3 per prompt here
    n = run.to_hf_dataset(tmp_path / "a", tensor="l_out-2", context_size=3)
    assert n == 4
    ds = datasets.load_from_disk(str(tmp_path / "a"))
    ds.set_format("numpy")
    first = [b for b in run.rows(tensors="l_out-2", prompts=[0])][0]
    np.testing.assert_array_equal(ds[0]["blocks.2.hook_resid_post"], first[1][np.argsort(first[3])])
    n = run.to_hf_dataset(tmp_path / "b", tensor="attn_out-0", context_size=2, prompts=[2],
                          hook_name="my.hook", dtype="float16")
    ds = datasets.load_from_disk(str(tmp_path / "b"))
    assert ds.column_names == ["my.hook", "token_ids"] and ds.num_rows == n
    assert ds.features["my.hook"].dtype == "float16"
    x = run.array("attn_out-0", prompts=[2])
    assert n == len(x) // 2
    ds.set_format("numpy")
    np.testing.assert_array_equal(ds[0]["my.hook"], x[:2].astype(np.float16))


def test_export_bad_input(dataset_run, tmp_path, monkeypatch):
    run = Run(dataset_run)
    with pytest.raises(ValueError, match="context_size"):
        run.to_hf_dataset(tmp_path / "x", tensor="l_out-1", context_size=0)
    with pytest.raises(ValueError, match="no tensor"):
        run.to_hf_dataset(tmp_path / "x", tensor="l_out-9", context_size=4)
    with pytest.raises(ValueError, match="dtype"):
        run.to_hf_dataset(tmp_path / "x", tensor="l_out-1", context_size=4, dtype="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        run.to_hf_dataset(tmp_path / "full", tensor="l_out-1", context_size=4)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        run.to_hf_dataset(tmp_path / "y", tensor="l_out-1", context_size=4)
    monkeypatch.undo()
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="nothing to export"):
        run.to_hf_dataset(tmp_path / "z", tensor="l_out-1", context_size=1000)
    assert not os.path.exists(tmp_path / "z")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".latent-tap-export")]


def test_windows_skip_holes_and_drop_remainders():
    p = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1])
    pos = np.array([0, 5, 4, 0, 1, 2, 6, 1, 2])
    got = [(prompt, pos[idx].tolist()) for prompt, idx in _windows(p, pos, 2)]
    assert got == [(0, [0, 1]), (0, [4, 5]), (1, [0, 1])]


def test_hook_names():
    assert hook_name_for("l_out-6") == "blocks.6.hook_resid_post"
    assert hook_name_for("attn_out-2", "llama") == "blocks.2.hook_attn_out"
    assert hook_name_for("ffn_out-2") == "blocks.2.hook_mlp_out"
    assert hook_name_for("ffn_inp-2") == "blocks.2.hook_resid_mid"
    assert hook_name_for("attn_post_norm-3", "gemma3") == "blocks.3.hook_attn_out"
    assert hook_name_for("ffn_post_norm-3", "gemma3") == "blocks.3.hook_mlp_out"
    assert hook_name_for("sa_out-3", "gemma3") == "blocks.3.hook_resid_mid"
    with pytest.raises(ValueError, match="ffn_post_norm-3"):
        hook_name_for("ffn_out-3", "gemma3")
    for bad in ("attn_norm-3", "result_norm", "l_out", "Qcur-0#2"):
        with pytest.raises(ValueError, match="hook_name="):
            hook_name_for(bad)


def test_llama_graph_identities(synth_model, tmp_path):
    """The synthetic model is a llama graph: resid_mid = resid_pre + attn_out and
    resid_post = resid_mid + mlp_out, exactly, for the names of the hook table."""
    out = tmp_path / "r"
    lt("capture", "-m", synth_model, "-p", "hello world", "-n", "1", "-q", "-o", out,
       "--tensors", "l_out-0,attn_out-1,ffn_inp-1,ffn_out-1,l_out-1")
    run = Run(out)
    a = run.array
    np.testing.assert_array_equal(a("ffn_inp-1"), a("attn_out-1") + a("l_out-0"))
    np.testing.assert_array_equal(a("l_out-1"), a("ffn_out-1") + a("ffn_inp-1"))


def test_gemma3_graph_identities_and_export(real_model, tmp_path):
    """On Gemma 3, what each block adds to the residual is attn_post_norm-N and
    ffn_post_norm-N (TransformerLens's hook_attn_out / hook_mlp_out there), not
    ffn_out-N (the MLP output before its post-norm)."""
    out = tmp_path / "g"
    lt("capture", "-m", real_model, "-p", "The capital of France is", "-n", "1", "-q", "-o", out,
       "--tensors", "l_out-2,attn_post_norm-3,sa_out-3,ffn_out-3,ffn_post_norm-3,l_out-3")
    run = Run(out)
    a = run.array
    np.testing.assert_array_equal(a("sa_out-3"), a("attn_post_norm-3") + a("l_out-2"))
    np.testing.assert_array_equal(a("l_out-3"), a("ffn_post_norm-3") + a("sa_out-3"))
    assert not np.array_equal(a("ffn_out-3"), a("ffn_post_norm-3"))
    with pytest.raises(ValueError, match="ffn_post_norm-3"):
        run.to_hf_dataset(tmp_path / "x", tensor="ffn_out-3", context_size=2)
    datasets = pytest.importorskip("datasets")
    n = run.to_hf_dataset(tmp_path / "e", tensor="ffn_post_norm-3", context_size=3)
    ds = datasets.load_from_disk(str(tmp_path / "e"))
    assert ds.column_names == ["blocks.3.hook_mlp_out", "token_ids"] and ds.num_rows == n == len(a("l_out-2")) // 3
    assert ds.features["blocks.3.hook_mlp_out"].shape == (3, 640)
