#!/usr/bin/env python3
"""Prefill and decode tokens/s of unicorn (through a running daemon) beside llama.cpp on the same
GGUF file and thread count, measured in one run, interleaved round by round.

Called by `scripts/bench model`, which starts the daemon. Each round runs `unicorn bench model`
then `scripts/peer-bench.py` (llama-cpp-python), each reporting the median of --repeat runs after a
warm-up; the table shows, per row, the median over rounds and the ratio unicorn / llama.cpp, plus
the daemon's resident memory.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def log(msg):
    print(f"bench-model: {msg}", file=sys.stderr, flush=True)


def run_json(cmd):
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unicorn", required=True, help="the unicorn binary")
    ap.add_argument("--socket", required=True, help="the daemon's socket")
    ap.add_argument("--daemon-pid", type=int, required=True)
    ap.add_argument("--peer-python", required=True, help="python of the llama-cpp-python venv")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prefill", default="128,512")
    ap.add_argument("--decode", default="128")
    args = ap.parse_args()

    here = os.path.dirname(os.path.abspath(__file__))
    ours_cmd = [args.unicorn, "--no-spawn", "--socket", args.socket, "bench", "model", "-m", args.model,
                "--prefill", args.prefill, "--decode", args.decode, "--repeat", str(args.repeat)]
    peer_cmd = [args.peer_python, os.path.join(here, "peer-bench.py"), "--model", args.model,
                "--threads", str(args.threads), "--prefill", args.prefill, "--decode", args.decode,
                "--repeat", str(args.repeat)]
    results = {}  # (engine, kind, tokens) -> [tokens/s per round]
    peer_info = {}
    for r in range(args.rounds):
        # Alternate which engine goes first, so neither always runs on a warmer machine.
        order = [("unicorn", ours_cmd), ("llama.cpp", peer_cmd)]
        if r % 2:
            order.reverse()
        for engine, cmd in order:
            log(f"round {r + 1}/{args.rounds}: {engine}")
            for m in run_json(cmd):
                results.setdefault((engine, m["kind"], m["tokens"]), []).append(m["tokens_per_s"])
                if engine == "llama.cpp":
                    peer_info = m
    rows = sorted({(k, n) for (_, k, n) in results}, key=lambda x: (x[0] != "prefill", x[1]))
    print(f"model: {os.path.basename(args.model)}; {args.threads} threads; {args.rounds} interleaved rounds, "
          f"each the median of {args.repeat} runs; llama.cpp {peer_info.get('llama_cpp_python', '?')} "
          f"(llama-cpp-python, commit {peer_info.get('llama_cpp_commit', '?')}, flash attention off)")
    print()
    print(f"| {'measurement':<14} | {'unicorn tok/s':>13} | {'llama.cpp tok/s':>15} | {'ratio':>6} | unicorn rounds | llama.cpp rounds |")
    print(f"|{'-' * 16}|{'-' * 15}|{'-' * 17}|{'-' * 8}|----------------|------------------|")
    for kind, n in rows:
        ours = results.get(("unicorn", kind, n), [])
        peer = results.get(("llama.cpp", kind, n), [])
        mo = statistics.median(ours) if ours else float("nan")
        mp = statistics.median(peer) if peer else float("nan")
        fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
        print(f"| {kind + ' ' + str(n):<14} | {mo:>13.1f} | {mp:>15.1f} | {mo / mp:>5.2f}x | {fmt(ours):<14} | {fmt(peer):<16} |")
    print()
    print(f"unicornd resident memory: {rss_kib(args.daemon_pid, 'VmRSS') / 1024:.0f} MiB now, "
          f"{rss_kib(args.daemon_pid, 'VmHWM') / 1024:.0f} MiB peak (model copy, KV cache, engine)")


if __name__ == "__main__":
    main()
