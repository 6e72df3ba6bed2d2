"""Client for ``latent-tap serve``: completions and chats with their latents over
JSON, SSE or the binary record stream, and subscribers that record every request
the server runs. Standard library and numpy only (``safetensors`` is used by
:meth:`Recording.save` when installed, else ``.npz``). Written from
docs/PROTOCOL.md.

>>> from latent_tap import Client
>>> c = Client("http://127.0.0.1:8080")
>>> r = c.complete("The capital of France is", n_predict=4, temperature=0,
...                tensors="l_out-*", transport="binary")
>>> r.text, r.tokens, r.latents["l_out-6"].shape, r.latents.pos["l_out-6"]

Command line (the same as ``examples/python/client.py``)::

    python -m latent_tap.client complete  --url URL --prompt TEXT [--binary|--sse|--json] [--check]
    python -m latent_tap.client subscribe --url URL --out DIR [--max-requests N]
    python -m latent_tap.client selftest  --url URL
"""

import base64
import http.client
import json
import numbers
import os
import socket
import urllib.parse

import numpy as np

from ._edits import wire_fields
from ._latents import Latents, Rows
from ._protocol import FRAMES_MEDIA_TYPE, decode_payload, parse_records

__all__ = ["Client", "Completion", "Latents", "Recording", "Subscription", "ServerError"]

TRANSPORTS = ("json", "sse", "binary")
_ROWS = ("all", "last")
_DTYPES = ("f32", "f16", "bf16")


class ServerError(RuntimeError):
    """The server answered with an error.

    Attributes: ``status`` (HTTP status, e.g. 401; 200 for an error reported inside
    a stream), ``type`` (the error's ``type``, e.g. ``authentication_error``),
    ``message`` (the server's message) and ``body`` (the raw answer text)."""

    def __init__(self, what, status, type_, message, body=""):
        self.status, self.type, self.message, self.body = status, type_, message, body
        hint = " (wrong or missing api_key)" if status == 401 else ""
        super().__init__(f"{what}: HTTP {status} {type_ or 'error'}: {message}{hint}")


class _Gather:
    """Rows of each tensor as they arrive, joined into :class:`Latents` at the end."""

    def __init__(self):
        self.blocks = {}

    def add(self, name, data, pos, step, dtype):
        b = self.blocks.setdefault(name, ([], [], [], [dtype]))
        b[0].append(data)
        b[1].append(np.asarray(pos, dtype=np.int32).reshape(-1))
        b[2].append(np.asarray(step, dtype=np.int32).reshape(-1))
        b[3][0] = dtype

    def add_json(self, obj):
        """Merge a JSON ``latents`` object (docs/PROTOCOL.md, "Latents in JSON")."""
        for name, t in (obj or {}).items():
            rows, width = t["shape"]
            data = decode_payload(base64.b64decode(t["data"]), t["dtype"], rows, width)
            self.add(name, data, t["pos"], t["step"], t["dtype"])

    def add_frame(self, r):
        self.add(r["name"], r["data"], r["rows"]["pos"], np.full(r["n_rows"], r["step"]),
                 r["dtype"])

    def build(self):
        out = Latents()
        for name, (data, pos, step, dtype) in self.blocks.items():
            out[name] = Rows(np.concatenate(data, axis=0), np.concatenate(pos), np.concatenate(step))
            out.dtype[name] = dtype[0]
        return out


class Completion:
    """The answer to :meth:`Client.complete` or :meth:`Client.chat`.

    - ``text``: the generated text (str).
    - ``tokens``: the generated token ids (list of int).
    - ``latents``: :class:`Latents` (empty when none were asked for).
    - ``probs``: with ``top_k``: one dict per generated token, ``{"id", "logprob",
      "top": [(id, logprob), ...]}`` (most likely first); else None.
    - ``lens``: with the ``lens`` request field (``lens=True`` or ``lens={...}``):
      the logit lens, ``{"layers", "n_vocab", "rows": [...]}`` as in
      docs/PROTOCOL.md (the rows of every chunk or record joined); else None.
    - ``response``: the server's final JSON object (the JSON answer, the last SSE
      chunk, or the binary stream's JSON record), without ``latents``.
    - ``transport``: ``"json"``, ``"sse"`` or ``"binary"``.
    - ``edits``: with ``steer=``/``patch=``: what the server applied, its
      ``steer``/``patch`` summaries (``{"steer": [{"layers", "positions",
      "scale", "vector_norm", "tensors", "source"}], "patch": [{"tensor",
      "pos", "norm"}]}``, only the keys sent); ``{}`` otherwise."""

    def __init__(self, text, tokens, latents, probs, response, transport, lens=None):
        self.text, self.tokens, self.latents = text, tokens, latents
        self.probs, self.response, self.transport, self.lens = probs, response, transport, lens
        response = response if isinstance(response, dict) else {}
        self.edits = {k: response[k] for k in ("steer", "patch") if k in response}

    def __repr__(self):
        return (f"Completion(text={self.text!r}, tokens={self.tokens}, latents={self.latents!r}, "
                f"transport={self.transport!r})")


