"""Steer and Patch with latent_tap.Model on a synthetic model of 6 layers:
exact effects on the captured rows, equality with `latent-tap capture --steer`,
edits that end with their call, and bad input."""

import os
import signal
import threading

import numpy as np
import pytest

import latent_tap as lt
from conftest import lt as run_lt, read_control_vector
from test_model import assert_same_as_cli, cli_capture

PROMPT = "hello world and the rest of it"
GREEDY = dict(n_predict=5, tensors="l_out-*,attn_out-*", top_k=3)


@pytest.fixture(scope="module")
def m(model6):
    with lt.Model(model6, threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def base(m):
    """The unedited run everything is compared with."""
    return m.generate(PROMPT, **GREEDY)


def same(a, b):
    """Bit-identical results: tokens, logprobs and every captured row."""
    assert a.ids == b.ids
    assert [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]
    assert a.latents.equals(b.latents)


def step0(r, name):
    x = r.latents[name]
    return np.asarray(x)[x.step == 0]


def test_scale_zero_is_bit_identical_to_no_steer(m, base):
    v = np.random.default_rng(1).standard_normal(m.n_embd)
    r = m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, scale=0.0))
    same(r, base)
    one = m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, scale=1e-3))
    assert not np.array_equal(step0(one, "l_out-1"), step0(base, "l_out-1"))
    assert r.edits["steer"][0]["scale"] == 0 and r.edits["steer"][0]["layers"] == [1, 2, 3, 4, 5]
    assert base.edits == {}


def test_first_steered_layer_gains_scale_v_and_earlier_layers_are_untouched(m, base):
    v = np.random.default_rng(2).standard_normal(m.n_embd).astype(np.float32)
    scale = 3.5
    r = m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, layers="3..5", scale=scale))
    assert r.ids != base.ids  # a steer this large changes the text of the synthetic model
    for layer in (0, 1, 2):
        assert np.array_equal(step0(r, f"l_out-{layer}"), step0(base, f"l_out-{layer}")), layer
        assert np.array_equal(step0(r, f"attn_out-{layer + 1}"), step0(base, f"attn_out-{layer + 1}"))
    # scale × v rounded once in f32, added to every prompt row: bit for bit
    want = step0(base, "l_out-3") + np.float32(scale) * v
    assert np.array_equal(step0(r, "l_out-3"), want)
    assert not np.allclose(step0(r, "l_out-4"), step0(base, "l_out-4") + np.float32(scale) * v)
    s = r.edits["steer"][0]
    assert (s["layers"], s["positions"], s["scale"], s["source"]) == ([3, 4], "all", 3.5, "vector")
    assert s["tensors"] == ["l_out-3", "l_out-4"]
    np.testing.assert_allclose(s["vector_norm"], [np.linalg.norm(v.astype(np.float64))] * 2, rtol=1e-12)


def test_two_d_vector_is_one_row_per_layer_and_positions_select_rows(m, base):
    rows = np.random.default_rng(3).standard_normal((m.n_layer, m.n_embd)).astype(np.float32)
    r = m.generate(PROMPT, **GREEDY, steer=lt.Steer(rows, layers=[2], scale=2.0, positions="2..4"))
    x, b = r.latents["l_out-2"], base.latents["l_out-2"]
    s = x.step == 0
    d = np.asarray(x)[s] - np.asarray(b)[s]
    assert np.array_equal(np.asarray(x)[s][2:4], np.asarray(b)[s][2:4] + np.float32(2.0) * rows[2])
    assert np.all(d[:2] == 0) and np.all(d[4:] == 0)
    assert r.edits["steer"][0]["positions"] == "2..4"
    # "generated": the prompt step is untouched, the first generated row is steered
    g = m.generate(PROMPT, **GREEDY, steer=lt.Steer(rows[2], layers="2", scale=2.0, positions="generated"))
    for name in base.latents:
        assert np.array_equal(step0(g, name), step0(base, name)), name
    assert g.ids[0] == base.ids[0]
    first = (g.latents["l_out-2"].step == 1)
    assert not np.array_equal(np.asarray(g.latents["l_out-2"])[first], np.asarray(b)[b.step == 1])


