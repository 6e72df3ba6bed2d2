"""latent_tap.Model: in-process generation against the CLI, streaming, bad
input, cancellation, threads and memory."""

import gc
import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import latent_tap as lt

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def cli_capture(lt_bin, model, out, prompts, *extra):
    args = [lt_bin, "capture", "-m", model, "-t", "1", "--out", str(out), "-q"]
    for p in prompts:
        args += ["-p", p]
    subprocess.run(args + list(extra), check=True, capture_output=True)
    tensors = safetensors_numpy.load_file(str(out / "latents.safetensors"))
    tokens = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    return tensors, tokens


def assert_same_as_cli(results, tensors, tokens, prompts):
    for s, r in enumerate(results):
        gen = [t for t in tokens if t["seq"] == s and not t["prompt"]]
        assert r.ids == [t["token"] for t in gen]
        assert [t.pos for t in r.tokens] == [t["pos"] for t in gen]
        # Bit for bit: logprob/entropy are f32 in both; JSON keeps them exactly.
        assert [np.float32(t.logprob) for t in r.tokens] == [np.float32(t["logprob"]) for t in gen]
        for a, b in zip(r.tokens, gen):
            assert [(i, np.float32(p)) for i, p in a.top] == [(i, np.float32(p)) for i, p in b["top"]]
        prm = [t for t in tokens if t["seq"] == s and t["prompt"]]
        assert [t.id for t in r.prompt_tokens] == [t["token"] for t in prm]
        names = [k for k in tensors if "." not in k]
        assert sorted(r.latents) == sorted(names)
        for name in names:
            m = tensors[f"{name}.seq"] == s
            x = r.latents[name]
            assert x.dtype == np.float32 and x.shape == tensors[name][m].shape
            # Byte-identical rows, positions and steps.
            assert np.asarray(x).tobytes() == tensors[name][m].tobytes(), name
            assert np.array_equal(x.pos, tensors[f"{name}.pos"][m])
            assert np.array_equal(x.seq, np.full(len(x), s))


def test_generate_equals_cli_capture_synthetic(tmp_path, lt_bin, synth_model):
    with lt.Model(synth_model, threads=1) as m:
        r = m.generate("hello world", n_predict=8, tensors="l_out-*,attn_out-1", top_k=4)
    tensors, tokens = cli_capture(lt_bin, synth_model, tmp_path / "cli", ["hello world"], "-n", "8",
                                  "--tensors", "l_out-*,attn_out-1", "--top-k", "4")
    assert len(r.tokens) == 8 and len(r.latents["l_out-0"]) == len(r.prompt_tokens) + 7
    assert_same_as_cli([r], tensors, tokens, ["hello world"])


def test_generate_equals_cli_capture_real_model(tmp_path, lt_bin, real_model):
    prompt = "The capital of France is"
    with lt.Model(real_model, threads=1) as m:
        r = m.generate(prompt, n_predict=6, tensors="l_out-*")
        assert m.n_layer == 18 and m.n_embd == 640
    tensors, tokens = cli_capture(lt_bin, real_model, tmp_path / "cli", [prompt], "-n", "6")
    assert r.latents["l_out-6"].shape == (len(r.prompt_tokens) + 5, 640)
    assert_same_as_cli([r], tensors, tokens, [prompt])
    # The tokens are the CLI's (asserted above); the text is their pieces joined.
    assert r.text == "".join(t["piece"] for t in tokens if not t["prompt"])


def test_batch_equals_cli_batch(tmp_path, lt_bin, synth_model):
    prompts = ["a b c d e", "hello", "the quick brown fox"]
    with lt.Model(synth_model, threads=1) as m:
        rs = m.generate(prompts, n_predict=5, tensors="l_out-*", rows="all")
    assert isinstance(rs, list) and len(rs) == 3
    tensors, tokens = cli_capture(lt_bin, synth_model, tmp_path / "cli", prompts, "-n", "5")
    assert_same_as_cli(rs, tensors, tokens, prompts)