def _latents_field(tensors, layers, rows, dtype):
    if tensors is None:
        if layers is not None or rows is not None or dtype is not None:
            raise ValueError("layers, rows and dtype select latents: give tensors too")
        return None
    if not isinstance(tensors, str):
        try:
            tensors = list(tensors)
        except TypeError:
            raise TypeError(f"tensors must be a string or a list of strings, not {tensors!r}") from None
        if not tensors or not all(isinstance(t, str) and t for t in tensors):
            raise TypeError(f"tensors must be a string or a list of strings, not {tensors!r}")
        tensors = ",".join(tensors)
    lat = {"tensors": tensors}
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, (str, int, list, tuple, range)):
            raise TypeError(f"layers must be a string like '4..12', an int or a list of ints, not {layers!r}")
        if isinstance(layers, range) and layers.step == 1:
            layers = f"{layers.start}..{layers.stop}"
        elif isinstance(layers, (list, tuple, range)):
            layers = ",".join(str(int(x)) for x in layers)
        lat["layers"] = str(layers)
    if rows is not None:
        if rows not in _ROWS:
            raise ValueError(f"rows must be 'all' or 'last', not {rows!r}")
        lat["rows"] = rows
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
        lat["dtype"] = dtype
    return lat


def _probs_of(entries):
    """completion_probabilities / OpenAI logprobs.content entries -> probs dicts."""
    return [{"id": int(e["id"]), "logprob": float(e["logprob"]),
             "top": [(int(t["id"]), float(t["logprob"])) for t in e.get("top_logprobs") or []]}
            for e in entries or []]


def _choice(v):
    ch = v.get("choices") or [{}]
    return ch[0] if isinstance(ch, list) and ch else {}


def _raise_stream_error(v, what):
    if isinstance(v, dict) and "error" in v:
        e = v["error"] if isinstance(v["error"], dict) else {"message": str(v["error"])}
        raise ServerError(what, e.get("code", 200), e.get("type"), e.get("message"),
                          json.dumps(v))


class _Answer:
    """Accumulates one answer's text, tokens and probs from JSON/SSE objects."""

    def __init__(self, chat):
        self.chat, self.text, self.tokens, self.probs, self.lens = chat, [], [], [], None

    def add_lens(self, obj):
        """Join a ``lens`` object's rows (one per SSE chunk or LENS record)."""
        if obj:
            if self.lens is None:
                self.lens = dict(obj, rows=[])
            self.lens["rows"] += obj.get("rows") or []

    def add(self, v, stream):
        self.add_lens(v.pop("lens", None))
        if self.chat:
            c = _choice(v)
            msg = c.get("delta" if stream else "message") or {}
            self.text.append(msg.get("content") or "")
            lp = (c.get("logprobs") or {}).get("content")
            self.probs += _probs_of(lp)
            self.tokens += [int(e["id"]) for e in lp or []]
        else:
            self.text.append(v.get("content", ""))
            self.tokens += [int(t) for t in v.get("tokens") or []]
            self.probs += _probs_of(v.get("completion_probabilities"))