def test_steer_file_equals_cli_capture_steer(m, model6, cv_file, lt_bin, tmp_path):
    kw = dict(n_predict=6, tensors="l_out-*", top_k=4)
    r = m.generate(PROMPT, **kw, steer=lt.Steer(file=cv_file, scale=6.0, layers="2..=4", positions="prompt"))
    tensors, tokens = cli_capture(lt_bin, str(model6), tmp_path / "cli", [PROMPT], "-n", "6", "--tensors", "l_out-*",
                                  "--top-k", "4", "--steer", f"{cv_file}:6", "--steer-layers", "2..=4",
                                  "--steer-positions", "prompt")
    assert_same_as_cli([r], tensors, tokens, [PROMPT])
    unsteered = m.generate(PROMPT, **kw)
    assert not np.array_equal(step0(r, "l_out-2"), step0(unsteered, "l_out-2"))
    s = r.edits["steer"][0]
    assert s["source"] == {"file": str(cv_file)} and s["layers"] == [2, 3, 4]
    np.testing.assert_allclose(s["vector_norm"], [1.0, 1.0, 1.0], atol=1e-6)  # steer-vector's are unit length
    # The same directions given as values: n_layer × n_embd (row 0 unused), bit for bit.
    dirs = read_control_vector(cv_file)
    assert sorted(dirs) == [1, 2, 3, 4, 5]
    rows = np.zeros((m.n_layer, m.n_embd), np.float32)
    for layer, d in dirs.items():
        rows[layer] = d
    by_value = m.generate(PROMPT, **kw, steer=lt.Steer(rows, scale=6.0, layers="2..=4", positions="prompt"))
    same(by_value, r)


def test_patch_sets_the_row_and_leaves_earlier_rows_alone(m, base):
    n_prompt = len(base.prompt_tokens)
    data = np.linspace(-3, 3, m.n_embd, dtype=np.float32)
    pos = 3
    r = m.generate(PROMPT, **GREEDY, patch=lt.Patch("l_out-2", pos, data))
    x, b = r.latents["l_out-2"], base.latents["l_out-2"]
    assert np.array_equal(np.asarray(x)[x.pos == pos][0], data)
    others = (x.step == 0) & (x.pos != pos)
    assert np.array_equal(np.asarray(x)[others], np.asarray(b)[(b.step == 0) & (b.pos != pos)])
    for name in ("l_out-0", "l_out-1", "attn_out-1", "attn_out-2"):
        assert np.array_equal(step0(r, name), step0(base, name)), name
    y, c = step0(r, "l_out-3"), step0(base, "l_out-3")
    assert np.array_equal(y[:pos], c[:pos]) and not np.array_equal(y[pos], c[pos])
    assert r.edits == {"patch": [{"tensor": "l_out-2", "pos": 3, "norm": pytest.approx(np.linalg.norm(data))}]}
    assert n_prompt > pos + 1


def test_patch_of_attn_out_and_of_a_generated_position(m, base):
    n_prompt = len(base.prompt_tokens)
    data = np.full(m.n_embd, 0.25, np.float32)
    r = m.generate(PROMPT, **GREEDY, patch=lt.Patch("attn_out-4", 1, data))
    a = r.latents["attn_out-4"]
    assert np.array_equal(np.asarray(a)[a.pos == 1][0], data)
    assert np.array_equal(step0(r, "l_out-3"), step0(base, "l_out-3"))
    # ffn_inp-4 = attn_out-4 + l_out-3: l_out-4 at pos 1 changes, pos 0 does not
    y, c = step0(r, "l_out-4"), step0(base, "l_out-4")
    assert np.array_equal(y[0], c[0]) and not np.array_equal(y[1], c[1])
    # A generated position: the prompt step is untouched; the row of that decode is the data.
    g = m.generate(PROMPT, **GREEDY, patch=[lt.Patch("l_out-1", n_prompt + 1, data)])
    for name in base.latents:
        assert np.array_equal(step0(g, name), step0(base, name)), name
    x = g.latents["l_out-1"]
    assert np.array_equal(np.asarray(x)[x.pos == n_prompt + 1][0], data)
    assert g.ids[:2] == base.ids[:2]


def test_edits_end_with_their_call(m, base):
    v = np.ones(m.n_embd)
    m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, scale=5.0), patch=lt.Patch("l_out-1", 0, v))
    same(m.generate(PROMPT, **GREEDY), base)
    # also after a stream left half-read and after a refused call
    for _ in m.stream(PROMPT, **GREEDY, steer=lt.Steer(v, scale=5.0)):
        break
    with pytest.raises(ValueError):
        m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, scale=5.0), patch=lt.Patch("l_out-9", 0, v))
    same(m.generate(PROMPT, **GREEDY), base)


def test_ctrl_c_in_an_edited_run_leaves_the_next_call_unedited(model6):
    with lt.Model(model6, threads=1, n_ctx=16384) as big:
        want = big.generate(PROMPT, **GREEDY)
        timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            big.generate(PROMPT, n_predict=16000, tensors="l_out-*", steer=lt.Steer(np.ones(64), scale=3.0),
                         patch=lt.Patch("l_out-2", 1, np.zeros(64)))
        timer.join()
        same(big.generate(PROMPT, **GREEDY), want)


