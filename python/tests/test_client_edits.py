"""latent_tap.Client with steer=/patch= against a real `latent-tap serve` of
the 6-layer synthetic model (with --steer-dir): the same as the fields sent
as raw JSON, the server's summary exposed, errors named by the server."""

import base64
import json
import urllib.request

import numpy as np
import pytest

import latent_tap as lt
from conftest import API_KEY, read_control_vector, serving
from latent_tap.client import ServerError

PROMPT = "hello world and the rest of it"
GREEDY = dict(n_predict=5, temperature=0, ignore_eos=True)
TRANSPORTS = ("json", "sse", "binary")


@pytest.fixture(scope="module")
def server6(model6, cv_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve6") / "serve.log"
    with serving(model6, log, "-np", "1", "--steer-dir", cv_file.parent) as url:
        yield url


@pytest.fixture(scope="module")
def client(server6):
    return lt.Client(server6, api_key=API_KEY, timeout=60)


def b64(values):
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def raw(url, body):
    """POST /completion by hand (no latent_tap code): the JSON answer, latents decoded."""
    req = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        v = json.loads(r.read())
    lat = {}
    for name, t in v.pop("latents").items():
        assert t["dtype"] == "f32"
        lat[name] = (np.frombuffer(base64.b64decode(t["data"]), "<f4").reshape(t["shape"]), t["pos"])
    return v, lat


def same_as_raw(c, v, lat):
    assert c.tokens == v["tokens"] and c.text == v["content"]
    assert sorted(c.latents) == sorted(lat)
    for name, (x, pos) in lat.items():
        assert np.asarray(c.latents[name]).tobytes() == x.tobytes(), (c.transport, name)
        assert c.latents.pos[name].tolist() == pos
    assert c.edits == {k: v[k] for k in ("steer", "patch") if k in v}


def test_steer_and_patch_equal_the_raw_fields(client, server6):
    rng = np.random.default_rng(7)
    v, d = rng.standard_normal(64), rng.standard_normal(64)
    body = dict(prompt=PROMPT, return_tokens=True, latents={"tensors": "l_out-*,attn_out-2"}, stream=False,
                steer=[{"vector": b64(v), "layers": "2..4", "scale": 3.0, "positions": "generated"}],
                patch=[{"tensor": "attn_out-2", "pos": 3, "data": b64(d)}], **GREEDY)
    want, lat = raw(server6, body)
    assert want["steer"][0]["layers"] == [2, 3] and want["patch"][0]["pos"] == 3
    base = client.complete(PROMPT, tensors="l_out-*,attn_out-2", **GREEDY)
    assert base.edits == {}
    for t in TRANSPORTS:
        c = client.complete(PROMPT, transport=t, tensors="l_out-*,attn_out-2", **GREEDY,
                            steer=lt.Steer(v, layers="2..4", scale=3.0, positions="generated"),
                            patch=[lt.Patch("attn_out-2", 3, d)])
        same_as_raw(c, want, lat)
        s = c.edits["steer"][0]
        assert (s["layers"], s["positions"], s["scale"], s["source"]) == ([2, 3], "generated", 3.0, "vector")
        np.testing.assert_allclose(s["vector_norm"], [np.linalg.norm(v.astype(np.float32))] * 2, rtol=1e-6)
        assert c.edits["patch"][0]["tensor"] == "attn_out-2"
        a = c.latents["attn_out-2"]
        assert np.array_equal(np.asarray(a)[c.latents.pos["attn_out-2"] == 3][0], d.astype(np.float32))
        assert c.tokens != base.tokens  # the edits did something


def test_steer_dir_file_equals_its_values(client, server6, cv_file):
    rows = np.zeros((6, 64), np.float32)
    for layer, dvec in read_control_vector(cv_file).items():
        rows[layer] = dvec
    kw = dict(tensors="l_out-*", **GREEDY)
    by_file = client.complete(PROMPT, **kw, steer=lt.Steer(file=cv_file.name, scale=8.0, layers="2..=4"))
    by_value = client.complete(PROMPT, **kw, steer=lt.Steer(rows, scale=8.0, layers="2..=4"))
    assert by_file.tokens == by_value.tokens and by_file.latents.equals(by_value.latents)
    assert by_file.edits["steer"][0]["source"] == {"file": "v.gguf"}
    assert by_value.edits["steer"][0]["source"] == "vector"
    v, lat = raw(server6, dict(prompt=PROMPT, return_tokens=True, latents={"tensors": "l_out-*"}, stream=False,
                               steer=[{"file": "v.gguf", "scale": 8.0, "layers": "2..=4"}], **GREEDY))
    same_as_raw(by_file, v, lat)
    unsteered = client.complete(PROMPT, **kw)
    assert not unsteered.latents.equals(by_file.latents)


def test_chat_reports_edits_on_every_transport(client):
    msgs = [{"role": "user", "content": "hello there"}]
    st = lt.Steer(np.ones(64), layers=[1, 3], scale=-2.0, positions="prompt")
    rs = [client.chat(msgs, transport=t, tensors="l_out-1", top_k=1, **GREEDY, steer=st) for t in TRANSPORTS]
    for r in rs:
        assert r.edits["steer"][0]["layers"] == [1, 3] and r.edits["steer"][0]["positions"] == "prompt"
        assert r.tokens == rs[0].tokens and r.latents.equals(rs[0].latents)
    plain = client.chat(msgs, tensors="l_out-1", **GREEDY)
    assert plain.edits == {} and not plain.latents.equals(rs[0].latents)


def test_bad_edits_are_the_servers_400_or_refused_before_sending(client):
    for kw, msg in [
        (dict(steer=lt.Steer(np.ones(3))), "steer[0].vector: 3 values: give n_embd = 64"),
        (dict(steer=lt.Steer(np.ones(64), layers="0..2")), "steer[0].layers: layer 0 cannot be steered"),
        (dict(steer=lt.Steer(np.ones(64), positions="later")), "steer[0].positions: positions 'later'"),
        (dict(steer=lt.Steer(file="missing.gguf")), "steer[0].file: 'missing.gguf': no such file in the steer dir"),
        (dict(steer=lt.Steer(file="../v.gguf")), "must be a file name inside the steer directory"),
        (dict(patch=lt.Patch("l_out-1", 500, np.ones(64))), "patch[0].pos: pos 500 is outside"),
        (dict(patch=lt.Patch("l_out-7", 0, np.ones(64))), "patch[0].tensor: the model's graph has no node 'l_out-7'"),
        (dict(patch=lt.Patch("l_out-1", 0, np.ones(63))), "patch[0].data: data has 63 values"),
    ]:
        with pytest.raises(ServerError) as e:
            client.complete(PROMPT, tensors=None, **GREEDY, **kw)
        assert e.value.status == 400 and msg in e.value.message, (kw, e.value.message)
    with pytest.raises(ValueError, match=r"steer\[1\]\.scale: scale nan is not a finite number"):
        client.complete(PROMPT, steer=[lt.Steer([1.0]), lt.Steer([1.0], scale=float("nan"))])
    with pytest.raises(TypeError, match="steer must be a latent_tap.Steer or a list of them, not dict"):
        client.complete(PROMPT, steer={"vector": "AAAA"})
    with pytest.raises(TypeError, match=r"patch\[0\] must be a latent_tap.Patch, not Steer"):
        client.chat([{"role": "user", "content": "x"}], patch=[lt.Steer([1.0])])
    assert client.complete(PROMPT, tensors=None, **GREEDY).tokens  # the server is fine