class Client:
    """A connection to a running ``latent-tap serve``.

    ``url``: ``http://host:port`` (``https://`` works too; a path prefix such as
    ``http://proxy/lt`` is kept). ``api_key``: sent as ``Authorization: Bearer``
    (the server's ``--api-key``). ``timeout``: seconds to wait for the connection
    and for each read (None: forever).

    Errors: ``ValueError``/``TypeError`` for bad arguments (before anything is
    sent), ``ConnectionError`` when the server cannot be reached, and
    :class:`ServerError` (a ``RuntimeError``) when it answers with an error
    (``.status`` 401 for a wrong key, 400 for a bad request, ...)."""

    def __init__(self, url="http://127.0.0.1:8080", api_key=None, timeout=600):
        if not isinstance(url, str):
            raise TypeError(f"url must be a string such as 'http://127.0.0.1:8080', not {url!r}")
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"url must look like http://HOST:PORT, not {url!r}")
        try:
            port = u.port
        except ValueError:
            raise ValueError(f"url {url!r} has a bad port") from None
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        self.url = url.rstrip("/")
        self._https, self._host = u.scheme == "https", u.hostname
        self._port = port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self.api_key, self.timeout = api_key, timeout

    def __repr__(self):
        return f"Client({self.url!r})"

    # ------------------------------------------------------------ HTTP

    def _open(self, method, path, body=None, accept=None, timeout=None):
        """Send a request; return the open response (status 200) or raise."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout if timeout is None else timeout)
        headers = {}
        if body is not None:
            try:
                body = json.dumps(body).encode()
            except (TypeError, ValueError) as e:
                raise TypeError(f"request body is not JSON-serialisable: {e}") from None
            headers["Content-Type"] = "application/json"
        if accept:
            headers["Accept"] = accept
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        what = f"{method} {self.url}{path}"
        try:
            conn.request(method, self._prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ConnectionError(f"cannot reach latent-tap serve: {what}: {e}") from e
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")
            conn.close()
            try:
                err = json.loads(text)["error"]
                type_, message = err.get("type"), err.get("message", text)
            except (ValueError, KeyError, TypeError, AttributeError):
                type_, message = None, text.strip() or resp.reason
            raise ServerError(what, resp.status, type_, message, text)
        resp.conn = conn
        return resp

    def get(self, path):
        """``GET path`` and return its JSON (e.g. ``"/props"``, ``"/latents/tensors"``)."""
        return self._json("GET", path)

    def _json(self, method, path, body=None):
        resp = self._open(method, path, body)
        try:
            data = resp.read()
        except OSError as e:
            raise ConnectionError(f"{method} {path}: connection lost: {e}") from e
        finally:
            resp.conn.close()
        try:
            return json.loads(data)
        except ValueError:
            raise ServerError(f"{method} {path}", resp.status, None,
                              f"answer is not JSON: {data[:200]!r}") from None

    def tensors(self):
        """The capturable tensors (``GET /latents/tensors``): ``{"model", "n_layer",
        "global": [...], "layers": {"0": [{"name", "shape", "ggml_type"}, ...]}}``."""
        return self.get("/latents/tensors")

    # ------------------------------------------------------------ completions

    def complete(self, prompt, *, transport="json", tensors="l_out-*", layers=None, rows=None,
                 dtype=None, n_predict=None, temperature=None, top_k=None, sample_top_k=None,
                 seed=None, steer=None, patch=None, **extra):
        """Complete ``prompt`` (``POST /completion``) and return a :class:`Completion`.

        ``prompt``: a string, a list of token ids, or one list mixing strings and ids.
        ``transport``: ``"json"`` (one answer, latents base64), ``"sse"`` (streamed
        chunks) or ``"binary"`` (the record stream; the cheapest for big latents).
        All three give the same text, tokens and latents.
        ``tensors``: glob patterns (``"l_out-*"``, ``"l_out-6,attn_norm-*"`` or a
        list); None asks for no latents. ``layers``: ``"4..12"`` (half-open),
        ``"4..=12"``, an int, a list or a ``range``. ``rows``: ``"all"`` (default)
        or ``"last"``. ``dtype``: ``"f32"`` (default), ``"f16"`` or ``"bf16"``.
        ``top_k``: alternatives reported per generated token (fills ``.probs``;
        the wire's ``n_probs``), as in ``Model.generate`` and the CLI's ``--top-k``;
        ``sample_top_k``: the sampler's top-k (the wire's ``top_k``).
        ``n_predict``, ``temperature`` (≤ 0: greedy), ``seed``: as llama-server;
        None leaves the server's default. ``steer``/``patch``: a
        :class:`~latent_tap.Steer`/:class:`~latent_tap.Patch` or a list of them,
        sent as the request's ``steer``/``patch`` fields (vectors as base64
        float32; ``Steer(file=NAME)`` names a file in the server's
        ``--steer-dir``); they edit this request's sequence only, the server
        checks the values (``ServerError`` 400 naming the field) and
        ``Completion.edits`` says what it applied. ``**extra``: any other
        request field (``stop``, ``top_p``, ``lens``, ...), sent as given."""
        if isinstance(prompt, (list, tuple)):
            if not prompt or not all(isinstance(p, (str, numbers.Integral)) and not isinstance(p, bool)
                                     for p in prompt):
                raise TypeError("prompt must be a string, or a non-empty list of token ids and strings")
            prompt = [p if isinstance(p, str) else int(p) for p in prompt]
        elif not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        body = self._body(prompt=prompt, return_tokens=True, n_predict=n_predict,
                          temperature=temperature, top_k=sample_top_k, n_probs=top_k, seed=seed,
                          latents=_latents_field(tensors, layers, rows, dtype), extra=extra,
                          **wire_fields(steer, patch))
        return self._run("/completion", body, transport, chat=False, want_probs=bool(top_k))

    def chat(self, messages, *, transport="json", tensors="l_out-*", layers=None, rows=None,
             dtype=None, n_predict=None, temperature=None, top_k=None, sample_top_k=None, seed=None,
             steer=None, patch=None, **extra):
        """Chat (``POST /v1/chat/completions``, OpenAI-compatible) and return a
        :class:`Completion` whose ``text`` is the assistant's reply.

        ``messages``: ``[{"role": "user", "content": "Hi"}, ...]``. The server renders
        them with its chat template (``--chat-template``). Other arguments as in
        :meth:`complete` (``steer``/``patch`` included); ``n_predict`` is sent as ``max_tokens``, ``top_k`` as
        ``top_logprobs``. The token ids come from the answer's logprobs, which are
        always asked for: the OpenAI chat answer has no other field with them, and
        the server (as llama-server) sends no logprobs at all for
        ``top_logprobs: 0``, so without ``top_k`` the client asks for
        ``top_logprobs: 1`` and does not report that alternative (``.probs`` is
        None)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise TypeError(f"messages[{i}] must be a dict with a string 'role' and a 'content'")
        body = self._body(messages=list(messages), max_tokens=n_predict, temperature=temperature,
                          top_k=sample_top_k, seed=seed, logprobs=True, top_logprobs=top_k or 1,
                          latents=_latents_field(tensors, layers, rows, dtype), extra=extra,
                          **wire_fields(steer, patch))
        return self._run("/v1/chat/completions", body, transport, chat=True,
                         want_probs=bool(top_k))

    @staticmethod
    def _body(extra, **fields):
        # One name, one meaning across the package: top_k is what is reported.
        for k, use in (("n_probs", "top_k="), ("top_logprobs", "top_k="), ("top_k", "sample_top_k=")):
            if k in extra:
                raise TypeError(f"pass {use} instead of the wire field {k}= (top_k: alternatives "
                                "reported per token; sample_top_k: the sampler's top-k)")
        for k in ("n_predict", "max_tokens", "top_k", "n_probs", "top_logprobs", "seed"):
            v = fields.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"{k} must be an int, not {v!r}")
        t = fields.get("temperature")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise TypeError(f"temperature must be a number, not {t!r}")
        body = {k: v for k, v in fields.items() if v is not None}
        body.update(extra)
        return body

    def _run(self, path, body, transport, chat, want_probs):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        ans, lat = _Answer(chat), _Gather()
        if transport == "json":
            v = self._json("POST", path, dict(body, stream=False))
            ans.add(v, stream=False)
            lat.add_json(v.pop("latents", None))
            final = v
        elif transport == "sse":
            final = self._sse(path, dict(body, stream=True), ans, lat)
        else:
            final = self._binary(path, dict(body, stream=False), ans, lat, chat)
        return Completion("".join(ans.text), ans.tokens, lat.build(),
                          ans.probs if want_probs else None, final, transport, ans.lens)

    def _sse(self, path, body, ans, lat):
        what = f"POST {path} (SSE)"
        resp, final = self._open("POST", path, body), None
        try:
            for line in resp:
                line = line.rstrip(b"\r\n")
                if not line.startswith(b"data: "):
                    continue
                payload = line[len(b"data: "):]
                if payload == b"[DONE]":
                    break
                try:
                    c = json.loads(payload)
                except ValueError:
                    raise ServerError(what, 200, None, f"bad SSE chunk: {payload[:200]!r}") from None
                _raise_stream_error(c, what)
                ans.add(c, stream=True)
                lat.add_json(c.pop("latents", None))
                if c.get("stop") or _choice(c).get("finish_reason"):
                    final = c
                    if not ans.chat:
                        break
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionError(f"{what}: connection lost: {e}") from e
        finally:
            resp.conn.close()
        if final is None:
            raise ServerError(what, 200, None, "the stream ended without its final chunk")
        return final

    def _binary(self, path, body, ans, lat, chat):
        what = f"POST {path} (binary)"
        resp = self._open("POST", path, body, accept=FRAMES_MEDIA_TYPE)
        summary, end, n_frames, probs = None, None, 0, []
        try:
            for r in parse_records(resp):
                if r["kind"] == "frame":
                    # Completeness is checked with END's counts, not with `seq`: with a
                    # `lens` field the server's seq also counts the lens's own frames.
                    n_frames += 1
                    lat.add_frame(r)
                elif r["kind"] == "token" and not r["prompt"]:
                    ans.tokens.append(r["token"])
                    probs.append({"id": r["token"], "logprob": float(r["logprob"]), "top": r["top"]})
                elif r["kind"] == "lens":
                    ans.add_lens(r["value"])
                elif r["kind"] == "end":
                    end = r
                elif r["kind"] == "json":
                    summary = r["value"]
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionError(f"{what}: connection lost: {e}") from e
        finally:
            resp.conn.close()
        if summary is None or end is None:
            raise ServerError(what, 200, None, "the record stream ended without END and JSON records")
        _raise_stream_error(summary, what)
        if end["frames"] != n_frames or end["drops"]:
            raise ServerError(what, 200, None, f"END says {end['frames']} frames ({end['drops']} "
                              f"dropped), {n_frames} arrived")
        ans.text.append((_choice(summary).get("message") or {}).get("content") or ""
                        if chat else summary.get("content", ""))
        ans.probs = probs
        return summary

    # ------------------------------------------------------------ subscribe

    def subscribe(self, tensors="l_out-*", *, layers=None, rows=None, dtype=None, queue_mb=None,
                  max_requests=None, timeout=None):
        """Subscribe to every request the server runs (``GET /latents/subscribe``).

        Returns a :class:`Subscription`, already connected: every request sent
        after this call returns is seen whole. Iterate it for one
        :class:`Recording` per finished request; use it as a context manager (or
        call ``close()``) to disconnect::

            with client.subscribe("l_out-*", max_requests=2) as sub:
                client.complete("Hello", n_predict=4)
                client.complete("Bonjour", n_predict=4)
                for rec in sub:
                    print(rec.id, rec.text, rec.latents["l_out-0"].shape)

        ``tensors``/``layers``/``rows``/``dtype``: the selection, as in
        :meth:`complete`. ``queue_mb``: the server-side queue (frames beyond it are
        dropped and counted in ``Recording.dropped``). ``max_requests``: stop after
        that many recordings. ``timeout``: seconds to wait for the next record
        (None: forever; a timeout raises ``TimeoutError`` and closes the
        subscription)."""
        lat = _latents_field(tensors, layers, rows, dtype) or {}
        if queue_mb is not None:
            if isinstance(queue_mb, bool) or not isinstance(queue_mb, int) or queue_mb < 1:
                raise ValueError(f"queue_mb must be an int of at least 1, not {queue_mb!r}")
            lat["queue_mb"] = queue_mb
        if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 1):
            raise ValueError(f"max_requests must be a positive int or None, not {max_requests!r}")
        q = urllib.parse.urlencode(lat)
        resp = self._open("GET", "/latents/subscribe" + ("?" + q if q else ""), timeout=timeout)
        if timeout is None:
            resp.conn.sock.settimeout(None)
        return Subscription(resp, max_requests)