def test_stream_with_edits_equals_generate(m):
    kw = dict(GREEDY, steer=lt.Steer(np.ones(m.n_embd), layers="1..3", scale=-2.0),
              patch=lt.Patch("attn_out-2", 2, np.zeros(m.n_embd)))
    r = m.generate(PROMPT, **kw)
    steps = list(m.stream(PROMPT, **kw))
    assert [s.token.id for s in steps] == r.ids
    for name, x in r.latents.items():
        rows = np.concatenate([np.asarray(s.latents[name]) for s in steps])
        assert rows.tobytes() == np.asarray(x).tobytes(), name


def test_tokens_only_runs_and_batches_are_edited_too(m, base):
    v = np.random.default_rng(4).standard_normal(m.n_embd)
    kw = dict(steer=lt.Steer(v, layers="2..4", scale=4.0), patch=lt.Patch("attn_out-1", 2, v))
    full = m.generate(PROMPT, **GREEDY, **kw)
    assert full.ids != base.ids
    quiet = m.generate(PROMPT, **dict(GREEDY, tensors=None), **kw)
    assert quiet.ids == full.ids and quiet.latents == {}
    assert quiet.edits == full.edits
    # every sequence of a batch is steered: each gains scale × v at the first steered layer
    steer = lt.Steer(v, layers="2..4", scale=4.0)
    two_base = m.generate([PROMPT, "another prompt"], **GREEDY)
    two = m.generate([PROMPT, "another prompt"], **GREEDY, steer=steer)
    for r, b in zip(two, two_base):
        assert np.array_equal(step0(r, "l_out-1"), step0(b, "l_out-1"))
        assert np.array_equal(step0(r, "l_out-2"), step0(b, "l_out-2") + np.float32(4.0) * v.astype(np.float32))
        assert r.edits["steer"][0]["layers"] == [2, 3]


BAD_VALUES = [
    (dict(steer=lt.Steer([1.0, 2.0, 3.0])), ValueError,
     "steer[0].vector: 3 values: give n_embd = 64 (one direction for every layer) or n_layer × n_embd = 6 × 64"),
    (dict(steer=lt.Steer(np.ones((64, 6)))), ValueError, "steer[0].vector: shape (64, 6): a 2-D vector is n_layer × n_embd"),
    (dict(steer=lt.Steer(np.r_[np.ones(63), np.nan])), ValueError, "steer[0].vector: value 63 is NaN"),
    (dict(steer=lt.Steer(np.full(64, 1e39))), ValueError, "steer[0].vector: value 0 is inf"),
    (dict(steer=lt.Steer(np.ones(64), scale=float("inf"))), ValueError, "steer[0].scale: scale inf is not a finite"),
    (dict(steer=lt.Steer(np.ones(64), layers="0..3")), ValueError,
     "steer[0].layers: layer 0 cannot be steered: the model's steerable layers are 1..=5"),
    (dict(steer=lt.Steer(np.ones(64), layers=6)), ValueError, "steer[0].layers: layer 6 cannot be steered"),
    (dict(steer=lt.Steer(np.ones(64), layers="x")), ValueError, "steer[0].layers:"),
    (dict(steer=lt.Steer(np.ones(64), positions="3..1")), ValueError, "steer[0].positions: positions '3..1'"),
    (dict(steer=lt.Steer(np.ones(64), positions="5000..5001")), ValueError,
     "steer[0].positions: positions 5000..5001 start outside the context of 4096"),
    (dict(steer=[lt.Steer(np.ones(64)), lt.Steer(np.ones(3))]), ValueError, "steer[1].vector: 3 values"),
    (dict(patch=lt.Patch("l_out-9", 0, np.ones(64))), ValueError,
     "patch[0].tensor: the model's graph has no node 'l_out-9'"),
    (dict(patch=lt.Patch("norm-1", 0, np.ones(64))), ValueError, "patch[0].tensor: 'norm-1' names more than one node"),
    (dict(patch=lt.Patch("result_output", 0, np.ones(64))), ValueError,
     "patch[0].tensor: 'result_output' cannot be edited: only F32 nodes with one row of n_embd = 64"),
    (dict(patch=lt.Patch("bad name", 0, np.ones(64))), ValueError, "patch[0].tensor: tensor 'bad name' cannot be patched"),
    (dict(patch=lt.Patch("l_out-1", 35, np.ones(64))), ValueError,
     "patch[0].pos: pos 35 is outside the positions this run reaches (0..35)"),
    (dict(patch=lt.Patch("l_out-1", -1, np.ones(64))), ValueError, "patch[0].pos: pos -1 is outside"),
    (dict(patch=lt.Patch("l_out-1", 0, np.ones(65))), ValueError, "patch[0].data: data has 65 values, not n_embd 64"),
    (dict(patch=[lt.Patch("l_out-1", 0, np.ones(64)), lt.Patch("l_out-1", 0, np.r_[np.ones(63), np.inf])]),
     ValueError, "patch[1].data: data value 63 is inf"),
    (dict(steer=lt.Steer(file="/no/such/vector.gguf")), FileNotFoundError,
     "steer[0].file: /no/such/vector.gguf: no such file"),
    (dict(steer="l_out-3"), TypeError, "steer must be a latent_tap.Steer or a list of them, not str"),
    (dict(steer=[lt.Steer([1.0]), {"vector": "AAAA"}]), TypeError, "steer[1] must be a latent_tap.Steer, not dict"),
    (dict(patch=lt.Steer([1.0])), TypeError, "patch must be a latent_tap.Patch or a list of them, not Steer"),
]


