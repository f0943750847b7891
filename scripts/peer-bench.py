#!/usr/bin/env python3
"""Measure llama.cpp (the peer) on a GGUF file: prefill and decode speed.

Run with the peer venv's python (see scripts/peer-setup):

    "$PEER/bin/python" scripts/peer-bench.py --model PATH --threads 2 \
        --prefill 128,512 --decode 128 --repeat 3

Prints one JSON object per measurement on stdout (progress goes to stderr):

    {"engine": "llama.cpp", "kind": "prefill", "tokens": 128, "threads": 2, "repeat": 3,
     "tokens_per_s": 171.2, "runs_tokens_per_s": [...], "seconds_median": 0.75, ...}

prefill N: a fresh context (empty KV cache), a prompt of N tokens evaluated in one batch; only the
eval is timed. decode N: after a short prompt (--decode-prompt tokens, not timed), N greedy steps of
one token per eval; the time of the N evals (and the argmax between them) is timed. The reported
figure is the median over --repeat runs, after --warmup untimed runs of each measurement.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

import llama_cpp
from llama_cpp import Llama

# A fixed text the benchmark prompts are cut from (tokenized, repeated as needed).
PROMPT_TEXT = (
    "The history of computing is a story of ideas that took decades to mature. Early machines "
    "filled rooms and were programmed by rewiring panels; later, stored programs, compilers and "
    "operating systems made them general tools. Today a small model can run on a laptop, turning "
    "a prompt into text one token at a time, and the speed of that loop depends on memory "
    "bandwidth, cache sizes, vector instructions and careful engineering of every kernel. "
)


def log(msg):
    print(f"peer-bench: {msg}", file=sys.stderr, flush=True)


def percentile(sorted_xs, p):
    """Nearest rank, as unicorn's stats.rs (shared by the peer scripts)."""
    if not sorted_xs:
        return 0.0
    rank = math.ceil(p / 100.0 * len(sorted_xs))
    return sorted_xs[min(max(rank, 1), len(sorted_xs)) - 1]


def int_list(s):
    return [int(x) for x in s.split(",") if x.strip()] if s else []


def ggml_commit():
    import ctypes
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    try:
        f = ctypes.CDLL(path).ggml_commit
        f.restype = ctypes.c_char_p
        return f().decode()
    except (OSError, AttributeError):
        return "unknown"


def prompt_tokens(llm, n):
    base = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False, special=False)
    toks = []
    if llm._model.add_bos_token():
        toks.append(llm.token_bos())
    while len(toks) < n:
        toks.extend(base)
    return toks[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="128,512", help="comma-separated prompt lengths ('' for none)")
    ap.add_argument("--decode", default="128", help="comma-separated decode lengths ('' for none)")
    ap.add_argument("--decode-prompt", type=int, default=16, help="prompt tokens before decoding")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--flash-attn", action="store_true", help="enable flash attention (default off)")
    ap.add_argument("--label", default="llama.cpp", help="the 'engine' field of the output")
    args = ap.parse_args()

    prefill = int_list(args.prefill)
    decode = int_list(args.decode)
    n_ctx = max(prefill + [args.decode_prompt + d for d in decode] + [64])
    n_ctx = (n_ctx + 255) // 256 * 256
    n_batch = max(prefill + [args.decode_prompt, 1])

    log(f"loading {args.model} (threads {args.threads}, n_ctx {n_ctx}, n_batch {n_batch})")
    llm = Llama(model_path=args.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=False,
                flash_attn=args.flash_attn, n_gpu_layers=0, verbose=False)
    common = {
        "engine": args.label,
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "repeat": args.repeat,
        "flash_attn": args.flash_attn,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": ggml_commit(),
    }
    ctx = llm._ctx.ctx

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    def run_prefill(n):
        toks = prompt_tokens(llm, n)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        return time.perf_counter() - t0

    def run_decode(n):
        toks = prompt_tokens(llm, args.decode_prompt)
        llm.reset()
        llm.eval(toks)
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(last_logits()))
            llm.eval([tok])
        return time.perf_counter() - t0

    jobs = [("prefill", n, run_prefill) for n in prefill] + [("decode", n, run_decode) for n in decode]
    for kind, n, fn in jobs:
        for _ in range(args.warmup):
            fn(n)
        times = []
        for r in range(args.repeat):
            dt = fn(n)
            times.append(dt)
            log(f"{kind} {n}: run {r + 1}/{args.repeat}: {n / dt:.1f} tok/s")
        med = statistics.median(times)
        print(json.dumps({
            **common,
            "kind": kind,
            "tokens": n,
            "tokens_per_s": round(n / med, 2),
            "seconds_median": round(med, 5),
            "runs_tokens_per_s": [round(n / t, 2) for t in times],
            # other load on the machine makes the numbers meaningless (OpenMP threads spin-wait)
            "loadavg_1m": round(os.getloadavg()[0], 2),
            **({"prompt_tokens": args.decode_prompt} if kind == "decode" else {}),
        }), flush=True)


if __name__ == "__main__":
    main()
