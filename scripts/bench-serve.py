#!/usr/bin/env python3
"""OpenAI HTTP servers side by side: `unicorn serve` (a client of the running unicornd) and
llama.cpp's own server (`python -m llama_cpp.server` from llama-cpp-python), on the same model
file, measured in one run, interleaved round by round.

Called by `scripts/bench serve`, which starts the daemon (with --threads compute threads).

For 1 and 4 concurrent clients, a round sends that many streamed chat completions at once
(temperature 0, --max-tokens tokens, each prompt unique so that neither server can reuse
another request's prompt from its cache) and waits for all of them:
- requests/s = the round's requests / the round's wall time (median over rounds);
- time to first token = from sending a request to its first content delta (median and p90 over
  every request of every round);
- tokens/request = content deltas received per request (both servers send one per token), to
  show that both did the same work.

The peer gets its fairest setting: --n_threads and --n_threads_batch equal to the daemon's
compute threads, the same context size (4096), verbose logging off, and
--interrupt_requests False (its default cuts a running stream short as soon as another request
waits, which would finish requests early rather than serve them). llama_cpp.server runs one
request at a time; flash attention off and on are both measured and each row shows the peer's
better one. The sides' order alternates round by round.
"""

import argparse
import http.client
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOPICS = ["a lighthouse keeper", "a robot gardener", "the first snow of winter", "a lost map",
          "a city under the sea", "an old violin", "a talking cat", "the last train home"]


def log(msg):
    print(f"bench-serve: {msg}", file=sys.stderr, flush=True)


def wait_idle_fn():
    """bench-clients.py's wait for idle CPUs (one definition for both benchmarks)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench-clients.py")
    spec = importlib.util.spec_from_file_location("bench_clients", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.wait_idle


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, proc, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer on port {port} within {timeout} s")


def stream_chat(port, model, prompt, max_tokens):
    """One streamed chat completion: (time to first content delta, content deltas, total time)."""
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": max_tokens, "stream": True,
    })
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, deltas = None, 0
    for raw in r:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        for ch in chunk.get("choices", []):
            if ch.get("delta", {}).get("content"):
                deltas += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    c.close()
    return (ttft if ttft is not None else total), deltas, total


def run_round(port, model, n, max_tokens, serial):
    """n requests at once: (wall time, [(ttft, deltas, total)])."""
    results = [None] * n
    errors = []
    barrier = threading.Barrier(n)

    def one(i):
        prompt = (f"Request {serial}-{i}: write a short story about {TOPICS[(serial + i) % len(TOPICS)]}, "
                  "with a beginning, a middle and an end.")
        barrier.wait()
        try:
            results[i] = stream_chat(port, model, prompt, max_tokens)
        except Exception as e:  # reported below; a failed round is an error
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return wall, results


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unicorn", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    model_id = os.path.basename(args.model).removesuffix(".gguf")
    logdir = tempfile.mkdtemp(prefix="unicorn-bench-serve.")
    procs = []
    try:
        servers = {}
        port = free_port()
        log_u = open(os.path.join(logdir, "unicorn-serve.log"), "w")
        p = subprocess.Popen([args.unicorn, "--no-spawn", "--socket", args.socket, "serve", "--port", str(port),
                              "-m", args.model], stdout=log_u, stderr=subprocess.STDOUT)
        procs.append(p)
        servers["unicorn"] = (port, p)
        for fa in ("off", "on"):
            port = free_port()
            log_p = open(os.path.join(logdir, f"llama-server-fa-{fa}.log"), "w")
            p = subprocess.Popen([args.peer_python, "-m", "llama_cpp.server", "--model", args.model,
                                  "--model_alias", model_id, "--host", "127.0.0.1", "--port", str(port),
                                  "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                                  "--n_ctx", "4096", "--flash_attn", "True" if fa == "on" else "False",
                                  "--interrupt_requests", "False", "--verbose", "False"],
                                 stdout=log_p, stderr=subprocess.STDOUT)
            procs.append(p)
            servers[f"llama.cpp fa={fa}"] = (port, p)
        for name, (port, p) in servers.items():
            wait_http(port, p, name)
            # Warm-up: the first request pays for page faults and lazy set-up on both sides.
            stream_chat(port, model_id, "Hello!", 8)
        log(f"servers up (logs in {logdir}); {args.rounds} rounds of {counts} concurrent streams, "
            f"{args.max_tokens} tokens each")
        wait_idle = wait_idle_fn()
        names = list(servers)
        data = {(name, n): {"rps": [], "ttft": [], "deltas": []} for name in names for n in counts}
        serial = 0
        busy = []
        for rnd in range(args.rounds):
            # Other work on a shared machine distorts every figure: start each round on idle CPUs.
            busy.append(wait_idle(120))
            for j, n in enumerate(counts):
                order = names if (rnd + j) % 2 == 0 else names[::-1]
                for name in order:
                    serial += 1
                    wall, res = run_round(servers[name][0], model_id, n, args.max_tokens, serial)
                    d = data[(name, n)]
                    d["rps"].append(n / wall)
                    d["ttft"].extend(r[0] for r in res)
                    d["deltas"].extend(r[1] for r in res)
            log(f"round {rnd + 1}/{args.rounds} done")
        print(f"model {os.path.basename(args.model)}, {args.threads} threads, {args.max_tokens} tokens per "
              f"streamed chat request, greedy; medians over {args.rounds} rounds")
        print()
        print("| concurrent streams | unicorn serve req/s | llama.cpp server req/s | ratio | unicorn TTFT p50 / p90 (ms) "
              "| llama.cpp TTFT p50 / p90 (ms) | TTFT p50 ratio | tokens/request (unicorn / llama.cpp) | peer flash attention |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in counts:
            u = data[("unicorn", n)]
            peers = [name for name in names if name != "unicorn"]
            best = max(peers, key=lambda name: statistics.median(data[(name, n)]["rps"]))
            l = data[(best, n)]
            u_rps, l_rps = statistics.median(u["rps"]), statistics.median(l["rps"])
            u50, l50 = statistics.median(u["ttft"]) * 1e3, statistics.median(l["ttft"]) * 1e3
            print(f"| {n} | {u_rps:.2f} | {l_rps:.2f} | {u_rps / l_rps:.2f}x | {u50:.0f} / {p90(u['ttft']) * 1e3:.0f} "
                  f"| {l50:.0f} / {p90(l['ttft']) * 1e3:.0f} | {l50 / u50:.2f}x | "
                  f"{statistics.mean(u['deltas']):.1f} / {statistics.mean(l['deltas']):.1f} | {best.split('=')[1]} |")
        print()
        print("ratio: unicorn's requests/s over llama.cpp's; TTFT ratio: llama.cpp's median over unicorn's "
              f"(above 1: unicorn answers first). CPUs busy with other work before the rounds: "
              f"{max(busy):.0%} at most. Every peer setting, for the record:")
        for n in counts:
            for name in names[1:]:
                d = data[(name, n)]
                print(f"- {name}, {n} stream(s): {statistics.median(d['rps']):.2f} req/s, TTFT p50 "
                      f"{statistics.median(d['ttft']) * 1e3:.0f} ms")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