def test_bad_values_are_refused_naming_the_argument(m, base):
    n_prompt = len(base.prompt_tokens)
    assert n_prompt + 4 == 35  # the pos limits above: prompt + n_predict
    for kw, exc, msg in BAD_VALUES:
        with pytest.raises(exc) as e:
            m.generate(PROMPT, n_predict=4, tensors="l_out-1", **kw)
        assert msg in str(e.value), (kw, str(e.value))
        with pytest.raises(exc):  # stream checks them when called
            m.stream(PROMPT, n_predict=4, **kw)
    same(m.generate(PROMPT, **GREEDY), base)  # the model is still fine


def test_a_node_whose_rows_are_not_n_embd_values_is_refused(m, base):
    # node_24 holds one token's 64 values as 16 x 4: the library's graph check
    # (check_node: F32, row_width n_embd) lets it through and the tap refuses it
    # mid-run (LatentTapError); either way nothing is patched and the model stays usable.
    assert [t.shape for t in m.tensors("node_24")] == [(16, 4, 1, 1)]
    with pytest.raises((ValueError, lt.LatentTapError), match="node_24"):
        m.generate(PROMPT, n_predict=2, patch=lt.Patch("node_24", 0, np.ones(64)))
    same(m.generate(PROMPT, **GREEDY), base)


def test_bad_files(m, model6, cv_file, tmp_path, tmp_path_factory):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("not a gguf")
    with pytest.raises(ValueError, match=r"^steer\[0\]\.file: .*x\.gguf is not a usable control vector"):
        m.generate(PROMPT, n_predict=2, steer=lt.Steer(file=not_gguf))
    some = tmp_path / "some.gguf"
    d = cv_file.parent
    run_lt("steer-vector", "-m", model6, "--positive", d / "pos.txt", "--negative", d / "neg.txt",
           "--out", some, "--layers", "2..4", "-t", 1)
    assert sorted(read_control_vector(some)) == [2, 3]
    with pytest.raises(ValueError, match=r"steer\[0\]\.layers: layer 1: the vector has no direction\.1 \(it has layers 2"):
        m.generate(PROMPT, n_predict=2, steer=lt.Steer(file=some, layers="1..3"))
    r = m.generate(PROMPT, n_predict=2, steer=lt.Steer(file=some))
    assert r.edits["steer"][0]["layers"] == [2, 3]
    # A vector of the 6-layer model on the 3-layer one: made for another model.
    small = tmp_path_factory.mktemp("m3") / "synth3.gguf"
    run_lt("synth-model", small)
    with lt.Model(small, threads=1) as m3:
        with pytest.raises(ValueError, match=r"steer\[0\]\.file: .*direction\.5 but the model has 3 layers"):
            m3.generate(PROMPT, n_predict=2, steer=lt.Steer(file=str(cv_file)))