class Recording:
    """One request as a subscriber saw it (see :meth:`Client.subscribe`).

    ``id`` (server-wide request id), ``slot``, ``n_prompt`` (prompt tokens; None
    when the subscriber joined mid-request), ``n_generated``, ``prompt_tokens``
    and ``tokens`` (ids of the prompt and generated tokens seen), ``text`` (the
    generated pieces joined, decoded as UTF-8; a stop string is not cut),
    ``latents`` (:class:`Latents`), ``dropped`` (frames this subscriber had lost
    so far, all requests), ``seq_gaps`` (frames missing from the sequence so far),
    ``begin_missed`` (True when the begin notice came before the subscription)."""

    def __init__(self, slot):
        self.id, self.slot, self.n_prompt, self.n_generated = None, slot, None, None
        self.prompt_tokens, self.tokens, self.text = [], [], ""
        self._pieces, self._lat = bytearray(), _Gather()
        self.latents, self.dropped, self.seq_gaps, self.begin_missed = None, 0, 0, False

    def __repr__(self):
        return (f"Recording(id={self.id}, slot={self.slot}, n_prompt={self.n_prompt}, "
                f"n_generated={self.n_generated}, text={self.text!r}, latents={self.latents!r})")

    def arrays(self):
        """``{name: rows, name + ".pos": int32, name + ".step": int32}`` for saving."""
        out = {}
        for name, x in self.latents.items():
            out[name] = x
            out[name + ".pos"] = self.latents.pos[name]
            out[name + ".step"] = self.latents.step[name]
        return out

    def save(self, out_dir):
        """Write ``out_dir/request-<id>.safetensors`` (``.npz`` without the
        ``safetensors`` package) holding :meth:`arrays`; returns its path, or None
        when the request had no latents."""
        tensors = self.arrays()
        if not tensors:
            return None
        os.makedirs(out_dir, exist_ok=True)
        base = os.path.join(out_dir, f"request-{self.id}")
        try:
            from safetensors.numpy import save_file
        except ImportError:
            np.savez(base + ".npz", **tensors)
            return base + ".npz"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, base + ".safetensors")
        return base + ".safetensors"