def test_dtypes_and_rows_last(tmp_path, lt_bin, synth_model):
    with lt.Model(synth_model, threads=1) as m:
        f32 = m.generate("one two", n_predict=4, tensors="l_out-1")
        f16 = m.generate("one two", n_predict=4, tensors="l_out-1", dtype="f16")
        bf16 = m.generate("one two", n_predict=4, tensors="l_out-1", dtype="bf16")
        last = m.generate("one two", n_predict=4, tensors="l_out-1", rows="last")
    a = np.asarray(f32.latents["l_out-1"])
    assert f16.latents["l_out-1"].dtype == np.float16
    assert np.array_equal(f16.latents["l_out-1"], a.astype(np.float16))
    # bf16 arrives widened: the f32 value with its low 16 bits rounded away.
    b = bf16.latents["l_out-1"]
    assert b.dtype == np.float32 and np.all(b.view(np.uint32) & 0xFFFF == 0)
    assert np.allclose(b, a, rtol=2 ** -7)
    # rows="last": only rows whose distribution was sampled (prompt's last + generated but last).
    n_prompt = len(f32.prompt_tokens)
    assert list(last.latents["l_out-1"].pos) == list(range(n_prompt - 1, n_prompt + 3))
    assert np.array_equal(last.latents["l_out-1"], a[n_prompt - 1:])


def test_stream_equals_generate(synth_model):
    prompts = ["stream me", "and me too please"]
    with lt.Model(synth_model, threads=1) as m:
        full = m.generate(prompts, n_predict=6, tensors="l_out-*")
        steps = list(m.stream(prompts, n_predict=6, tensors="l_out-*"))
    for s, r in enumerate(full):
        mine = [e for e in steps if e.seq == s]
        assert [e.token for e in mine] == r.tokens
        assert mine[0].prompt_tokens == r.prompt_tokens and all(not e.prompt_tokens for e in mine[1:])
        assert [e.token.step for e in mine] == list(range(6))
        for name, x in r.latents.items():
            cat = np.concatenate([np.asarray(e.latents[name]) for e in mine])
            assert cat.tobytes() == np.asarray(x).tobytes(), name
            assert np.array_equal(np.concatenate([e.latents[name].pos for e in mine]), x.pos)


def test_stream_break_cancels_and_model_stays_usable(synth_model):
    with lt.Model(synth_model, threads=1) as m:
        for i, _ev in enumerate(m.stream("go on and on", n_predict=500)):
            if i == 2:
                break
        r = m.generate("after", n_predict=2)
        assert len(r.tokens) == 2


def test_tokens_only_and_tensors(synth_model):
    with lt.Model(synth_model, threads=1) as m:
        r = m.generate("x y", n_predict=3, tensors=None)
        assert r.latents == {} and len(r.tokens) == 3
        names = [t.name for t in m.tensors("l_out-*")]
        assert names == ["l_out-0", "l_out-1", "l_out-2"]
        assert all(t.row_width == m.n_embd for t in m.tensors("l_out-*"))
        assert m.detokenize(m.tokenize("x y", add_special=False)) == "x y"


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"n_predict": 0}, ValueError, "n_predict"),
        ({"n_predict": 1.5}, TypeError, "n_predict"),
        ({"n_predict": True}, TypeError, "n_predict"),
        ({"rows": "some"}, ValueError, "rows"),
        ({"dtype": "f64"}, ValueError, "dtype"),
        ({"tensors": "nope-*"}, ValueError, "nope-*"),
        ({"tensors": 5}, TypeError, "tensors"),
        ({"tensors": " , "}, ValueError, "blank"),
        ({"layers": "a..b"}, ValueError, "layer"),
        ({"top_k": -1}, ValueError, "top_k"),
        ({"top_k": (1 << 20) + 1}, ValueError, "top-k"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"top_p": 2.0}, ValueError, "top-p"),
        ({"capture_mode": "fast"}, ValueError, "capture_mode"),
        ({"ring_mb": 0}, ValueError, "ring_mb"),
        ({"block_timeout": -1.0}, ValueError, "block_timeout"),
        ({"n_predict": 100000}, ValueError, "context"),
    ],
)
def test_bad_arguments_raise_with_the_reason(synth_model, kwargs, exc, words):
    with lt.Model(synth_model, threads=1) as m:
        with pytest.raises(exc) as e:
            m.generate("hello", **kwargs)
        assert words.lower() in str(e.value).lower(), str(e.value)
        # The model is still usable after every refusal.
        assert len(m.generate("hello", n_predict=1).tokens) == 1


