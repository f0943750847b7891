#!/usr/bin/env python3
"""One llama.cpp client process of the many-clients benchmark (scripts/bench-clients.py): the peer
of `unicorn bench decode-worker`, measured the same way.

Run with the peer venv's python (see scripts/peer-setup):

    "$PEER/bin/python" scripts/peer-worker.py --model PATH --threads 1 --tokens 128 \
        --prompt-tokens 16 --warmup 4 < /dev/null

The process loads the model file itself (llama.cpp maps it), prefills --prompt-tokens tokens of
scripts/peer-bench.py's PROMPT_TEXT in one eval, decodes --warmup greedy tokens untimed, then
prints "ready" and waits for a line on stdin (the start barrier: the orchestrator releases every
worker at once). It then decodes --tokens greedy tokens, one eval per token (the argmax between
evals included, as in peer-bench.py), timing each, and prints one JSON line:

    {"engine": "llama.cpp", "pid": ..., "threads": 1, "start_ns": ..., "end_ns": ...,
     "tokens_per_s": ..., "p50_ms": ..., "p99_ms": ..., "mean_ms": ..., "rss_kib": ..., ...}

start_ns/end_ns are Unix time in nanoseconds (the clock every process reads the same). Last it
waits for one more line (or the end of stdin) before exiting, so that the orchestrator can read
every process's memory while all are alive.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
# Same prompt text and prompt construction as peer-bench.py (and unicorn's bench).
_spec = importlib.util.spec_from_file_location("peer_bench", os.path.join(HERE, "peer-bench.py"))
peer_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_bench)

HEAD_TOKENS = 16


def log(msg):
    print(f"peer-worker[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def barrier(word=None):
    if word is not None:
        print(word, flush=True)
    sys.stdin.readline()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128, help="timed decode steps")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps before the barrier")
    ap.add_argument("--flash-attn", action="store_true", help="enable flash attention (default off)")
    args = ap.parse_args()

    # The same context size as unicorn's worker.
    n_ctx = max(args.prompt_tokens + args.warmup + args.tokens, 64)
    n_ctx = (n_ctx + 255) // 256 * 256
    n_batch = max(args.prompt_tokens, 1)
    log(f"loading {args.model} (threads {args.threads}, n_ctx {n_ctx})")
    llm = Llama(model_path=args.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=False,
                flash_attn=args.flash_attn, n_gpu_layers=0, verbose=False)
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()

    def next_token():
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    llm.reset()
    llm.eval(peer_bench.prompt_tokens(llm, args.prompt_tokens))
    tok = next_token()
    for _ in range(args.warmup):
        llm.eval([tok])
        tok = next_token()

    barrier("ready")
    start_ns = time.time_ns()
    t0 = time.perf_counter()
    lat = []
    head = []
    for _ in range(args.tokens):
        t = time.perf_counter()
        llm.eval([tok])
        tok = next_token()
        lat.append(time.perf_counter() - t)
        if len(head) < HEAD_TOKENS:
            head.append(tok)
    elapsed = time.perf_counter() - t0
    end_ns = time.time_ns()

    rss, hwm = status_kib("VmRSS"), status_kib("VmHWM")
    s = sorted(lat)
    print(json.dumps({
        "engine": "llama.cpp",
        "pid": os.getpid(),
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "flash_attn": args.flash_attn,
        "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens,
        "warmup": args.warmup,
        "start_ns": start_ns,
        "end_ns": end_ns,
        "seconds": elapsed,
        "tokens_per_s": args.tokens / elapsed,
        "p50_ms": round(peer_bench.percentile(s, 50) * 1e3, 3),
        "p99_ms": round(peer_bench.percentile(s, 99) * 1e3, 3),
        "mean_ms": round(sum(s) / len(s) * 1e3, 3) if s else 0.0,
        "max_ms": round(s[-1] * 1e3, 3) if s else 0.0,
        "rss_kib": rss,
        "hwm_kib": hwm,
        "head": head,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": peer_bench.ggml_commit(),
    }), flush=True)
    barrier()


if __name__ == "__main__":
    main()