def load_recording(path):
    """Read a file written by :meth:`Recording.save` into ``{name: array}``."""
    if str(path).endswith(".npz"):
        with np.load(path) as f:
            return dict(f)
    from safetensors.numpy import load_file
    return load_file(path)


class Subscription:
    """An open ``GET /latents/subscribe`` stream (from :meth:`Client.subscribe`).

    Iterating yields a :class:`Recording` per finished request, in the order the
    requests end (concurrent requests are told apart by slot). ``close()`` (or
    leaving a ``with`` block) disconnects. ``recordings`` counts those yielded."""

    def __init__(self, resp, max_requests=None):
        self._resp, self._records = resp, parse_records(resp)
        self.max_requests, self.recordings = max_requests, 0
        self._live, self._last_seq, self._gaps = {}, None, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Disconnect from the server (idempotent)."""
        if self._resp is not None:
            self._resp.conn.close()
            self._resp = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._resp is None or (self.max_requests and self.recordings >= self.max_requests):
            self.close()
            raise StopIteration
        try:
            for r in self._records:
                rec = self._route(r)
                if rec is not None:
                    self.recordings += 1
                    return rec
        except socket.timeout as e:
            self.close()
            raise TimeoutError("no record from the subscription within the timeout") from e
        except (OSError, http.client.HTTPException) as e:
            if self._resp is None:
                raise StopIteration from None
            raise ConnectionError(f"subscription lost: {e}") from e
        self.close()  # the server ended the stream
        raise StopIteration

    def _state(self, slot):
        st = self._live.get(slot)
        if st is None:
            st = self._live[slot] = Recording(slot)
        return st

    def _route(self, r):
        k = r["kind"]
        if k == "request" and r["event"] == "begin":
            st = self._live[r["seq_id"]] = Recording(r["seq_id"])
            st.id, st.n_prompt = r["request_id"], r["n_tokens"]
        elif k == "frame":
            if self._last_seq is not None and r["seq"] != self._last_seq + 1:
                self._gaps += r["seq"] - self._last_seq - 1
            self._last_seq = r["seq"]
            if r["n_rows"]:
                self._state(int(r["rows"]["seq_id"][0]))._lat.add_frame(r)  # one slot per frame
        elif k == "token":
            st = self._state(r["seq_id"])
            if r["prompt"]:
                st.prompt_tokens.append(r["token"])
            else:
                st.tokens.append(r["token"])
                st._pieces += r["piece"]
        elif k == "request" and r["event"] == "end":
            st = self._live.pop(r["seq_id"], None) or Recording(r["seq_id"])
            if st.id is None:  # joined mid-request: its begin notice came before us
                st.id, st.begin_missed = r["request_id"], True
            st.n_generated, st.dropped, st.seq_gaps = r["n_tokens"], r["dropped"], self._gaps
            st.text = bytes(st._pieces).decode("utf-8", "replace")
            st.latents = st._lat.build()
            return st
        return None


def main(argv=None):
    """The command line (``python -m latent_tap.client --help``); returns the exit status."""
    from ._client_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    import sys
    sys.exit(main())
