#!/usr/bin/env python3
"""HTTP side of scripts/test-attach (python3 standard library only).

  attach_client.py wait URL --pid PID [--timeout S]
      poll GET URL/health until it answers 200 (the server answers 503 while
      loading); fail at once if process PID is gone, or after S seconds

  attach_client.py run URL --out FILE --prompt TEXT [--prompt TEXT ...]
                   [--n-predict N] [--no-cache-prompt] [--timeout S]
      POST /tokenize each prompt (add_special: true, as /completion tokenizes),
      then send one POST /completion per prompt, all at once from threads
      (--sequential: one after the other), greedy (temperature 0),
      return_tokens, n_probs 2, and write
      {"wall_s": s, "items": [{"prompt", "prompt_tokens", "response"}, ...]}

  attach_client.py table LABEL=FILE[,FILE...] ...
      medians over the requests of each label's files: the server's
      timings.predicted_per_second and prompt_per_second (per request), and the
      aggregate generated tokens per wall second of each round
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request


def die(msg):
    print(f"attach_client: error: {msg}", file=sys.stderr)
    sys.exit(1)


def post(url, path, body, timeout):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {path}: HTTP {e.code}: {e.read()[:500]!r}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"POST {path}: {e}") from None


def cmd_wait(a):
    deadline = time.monotonic() + a.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if a.pid:
            try:
                os.kill(a.pid, 0)
            except ProcessLookupError:
                die(f"the server (pid {a.pid}) exited while loading; see its log")
        try:
            with urllib.request.urlopen(a.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    die(f"{a.url}/health not ready after {a.timeout:g} s (last: {last})")


def cmd_run(a):
    items = []
    for p in a.prompt:
        tok = post(a.url, "/tokenize", {"content": p, "add_special": True}, a.timeout)
        items.append({"prompt": p, "prompt_tokens": tok["tokens"]})
    bodies = [{
        "prompt": it["prompt"],
        "n_predict": a.n_predict,
        "temperature": 0,
        "return_tokens": True,
        "n_probs": 2,
        "cache_prompt": not a.no_cache_prompt,
        "seed": 0,
    } for it in items]
    results = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(i):
        for attempt in range(a.retry + 1):
            try:
                return post(a.url, "/completion", bodies[i], a.timeout)
            except RuntimeError as e:
                # seen once on a loaded 2-core machine: "Remote end closed connection without response"
                if attempt == a.retry or "HTTP " in str(e):
                    raise
                print(f"attach_client: warning: request {i}: {e}; sending it again (--retry)", file=sys.stderr)

    def worker(i):
        try:
            barrier.wait(timeout=a.timeout)
            results[i] = one(i)
        except Exception as e:  # reported below
            results[i] = e

    t0 = time.monotonic()
    if a.sequential:
        for i, body in enumerate(bodies):
            try:
                results[i] = one(i)
            except Exception as e:
                results[i] = e
    else:
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(a.timeout + 5)
    wall = time.monotonic() - t0
    for i, r in enumerate(results):
        if r is None:
            die(f"request {i}: no reply within {a.timeout:g} s")
        if isinstance(r, Exception):
            die(f"request {i}: {r}")
        if not r.get("tokens") and r.get("tokens_predicted", 0):
            die(f"request {i}: reply has no 'tokens' although return_tokens was sent (server too old?)")
        items[i]["response"] = r
    with open(a.out, "w") as f:
        json.dump({"wall_s": wall, "items": items}, f)


def cmd_table(a):
    rows = []
    for spec in a.spec:
        label, _, files = spec.partition("=")
        pps, ppr, agg = [], [], []
        for fn in files.split(","):
            with open(fn) as f:
                d = json.load(f)
            n = 0
            for it in d["items"]:
                t = it["response"]["timings"]
                pps.append(t["predicted_per_second"])
                ppr.append(t["prompt_per_second"])
                n += t["predicted_n"]
            agg.append(n / d["wall_s"])
        rows.append((label, len(files.split(",")), statistics.median(pps), statistics.median(ppr),
                     statistics.median(agg), min(pps), max(pps), agg))
    base = rows[0]
    print(f"{'config':<22} {'rounds':>6} {'gen tok/s':>10} {'(min-max)':>13} {'prompt tok/s':>13} "
          f"{'wall gen tok/s':>15} {'paired ratio':>13}")
    for label, n, pps, ppr, agg, lo, hi, per_round in rows:
        ratios = [x / y for x, y in zip(per_round, base[7]) if y > 0]
        ratio = statistics.median(ratios) if ratios else float("nan")
        print(f"{label:<22} {n:>6} {pps:>10.1f} {f'({lo:.1f}-{hi:.1f})':>13} {ppr:>13.1f} {agg:>15.1f} "
              f"{ratio:>13.3f}")
    print("gen/prompt tok/s: medians of the server's timings.predicted_per_second / prompt_per_second per "
          "request (each of the concurrent requests counts its own); wall: generated tokens of a round / its "
          f"wall time; paired ratio: median over rounds of wall gen tok/s / that of '{base[0]}' in the same "
          "round (rounds alternate the configurations, so a slow spell of the machine hits all of a round)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("url")
    w.add_argument("--pid", type=int)
    w.add_argument("--timeout", type=float, default=120)
    r = sub.add_parser("run")
    r.add_argument("url")
    r.add_argument("--out", required=True)
    r.add_argument("--prompt", action="append", required=True)
    r.add_argument("--n-predict", type=int, default=16)
    r.add_argument("--no-cache-prompt", action="store_true")
    r.add_argument("--sequential", action="store_true", help="one request at a time instead of all at once")
    r.add_argument("--retry", type=int, default=0, help="send a request again after a connection error (timings)")
    r.add_argument("--timeout", type=float, default=300)
    t = sub.add_parser("table")
    t.add_argument("spec", nargs="+")
    a = ap.parse_args()
    {"wait": cmd_wait, "run": cmd_run, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