def test_bad_prompts_models_and_closed(tmp_path, synth_model):
    with pytest.raises(FileNotFoundError, match="no such file"):
        lt.Model(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(lt.LatentTapError, match="cannot load model"):
        lt.Model(bad)
    with pytest.raises(TypeError, match="path"):
        lt.Model(42)
    with pytest.raises(ValueError, match="threads"):
        lt.Model(synth_model, threads=0)
    m = lt.Model(synth_model, threads=1)
    with pytest.raises(TypeError, match="bytes"):
        m.generate(b"bytes")
    with pytest.raises(ValueError, match="empty"):
        m.generate([])
    with pytest.raises(ValueError, match="empty"):
        m.generate("")
    with pytest.raises(UnicodeEncodeError):
        m.generate("lone surrogate \udcff")
    with pytest.raises(ValueError, match="out of range"):
        m.detokenize([m.n_vocab])
    m.close()
    assert m.closed
    for call in (lambda: m.generate("x"), lambda: m.n_layer, lambda: m.tensors(), lambda: list(m.stream("x"))):
        with pytest.raises(ValueError, match="closed"):
            call()
    m.close()  # idempotent


def test_ctrl_c_cancels_generate(synth_model):
    with lt.Model(synth_model, threads=1, n_ctx=16384) as m:
        timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            m.generate("count forever", n_predict=16000, tensors="l_out-*")
        took = time.monotonic() - t0
        timer.join()
        assert took < 5, f"cancel took {took:.1f} s"
        # Usable afterwards.
        assert len(m.generate("again", n_predict=3).tokens) == 3


def test_ctrl_c_cancels_stream(synth_model):
    with lt.Model(synth_model, threads=1, n_ctx=16384) as m:
        seen = 0
        timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            for _ in m.stream("count forever", n_predict=16000, tensors="l_out-*"):
                seen += 1
        timer.join()
        assert 0 < seen < 16000
        assert len(m.generate("again", n_predict=3).tokens) == 3


def test_two_models_in_two_threads(synth_model):
    with lt.Model(synth_model, threads=1) as m:
        want = m.generate("thread test", n_predict=8).latents["l_out-2"]
    out, errors = {}, []

    def work(i):
        try:
            with lt.Model(synth_model, threads=1) as mm:
                for _ in range(5):
                    out.setdefault(i, []).append(mm.generate("thread test", n_predict=8).latents["l_out-2"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for i in range(2):
        assert len(out[i]) == 5 and all(np.array_equal(x, want) for x in out[i])


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_memory_does_not_grow_over_1000_generates(synth_model):
    with lt.Model(synth_model, threads=1, n_ctx=256) as m:
        for _ in range(50):  # warm-up: allocator pools, numpy caches
            m.generate("memory check", n_predict=4, tensors="l_out-*")
        gc.collect()
        before = rss_mib()
        for _ in range(1000):
            r = m.generate("memory check", n_predict=4, tensors="l_out-*")
            assert len(r.tokens) == 4
        del r
        gc.collect()
        grown = rss_mib() - before
    print(f"RSS growth over 1,000 generate calls: {grown:.1f} MiB")
    # One leaked context or result per call would be far more than this.
    assert grown < 20, f"RSS grew {grown:.1f} MiB over 1,000 calls"


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_lens_of_the_last_layer_is_the_models_distribution(request, which):
    path = request.getfixturevalue("synth_model" if which == "synthetic" else "real_model")
    with lt.Model(path, threads=2) as m:
        r = m.generate("The capital of France is", n_predict=4, tensors="l_out-*", top_k=3)
        last = f"l_out-{m.n_layer - 1}"
        x = r.latents[last]  # pruned to output rows: one per sampled token
        assert len(x) == len(r.tokens)
        logits = m.lens_logits(x)
        assert logits.shape == (len(x), m.n_vocab) and logits.dtype == np.float32
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        for row, t in zip(logp, r.tokens):
            assert int(np.argmax(row)) == t.id  # greedy
            assert abs(row[t.id] - t.logprob) < 1e-4
            assert [i for i, _ in t.top] == list(np.argsort(-row)[:3])
        assert np.array_equal(m.lens_logits(np.asarray(x)[0]), logits[0])
        top = m.lens_top(r.latents["l_out-1"], k=2)
        assert len(top) == len(r.latents["l_out-1"]) and all(len(t) == 2 for t in top)
        with pytest.raises(ValueError, match="width"):
            m.lens_logits(np.zeros((1, 3), np.float32))
        with pytest.raises(ValueError, match="non-finite"):
            m.lens_logits(np.full((1, m.n_embd), np.nan, np.float32))
