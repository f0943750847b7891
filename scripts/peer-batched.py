#!/usr/bin/env python3
"""llama.cpp decoding N sequences batched in one process: what batching alone buys the peer on
this machine, beside unicorn's N clients batched by the daemon (scripts/bench-clients.py runs
it; it can also be run by itself).

Run with the peer venv's python (see scripts/peer-setup):

    "$PEER/bin/python" scripts/peer-batched.py --model PATH --threads 2 --seqs 1,4 --tokens 128

For each N it makes one context with N sequences (llama.cpp's `n_seq_max`), prefills the same
--prompt-tokens tokens of scripts/peer-bench.py's PROMPT_TEXT into each, decodes --warmup
untimed steps, then --tokens timed steps: each step is one `llama_decode` of N tokens, one per
sequence, each asking for its logits, followed by a greedy argmax per sequence (as the
clients do). It prints one JSON line per N:

    {"engine": "llama.cpp batched", "seqs": 4, "threads": 2, "tokens_per_s": ...,
     "step_p50_ms": ..., "step_p99_ms": ..., "rounds": [...]}

with the medians over --rounds, the counts interleaved round by round.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np

import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("peer_bench", os.path.join(HERE, "peer-bench.py"))
peer_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_bench)


def log(msg):
    print(f"peer-batched: {msg}", file=sys.stderr, flush=True)


def fill(batch, items):
    """items: (token, pos, seq, wants logits) per batch slot."""
    for i, (tok, pos, seq, out) in enumerate(items):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if out else 0
    batch.n_tokens = len(items)


def run(model, n_vocab, prompt, n, args):
    """One round for N sequences: the timed decode steps' latencies in seconds."""
    p = llama_cpp.llama_context_default_params()
    n_ctx = max(len(prompt) + args.warmup + args.tokens, 64)
    p.n_ctx = (n_ctx + 255) // 256 * 256 * n
    p.n_batch = max(len(prompt) * n, n)
    p.n_ubatch = p.n_batch
    p.n_seq_max = n
    p.n_threads = args.threads
    p.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, p)
    if not ctx:
        raise SystemExit(f"peer-batched: llama.cpp could not make a context of {n} sequences")
    batch = llama_cpp.llama_batch_init(p.n_batch, 0, n)
    try:
        def argmax(i):
            ptr = llama_cpp.llama_get_logits_ith(ctx, i)
            return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

        def decode():
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise SystemExit(f"peer-batched: llama_decode returned {rc}")

        last = len(prompt) - 1
        fill(batch, [(t, i, s, i == last) for s in range(n) for i, t in enumerate(prompt)])
        decode()
        toks = [argmax(s * len(prompt) + last) for s in range(n)]
        pos = len(prompt)
        lat = []
        for step in range(args.warmup + args.tokens):
            t = time.perf_counter()
            fill(batch, [(toks[s], pos, s, True) for s in range(n)])
            decode()
            toks = [argmax(s) for s in range(n)]
            if step >= args.warmup:
                lat.append(time.perf_counter() - t)
            pos += 1
        return lat
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", default="1,2,4,8", help="sequence counts, comma-separated")
    ap.add_argument("--tokens", type=int, default=128, help="timed decode steps")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    counts = [int(x) for x in args.seqs.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit("peer-batched: --seqs takes positive counts, e.g. 1,4")

    log(f"loading {args.model} (threads {args.threads})")
    llm = Llama(model_path=args.model, n_ctx=64, n_threads=args.threads, n_gpu_layers=0,
                verbose=False)
    prompt = peer_bench.prompt_tokens(llm, args.prompt_tokens)
    model, n_vocab = llm._model.model, llm.n_vocab()
    rounds = {n: [] for n in counts}
    for r in range(args.rounds):
        order = counts if r % 2 == 0 else list(reversed(counts))
        for n in order:
            lat = run(model, n_vocab, prompt, n, args)
            rounds[n].append(lat)
            log(f"round {r + 1}/{args.rounds}: {n} sequences, "
                f"{n * len(lat) / sum(lat):.1f} tok/s, step p50 "
                f"{statistics.median(lat) * 1e3:.2f} ms")
    for n in counts:
        per = [n * len(lat) / sum(lat) for lat in rounds[n]]
        steps = sorted(x for lat in rounds[n] for x in lat)
        print(json.dumps({
            "engine": "llama.cpp batched", "seqs": n, "threads": args.threads,
            "tokens_per_s": statistics.median(per),
            "step_p50_ms": peer_bench.percentile(steps, 50) * 1e3,
            "step_p99_ms": peer_bench.percentile(steps, 99) * 1e3,
            "rounds": per,
            "llama_cpp_python": llama_cpp.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
