"""latent_tap.Client against a real `latent-tap serve` of a synthetic model."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import API_KEY, ROOT, free_port
from latent_tap import Client
from latent_tap.client import Latents, ServerError, load_recording

GREEDY = dict(n_predict=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def client(server):
    return Client(server, api_key=API_KEY, timeout=60)


@pytest.fixture(scope="module")
def n_prompt(client):
    """Tokens of "hello world" as the server counts them (BOS included)."""
    return client.complete("hello world", tensors=None, n_predict=0).response["tokens_evaluated"]


def complete_all(client, prompt, **kw):
    return {t: client.complete(prompt, transport=t, **kw) for t in ("json", "sse", "binary")}


def test_transports_agree_exactly(client, n_prompt):
    rs = complete_all(client, "hello world", tensors="l_out-*", top_k=3, **GREEDY)
    ref = rs["json"]
    assert len(ref.tokens) == 4 and all(isinstance(t, int) for t in ref.tokens)
    assert list(ref.latents) == ["l_out-0", "l_out-1", "l_out-2"]
    # Steps and rows (docs/PROTOCOL.md): every prompt row in step 0, then one row
    # per decoded generated token (the 4th is never decoded).
    x = ref.latents["l_out-0"]
    assert x.shape == (n_prompt + 3, 64) and x.dtype == np.float32
    assert ref.latents.pos["l_out-0"].tolist() == list(range(n_prompt + 3))
    assert ref.latents.step["l_out-0"].tolist() == [0] * n_prompt + [1, 2, 3]
    # The last layer only has output rows: the last prompt token's and the decodes'.
    assert ref.latents.pos["l_out-2"].tolist() == list(range(n_prompt - 1, n_prompt + 3))
    assert np.all(np.isfinite(x)) and np.linalg.norm(x, axis=1).min() > 0
    assert len(ref.probs) == 4 and [p["id"] for p in ref.probs] == ref.tokens
    assert all(len(p["top"]) == 3 and p["top"][0][0] == p["id"] for p in ref.probs)  # greedy
    for name in ("sse", "binary"):
        r = rs[name]
        assert r.transport == name
        assert (r.text, r.tokens) == (ref.text, ref.tokens), name
        assert r.latents.equals(ref.latents), name
        assert r.probs == ref.probs, name


def test_selection_rows_last_f16_and_layers(client, n_prompt):
    full = client.complete("hello world", tensors="l_out-1", **GREEDY)
    rs = complete_all(client, "hello world", tensors=["l_out-*"], layers=[1], rows="last",
                      dtype="f16", **GREEDY)
    for r in rs.values():
        assert list(r.latents) == ["l_out-1"]
        x = r.latents["l_out-1"]
        assert x.dtype == np.float16 and x.shape == (4, 64) and r.latents.dtype["l_out-1"] == "f16"
        assert r.latents.pos["l_out-1"].tolist() == list(range(n_prompt - 1, n_prompt + 3))
        # the f16 rows are the f32 rows of the same positions, rounded
        np.testing.assert_array_equal(x, full.latents["l_out-1"][n_prompt - 1:].astype(np.float16))
    bf = client.complete("hello world", tensors="l_out-1", dtype="bf16", **GREEDY).latents["l_out-1"]
    assert bf.dtype == np.float32  # widened
    np.testing.assert_allclose(bf, full.latents["l_out-1"], rtol=2 ** -7)


def test_no_latents(client):
    r = client.complete("hello world", tensors=None, **GREEDY)
    assert r.latents == {} and isinstance(r.latents, Latents) and len(r.tokens) == 4


def test_chat(client):
    msgs = [{"role": "user", "content": "hello there"}]
    rs = {t: client.chat(msgs, transport=t, tensors="l_out-0", top_k=2, **GREEDY)
          for t in ("json", "sse", "binary")}
    ref = rs["json"]
    assert ref.response["object"] == "chat.completion"
    n_prompt = ref.response["usage"]["prompt_tokens"]
    assert n_prompt > 5  # the chat template's tokens are there
    assert len(ref.tokens) == 4 and [p["id"] for p in ref.probs] == ref.tokens
    assert ref.latents["l_out-0"].shape == (n_prompt + 3, 64)
    for name in ("sse", "binary"):
        r = rs[name]
        assert (r.text, r.tokens) == (ref.text, ref.tokens), name
        assert r.latents.equals(ref.latents), name
        assert r.probs == ref.probs, name
    # the chat's text is the completion of the rendered prompt
    rendered = client._json("POST", "/apply-template", {"messages": msgs})["prompt"]
    plain = client.complete(rendered, tensors=None, **GREEDY)
    assert plain.tokens == ref.tokens


def test_chat_tokens_without_top_k(client):
    # Without top_k the chat's token ids still come back, the same on every
    # transport (the JSON and SSE answers carry them only in logprobs, which
    # the server leaves out for top_logprobs 0), and no probs are reported.
    msgs = [{"role": "user", "content": "hello there"}]
    rs = {t: client.chat(msgs, transport=t, tensors=None, **GREEDY) for t in ("json", "sse", "binary")}
    ref = rs["binary"]
    assert len(ref.tokens) == 4 == ref.response["usage"]["completion_tokens"]
    for name, r in rs.items():
        assert (r.tokens, r.text) == (ref.tokens, ref.text), name
        assert r.probs is None, name
    assert ref.tokens == client.chat(msgs, transport="json", tensors=None, top_k=2, **GREEDY).tokens


def test_subscribe_records_requests(client, tmp_path):
    with client.subscribe("l_out-*", layers="0..2", max_requests=2, timeout=60) as sub:
        got = [client.complete("hello world", tensors="l_out-*", layers="0..2", **GREEDY),
               client.chat([{"role": "user", "content": "hi"}], transport="binary",
                           tensors="l_out-*", layers="0..2", **GREEDY)]
        recs = list(sub)
    assert len(recs) == 2 and sub.recordings == 2
    assert recs[0].id < recs[1].id
    for rec, r in zip(recs, got):
        assert not rec.begin_missed and rec.dropped == 0 and rec.seq_gaps == 0
        assert rec.tokens == r.tokens and rec.n_generated == 4
        assert rec.n_prompt == len(rec.prompt_tokens) == r.latents.pos["l_out-0"][-1] - 2
        assert list(rec.latents) == ["l_out-0", "l_out-1"]
        assert rec.latents.equals(r.latents)
        saved = load_recording(rec.save(tmp_path))
        np.testing.assert_array_equal(saved["l_out-1"], r.latents["l_out-1"])
        np.testing.assert_array_equal(saved["l_out-1.pos"], r.latents.pos["l_out-1"])
        np.testing.assert_array_equal(saved["l_out-1.step"], r.latents.step["l_out-1"])


def test_errors_are_clear(client, server):
    with pytest.raises(ServerError) as e:
        Client(server, api_key="wrong").complete("hi", **GREEDY)
    assert e.value.status == 401 and e.value.type == "authentication_error"
    assert "Invalid API Key" in str(e.value) and "api_key" in str(e.value)
    with pytest.raises(ServerError) as e:
        Client(server).tensors()
    assert e.value.status == 401
    with pytest.raises(ServerError) as e:
        client.complete("hi", tensors="no_such_tensor-*", **GREEDY)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    with pytest.raises(ServerError) as e:  # the binary stream reports it the same way
        client.complete("hi", transport="binary", tensors="no_such_tensor-*", **GREEDY)
    assert e.value.status == 400
    closed = Client(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(ConnectionError, match="cannot reach latent-tap serve"):
        closed.complete("hi")
    with pytest.raises(ConnectionError):
        closed.subscribe()
    for bad in ("ftp://x", "127.0.0.1:8080", "http://", "http://h:99999"):
        with pytest.raises(ValueError):
            Client(bad)
    with pytest.raises(TypeError):
        Client(8080)
    with pytest.raises(ValueError, match="transport"):
        client.complete("hi", transport="xml")
    with pytest.raises(ValueError, match="rows"):
        client.complete("hi", rows="first")
    with pytest.raises(ValueError, match="dtype"):
        client.complete("hi", dtype="f64")
    with pytest.raises(TypeError, match="prompt"):
        client.complete(None)
    with pytest.raises(TypeError, match="n_predict"):
        client.complete("hi", n_predict="4")
    with pytest.raises(TypeError, match="messages"):
        client.chat("hello")
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        client.chat([{"content": "no role"}])
    with pytest.raises(ValueError, match="queue_mb"):
        client.subscribe(queue_mb=0)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_cli_module_and_example(server, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    p = run_cli("-m", "latent_tap.client", "selftest", "--url", server, "--api-key", API_KEY,
                "--out", str(tmp_path / "rec"), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "selftest: PASS" in p.stdout
    assert sorted(os.listdir(tmp_path / "rec"))[-1] == "requests.jsonl"
    # the example script is the same command line, without PYTHONPATH
    p = run_cli(os.path.join(ROOT, "examples", "python", "client.py"), "complete", "--url", server,
                "--api-key", API_KEY, "--prompt", "hello world", "-n", "3", "--check")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check: JSON, SSE and binary agree (3 tensors" in p.stdout
    p = run_cli(os.path.join(ROOT, "examples", "python", "client.py"), "complete", "--url", server,
                "--prompt", "hi")
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "401" in p.stderr


def test_lens_joined_across_transports(client, n_prompt):
    rs = complete_all(client, "hello world", tensors="l_out-1", lens={"top_k": 2}, **GREEDY)
    ref = rs["json"]
    assert ref.lens["layers"] == [0, 1, 2] and ref.lens["n_vocab"] == 260
    # one lens row per row of l_out-1 (rows "all"), same positions
    assert [row["pos"] for row in ref.lens["rows"]] == ref.latents.pos["l_out-1"].tolist()
    assert all(len(c["top"]) == 2 for row in ref.lens["rows"] for c in row["cells"] if c)
    assert "lens" not in ref.response
    for name in ("sse", "binary"):
        assert rs[name].lens == ref.lens, name
        assert rs[name].latents.equals(ref.latents), name
    assert client.complete("hello world", tensors=None, **GREEDY).lens is None


def test_subscribe_routes_concurrent_requests(client):
    from concurrent.futures import ThreadPoolExecutor
    prompts = ["one two three", "a much longer prompt than the others, to overlap", "x y"]
    with client.subscribe("l_out-1", max_requests=3, timeout=60) as sub:
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: client.complete(
                p, transport="binary", tensors="l_out-1", n_predict=6, temperature=0,
                ignore_eos=True), prompts))
        recs = list(sub)
    assert len(recs) == 3
    by_prompt_len = {len(r.latents.pos["l_out-1"]): r for r in got}
    assert len(by_prompt_len) == 3  # the prompts have different lengths
    for rec in recs:
        r = by_prompt_len[len(rec.latents.pos["l_out-1"])]
        assert rec.tokens == r.tokens and rec.latents.equals(r.latents)
        assert rec.dropped == 0 and not rec.begin_missed


def test_token_id_prompts(client):
    ids = client._json("POST", "/tokenize", {"content": "hello world", "add_special": True})["tokens"]
    by_text = client.complete("hello world", tensors="l_out-0", **GREEDY)
    by_ids = client.complete(np.array(ids, dtype=np.int64).tolist(), tensors="l_out-0", **GREEDY)
    mixed = client.complete([ids[0], "hello world"], tensors="l_out-0", **GREEDY)
    assert by_ids.tokens == by_text.tokens and by_ids.latents.equals(by_text.latents)
    assert mixed.tokens == by_text.tokens
    assert client.complete(list(np.array(ids)), tensors=None, **GREEDY).tokens == by_text.tokens
    with pytest.raises(TypeError, match="prompt"):
        client.complete([1.5, 2])
    with pytest.raises(TypeError, match="prompt"):
        client.complete([])


def test_top_k_has_one_meaning(server):
    """top_k: alternatives reported (as Model.generate and the CLI); the wire's
    own n_probs/top_k fields are refused with the name to use instead."""
    c = Client(server, api_key=API_KEY)
    r = c.complete("hello world", tensors=None, top_k=3, **GREEDY)
    assert len(r.probs) == 4 and all(len(p["top"]) == 3 for p in r.probs)
    for wire, use in (("n_probs", "top_k="), ("top_k", "sample_top_k=")):
        with pytest.raises(TypeError, match=use):
            c._body({wire: 2}, prompt="x")


def test_binary_frame_seq_counts_the_answers_frames_with_a_lens(server):
    """PROTOCOL.md: a FRAME's seq is the answer's frame counter (a gap means
    drops). With a lens, the job also computes l_out rows the requester did
    not ask for; they must not leave gaps."""
    import json as _json
    import urllib.request
    from latent_tap._protocol import FRAMES_MEDIA_TYPE, parse_records
    body = {"prompt": "hello world", "latents": {"tensors": "l_out-1"}, "lens": {"top_k": 2}, **GREEDY}
    req = urllib.request.Request(server + "/completion", data=_json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Accept": FRAMES_MEDIA_TYPE,
                                          "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        recs = list(parse_records(resp))
    seqs = [r["seq"] for r in recs if r["kind"] == "frame"]
    end = [r for r in recs if r["kind"] == "end"][0]
    assert seqs == list(range(len(seqs))) and len(seqs) == end["frames"] > 0
    assert end["drops"] == 0