def test_python_side_checks():
    for args, kw, exc, msg in [
        ((), {}, ValueError, "Steer needs a vector or a file="),
        (([1.0],), dict(file="v.gguf"), ValueError, "Steer needs a vector or a file="),
        (("abc",), {}, TypeError, "vector must be numbers"),
        (([[1.0, 2.0], [3.0]],), {}, TypeError, "vector must be an array of numbers"),
        ((np.array([1 + 2j]),), {}, TypeError, "vector must be an array of real numbers"),
        ((np.zeros((2, 2, 2)),), {}, ValueError, "vector must be [n_embd] or [n_layer, n_embd], not of shape (2, 2, 2)"),
        ((1.0,), {}, ValueError, "not of shape ()"),
        (([1.0],), dict(scale="2"), TypeError, "scale must be a number, not str"),
        (([1.0],), dict(scale=True), TypeError, "scale must be a number, not bool"),
        (([1.0],), dict(layers=1.5), TypeError, "layers must be"),
        (([1.0],), dict(positions=3), TypeError, "positions must be a str"),
        ((), dict(file=3), TypeError, "file must be a str or a path"),
    ]:
        with pytest.raises(exc) as e:
            lt.Steer(*args, **kw)
        assert msg in str(e.value), (args, kw, str(e.value))
    for args, exc, msg in [
        ((6, 0, [1.0]), TypeError, "tensor must be a str"),
        (("l_out-1", 1.0, [1.0]), TypeError, "pos must be an int, not float"),
        (("l_out-1", True, [1.0]), TypeError, "pos must be an int, not bool"),
        (("l_out-1", 0, np.zeros((2, 2))), ValueError, "data must be [n_embd], not of shape (2, 2)"),
        (("l_out-1", 0, None), TypeError, "data must be an array of real numbers"),
    ]:
        with pytest.raises(exc) as e:
            lt.Patch(*args)
        assert msg in str(e.value), (args, str(e.value))
    # What is kept: float32 copies, read-only; layer lists as the library reads them.
    src = np.arange(4, dtype=np.float64)
    s = lt.Steer(src, layers=range(2, 5), scale=np.float32(2), positions=range(1, 3))
    src[0] = 99
    assert s.vector.dtype == np.float32 and s.vector.tolist() == [0, 1, 2, 3] and not s.vector.flags.writeable
    assert (s.layers, s.scale, s.positions) == ("2..5", 2.0, "1..3")
    assert lt.Steer([1], layers=[1, 3]).layers == "1,3" and lt.Steer([1], layers=np.int64(4)).layers == "4"
    p = lt.Patch("l_out-1", np.int32(3), [1, 2])
    assert p.pos == 3 and p.data.dtype == np.float32 and isinstance(p.pos, int)
    assert "Steer(file='v.gguf'" in repr(lt.Steer(file=os.path.join("v.gguf")))


def test_real_model_steer_changes_the_text(real_model):
    with lt.Model(real_model, threads=2, n_ctx=256) as g:
        base = g.generate("Today I feel", n_predict=6, tensors="l_out-6,l_out-5")
        v = np.asarray(base.latents["l_out-6"])[-1]
        r = g.generate("Today I feel", n_predict=6, tensors="l_out-6,l_out-5",
                       steer=lt.Steer(v / np.linalg.norm(v), layers=6, scale=0.0))
        assert r.ids == base.ids
        r = g.generate("Today I feel", n_predict=6, tensors="l_out-6,l_out-5",
                       steer=lt.Steer(-v, layers=6, scale=1.0, positions="prompt"))
        assert np.array_equal(step0(r, "l_out-5"), step0(base, "l_out-5"))
        assert np.array_equal(step0(r, "l_out-6"), step0(base, "l_out-6") - v)
        assert r.ids != base.ids and r.edits["steer"][0]["tensors"] == ["l_out-6"]


def test_a_steer_of_another_node_family_adds_to_its_rows(m, base):
    v = np.random.default_rng(7).standard_normal(m.n_embd).astype(np.float32)
    r = m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, layers="2", scale=2.0, tensor="attn_out"))
    assert r.edits["steer"][0]["tensors"] == ["attn_out-2"]
    for name in ("attn_out-1", "l_out-1"):
        assert np.array_equal(step0(r, name), step0(base, name)), name
    assert np.array_equal(step0(r, "attn_out-2"), step0(base, "attn_out-2") + np.float32(2.0) * v)
    assert not np.array_equal(step0(r, "l_out-2"), step0(base, "l_out-2"))
    with pytest.raises(ValueError, match=r"steer\[0\]\.tensor: .*no node 'nope-1'"):
        m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, tensor="nope"))
    with pytest.raises(ValueError, match=r"steer\[0\]\.tensor: .*not a node family"):
        m.generate(PROMPT, **GREEDY, steer=lt.Steer(v, tensor="l_out-*"))
    with pytest.raises(TypeError, match="tensor must be a str"):
        lt.Steer(v, tensor=3)
    assert lt.Steer(v, tensor="attn_out")._wire()["tensor"] == "attn_out"
    same(m.generate(PROMPT, **GREEDY), base)
