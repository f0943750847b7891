#!/usr/bin/env python3
"""Many clients on one model: aggregate decode tokens/s, per-token latency and memory of N client
processes through one unicornd, beside N independent llama.cpp processes that each load the file
themselves, for N = 1, 2, 4, 8, measured in one run, interleaved round by round.

Called by `scripts/bench clients`, which starts the daemon (with --threads compute threads).

For each N, a group is N workers started together: on the unicorn side (the daemon shares the
model between them and batches their tokens into one forward pass per step) either
scripts/decode-worker.c (--worker), a C program linking libunicorn.so.1 as the programs that use
the daemon do, or `unicorn bench decode-worker`, the Rust CLI; both are measured when --worker is
given, the C clients in the table and the CLI's in a line below it. On the other side
scripts/peer-worker.py (llama.cpp via llama-cpp-python). Every worker prefills the same
prompt, decodes a few untimed tokens, and waits on a barrier; when all are ready they are released
together, each decodes --tokens greedy tokens one at a time, and reports its per-token latencies,
start and end time, and memory. While they all still live, this script reads every process's
memory (and the daemon's), then lets them exit.

- aggregate tok/s = all the group's tokens / (last end - first start);
- p50/p99 = each worker's per-token latency percentiles, median over the group's workers;
- memory (unicorn) = the daemon's VmRSS + every client's VmRSS; the daemon's peak (VmHWM, reset
  before each group through /proc/PID/clear_refs) is shown too;
- memory (llama.cpp) = the sum of the N processes' VmRSS. The processes share the model file's
  pages through the page cache, which RSS counts in each of them, so PSS (proportional set size,
  each shared page split between its users) is given for both sides too;
- threads: the daemon's compute threads; for the peer, N processes x T threads. The peer's
  settings (--peer-threads: "split" gives each process max(1, threads/N), "all" gives each the
  whole --threads; --peer-flash-attn off or on) are each measured, and each row shows the peer's
  best.

After the groups, for comparison, scripts/peer-batched.py runs llama.cpp decoding N sequences
batched in one process and one context (one llama_decode of N tokens per step): what batching
alone buys the peer on this machine, without processes or a daemon.

Every figure is the median over --rounds rounds, except memory: the least over rounds, because
the daemon's allocator keeps memory that earlier, larger groups freed. The order of the sides
alternates round by round and row by row. Other work on the machine distorts everything (an
OpenMP peer most of all): before each group the script waits (--wait-idle) for the CPUs to be
idle, and it reports the share of the CPUs that other processes took during the timed runs.
"""

import argparse
import array
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time


def log(msg):
    print(f"bench-clients: {msg}", file=sys.stderr, flush=True)


def proc_kib(pid, field, path="status"):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak(pid):
    """Resets the process's VmHWM to its current RSS (Linux >= 4.0; needs ptrace rights)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory(pid):
    return {
        "rss": proc_kib(pid, "VmRSS"),
        "hwm": proc_kib(pid, "VmHWM"),
        "pss": proc_kib(pid, "Pss", "smaps_rollup"),
    }


def unique_kib(pids):
    """The physical memory a group of processes occupies, each page counted once however many of
    them map it (their shared libraries, the model's page cache, the daemon's shared memory), from
    /proc/PID/pagemap. None when the page frame numbers are hidden (they need CAP_SYS_ADMIN).

    Summed RSS counts a page once per process that maps it, and PSS splits it between every
    process on the machine that maps it; this is what the group itself holds in memory."""
    page = os.sysconf("SC_PAGE_SIZE")
    frames = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps") as sm, open(f"/proc/{pid}/pagemap", "rb") as pm:
                span = None
                for line in sm:
                    head = line.split(None, 1)[0]
                    if "-" in head and not head.endswith(":"):
                        lo, hi = (int(x, 16) for x in head.split("-"))
                        span = (lo, hi)
                    elif head == "Rss:" and span and int(line.split()[1]) > 0:
                        lo, hi = span
                        pm.seek(lo // page * 8)
                        entries = array.array("Q", pm.read((hi - lo) // page * 8))
                        for e in entries:
                            if e >> 63:  # present
                                pfn = e & ((1 << 55) - 1)
                                if pfn == 0:
                                    return None
                                frames.add(pfn)
        except OSError:
            return None
    return len(frames) * page // 1024


def cpu_jiffies():
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    return busy, busy + v[3] + v[4]  # + idle iowait


def proc_jiffies(pid):
    """CPU time (user + system, all threads) a process used so far, in jiffies."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def wait_idle(limit_s):
    """Waits (up to limit_s) until the CPUs are at least 85% idle over a second: other work on
    a shared machine distorts every figure. Returns the busy fraction last seen."""
    deadline = time.time() + limit_s
    while True:
        b0, t0 = cpu_jiffies()
        time.sleep(1)
        b1, t1 = cpu_jiffies()
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy < 0.15 or time.time() >= deadline:
            return busy
        log(f"the CPUs are {busy:.0%} busy with other work; waiting for them to settle")


def daemon_status(status_cmd, *keys):
    """The values of `keys` in the daemon's `unicorn status --json`, or None when the command
    fails or this daemon does not report one of them."""
    try:
        st = json.loads(subprocess.run(status_cmd, check=True, stdout=subprocess.PIPE,
                                       text=True).stdout)
        return tuple(st[k] for k in keys)
    except (subprocess.CalledProcessError, ValueError, KeyError):
        return None


def engine_steps(status_cmd):
    """The daemon's (forward passes, passes that batched several contexts) so far, or None."""
    return daemon_status(status_cmd, "engine_steps", "engine_batched_steps")


def run_group(cmds, logdir, label, daemon_pid=None, status_cmd=None):
    """Starts every command, waits until all say ready, releases them together, collects their
    JSON lines and everyone's memory. Returns a dict of results."""
    procs = []
    errs = []
    try:
        for i, cmd in enumerate(cmds):
            err = open(os.path.join(logdir, f"{label}-{i}.log"), "w+")
            errs.append(err)
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err, text=True, bufsize=1))
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a worker said {line!r} instead of ready")
        load_before = os.getloadavg()[0]
        steps_before = engine_steps(status_cmd) if status_cmd else None
        ours = [p.pid for p in procs] + ([daemon_pid] if daemon_pid else [])
        cpu0, ours0 = cpu_jiffies(), sum(proc_jiffies(pid) for pid in ours)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            line = p.stdout.readline()
            if not line.strip():
                raise RuntimeError("a worker ended without a result")
            results.append(json.loads(line))
        cpu1, ours1 = cpu_jiffies(), sum(proc_jiffies(pid) for pid in ours)
        steps_after = engine_steps(status_cmd) if status_cmd else None
        # Everyone is alive and idle: read all the memory figures at one moment.
        mem = [memory(p.pid) for p in procs]
        daemon = memory(daemon_pid) if daemon_pid else None
        unique = unique_kib([p.pid for p in procs] + ([daemon_pid] if daemon_pid else []))
        for p in procs:
            p.stdin.close()
        for p in procs:
            if p.wait(timeout=60) != 0:
                raise RuntimeError(f"a worker exited with status {p.returncode}")
    except Exception as e:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        tails = []
        for err in errs:
            err.seek(0)
            tails.append(err.read()[-2000:])
        raise RuntimeError(f"{label}: {e}\n" + "\n".join(t for t in tails if t)) from e
    finally:
        for err in errs:
            err.close()
    start = min(r["start_ns"] for r in results)
    end = max(r["end_ns"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    out = {
        "aggregate": tokens / ((end - start) / 1e9),
        "p50": statistics.median(r["p50_ms"] for r in results),
        "p99": statistics.median(r["p99_ms"] for r in results),
        "rss": sum(m["rss"] for m in mem),
        "pss": sum(m["pss"] for m in mem),
        "unique": unique,
        "clients_rss": sum(m["rss"] for m in mem),
        "threads": results[0].get("threads"),
        "heads": [tuple(r["head"]) for r in results],
        "load": load_before,
        # the share of all CPUs that other processes used while the group decoded
        "others": max(0, (cpu1[0] - cpu0[0]) - (ours1 - ours0)) / max(1, cpu1[1] - cpu0[1]),
        "sample": results[0],
        # forward passes while the group decoded, and the mean tokens per pass
        "steps": None,
        "batch": None,
    }
    if steps_before and steps_after and steps_after[0] > steps_before[0]:
        out["steps"] = steps_after[0] - steps_before[0]
        out["batch"] = tokens / out["steps"]
    if daemon:
        out["daemon_rss"] = daemon["rss"]
        out["daemon_hwm"] = daemon["hwm"]
        out["rss"] += daemon["rss"]
        out["pss"] += daemon["pss"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unicorn", required=True, help="the unicorn binary")
    ap.add_argument("--worker", help="scripts/decode-worker.c built: the unicorn clients of the "
                                     "table (without it, the CLI's decode-worker)")
    ap.add_argument("--socket", required=True, help="the daemon's socket")
    ap.add_argument("--daemon-pid", type=int, required=True)
    ap.add_argument("--peer-python", required=True, help="python of the llama-cpp-python venv")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="the daemon's compute threads, and the peer's thread budget")
    ap.add_argument("--clients", default="1,2,4,8", help="client counts, comma-separated")
    ap.add_argument("--tokens", type=int, default=128, help="timed decode tokens per client")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode tokens per client")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-threads", choices=["split", "all", "both"], default="both",
                    help="split: threads/N per process; all: threads per process; both: measure "
                         "both, show the best")
    ap.add_argument("--peer-flash-attn", choices=["off", "on", "both"], default="both")
    ap.add_argument("--wait-idle", type=float, default=60,
                    help="before each group, wait up to this many seconds for the CPUs to be idle")
    ap.add_argument("--max-others", type=float, default=0.1,
                    help="a group during which other processes took more than this share of the "
                         "CPUs is measured again (up to --retries times; the least disturbed counts)")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--no-peer-batched", action="store_true",
                    help="skip llama.cpp decoding the N sequences batched in one process "
                         "(scripts/peer-batched.py), measured after the groups for comparison")
    args = ap.parse_args()

    counts = [int(x) for x in args.clients.split(",") if x.strip()]
    here = os.path.dirname(os.path.abspath(__file__))
    common = ["--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens),
              "--warmup", str(args.warmup)]
    cli = [args.unicorn, "--no-spawn", "--socket", args.socket, "bench", "decode-worker",
           "-m", args.model] + common
    ours = ([args.worker, "--socket", args.socket, "--model", args.model] + common
            if args.worker else cli)
    status_cmd = [args.unicorn, "--no-spawn", "--socket", args.socket, "status", "--json"]
    peer_settings = []  # (name, threads per process for N, flash attention)
    for t in (["split", "all"] if args.peer_threads == "both" else [args.peer_threads]):
        for fa in ([False, True] if args.peer_flash_attn == "both" else [args.peer_flash_attn == "on"]):
            peer_settings.append((t + (", FA on" if fa else ""), t, fa))

    def peer_threads(n, how):
        return max(1, args.threads // n) if how == "split" else args.threads

    def peer_cmd(n, how, fa):
        threads = peer_threads(n, how)
        # llama.cpp's CPU backend synchronises its threads with OpenMP barriers, which spin by
        # default: when the processes' threads outnumber the cores ("all" with N > 1), a spinning
        # thread holds the core that the thread it waits for needs, and decoding slows ten- to
        # fifty-fold. Waiting passively is the peer's best there (measured); without
        # oversubscription the default spin is faster.
        env = ["env", "OMP_WAIT_POLICY=PASSIVE"] if n * threads > args.threads else []
        cmd = env + [args.peer_python, os.path.join(here, "peer-worker.py"),
                     "--model", args.model, "--threads", str(threads)] + common
        return cmd + (["--flash-attn"] if fa else [])

    # (side, n) -> [group result per round]; side "unicorn", "unicorn-cli" (the CLI's workers,
    # when the table's are the C ones) or a peer setting name
    results = {}
    peak_reset = True
    retried = 0
    loads = [os.getloadavg()[0]]
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="unicorn-bench-clients-") as logdir:
        for r in range(args.rounds):
            for k, n in enumerate(counts):
                # (label, commands, the setting names the result counts for). Peer settings that
                # come to the same processes (N=1: split = all) run once and count for each.
                sides = [("unicorn", [ours] * n, ["unicorn"])]
                if args.worker:
                    sides.append(("unicorn-cli", [cli] * n, ["unicorn-cli"]))
                for name, how, fa in peer_settings:
                    same = [s for s in sides if s[0] == (peer_threads(n, how), fa)]
                    if same:
                        same[0][2].append(name)
                    else:
                        sides.append(((peer_threads(n, how), fa), [peer_cmd(n, how, fa)] * n, [name]))
                # Alternate which side goes first, round by round and row by row.
                if (r + k) % 2:
                    sides.reverse()
                for _, cmds, names in sides:
                    label = " = ".join(names)
                    daemon, steps_cmd = None, None
                    if names[0].startswith("unicorn"):
                        daemon, steps_cmd = args.daemon_pid, status_cmd
                    tries = []
                    while True:
                        if args.wait_idle > 0:
                            wait_idle(args.wait_idle)
                        log(f"round {r + 1}/{args.rounds}: {n} x {label} "
                            f"(load {os.getloadavg()[0]:.2f})")
                        if daemon:
                            peak_reset &= reset_peak(daemon)
                        g = run_group(cmds, logdir, f"{names[0]}-{n}-{r}", daemon, steps_cmd)
                        log(f"  {g['aggregate']:.1f} tok/s, p50 {g['p50']:.2f} ms, "
                            f"p99 {g['p99']:.2f} ms"
                            + (f", {g['batch']:.2f} tokens per forward pass" if g["batch"] else "")
                            + f"; other processes used {g['others']:.0%} of the CPUs")
                        tries.append(g)
                        if g["others"] <= args.max_others or len(tries) > args.retries:
                            break
                        log("  disturbed by other processes: measuring this group again")
                    g = min(tries, key=lambda t: t["others"])
                    retried += len(tries) - 1
                    for name in names:
                        results.setdefault((name, n), []).append(g)
            loads.append(os.getloadavg()[0])
    # What batching alone buys the peer here: its N sequences in one process and one context,
    # one llama_decode per step (the clients' pattern, without processes or a daemon).
    batched = {}
    if not args.no_peer_batched:
        if args.wait_idle > 0:
            wait_idle(args.wait_idle)
        log("llama.cpp batched in one process: " + ", ".join(f"{n} sequences" for n in counts))
        cmd = [args.peer_python, os.path.join(here, "peer-batched.py"), "--model", args.model,
               "--threads", str(args.threads), "--seqs", ",".join(map(str, counts)),
               "--rounds", str(args.rounds)] + common
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            log(f"peer-batched.py failed (exit {out.returncode}); its line is left out")
        for line in out.stdout.splitlines():
            r = json.loads(line)
            batched[r["seqs"]] = r
    minutes = (time.time() - t_start) / 60

    def med(side, n, key):
        xs = [g[key] for g in results.get((side, n), []) if g[key] is not None]
        return statistics.median(xs) if xs else float("nan")

    def least(side, n, key):
        # Memory: the smallest over rounds. The daemon's allocator keeps memory that earlier,
        # larger groups freed, which would otherwise count against the smaller ones.
        xs = [g[key] for g in results.get((side, n), []) if g[key] is not None]
        return min(xs) if xs else float("nan")

    # The peer's best setting per row (by median aggregate tokens/s).
    best = {n: max((name for name, _, _ in peer_settings), key=lambda s: med(s, n, "aggregate"))
            for n in counts}
    def first(side, n):
        return results[(side, n)][0]

    # The CLI's workers report the daemon's threads; the C API does not say, so ask the daemon.
    uthreads = (first("unicorn", counts[0]).get("threads")
                or (daemon_status(status_cmd, "threads") or [None])[0])
    peer_sample = first(peer_settings[0][0], counts[0])["sample"]
    mib = lambda kib: kib / 1024
    print(f"model: {os.path.basename(args.model)}; {args.tokens} greedy decode tokens per client "
          f"after a {args.prompt_tokens}-token prompt and {args.warmup} untimed tokens; "
          f"{args.rounds} interleaved rounds, medians shown (memory: the least over rounds); "
          f"{minutes:.1f} min")
    print(f"unicorn: one unicornd, {uthreads} compute threads, the model shared; llama.cpp "
          f"{peer_sample.get('llama_cpp_python', '?')} (llama-cpp-python, commit "
          f"{peer_sample.get('llama_cpp_commit', '?')}): N processes, each loading the file; "
          f"peer settings: split = max(1, {args.threads}/N) threads each, all = {args.threads} "
          f"threads each (OpenMP waiting passively when that oversubscribes the cores)")
    others = [g["others"] for gs in results.values() for g in gs]
    print(f"load average (1 min) at the start of each round and at the end: "
          f"{', '.join(f'{x:.2f}' for x in loads)}; other processes used "
          f"{statistics.median(others):.0%} of the CPUs during a timed run (median), "
          f"{max(others):.0%} at most; {retried} disturbed group(s) measured again")
    print()
    def memcell(side, n):
        u = least(side, n, "unique")
        return (f"{mib(least(side, n, 'rss')):.0f} / {mib(least(side, n, 'pss')):.0f} / "
                f"{'-' if math.isnan(u) else f'{mib(u):.0f}'}")

    print("| N | unicorn tok/s | p50 ms | p99 ms | tok/pass | memory MiB RSS / PSS / unique "
          "| threads | llama.cpp tok/s | p50 ms | p99 ms | memory MiB RSS / PSS / unique "
          "| threads | peer setting "
          "| tok/s ratio |")
    print("|--:|--:|--:|--:|--:|--:|--|--:|--:|--:|--:|--|--|--:|")
    for n in counts:
        b = best[n]
        ua, pa = med("unicorn", n, "aggregate"), med(b, n, "aggregate")
        batch = med("unicorn", n, "batch")
        print(f"| {n} | {ua:.1f} | {med('unicorn', n, 'p50'):.2f} | {med('unicorn', n, 'p99'):.2f} "
              f"| {'-' if math.isnan(batch) else f'{batch:.2f}'} "
              f"| {memcell('unicorn', n)} "
              f"| {uthreads} in unicornd "
              f"| {pa:.1f} | {med(b, n, 'p50'):.2f} | {med(b, n, 'p99'):.2f} "
              f"| {memcell(b, n)} "
              f"| {n} x {first(b, n)['threads']} | {b} | {ua / pa:.2f}x |")
    print()
    print("tok/pass: tokens per forward pass of unicornd while the clients decoded (N would be "
          "perfect batching)")
    print("memory: RSS = the processes' VmRSS summed (a page mapped by k of them counts k times: "
          "the clients' binary and libc, the peer's model file); PSS = their proportional set "
          "sizes summed; unique = the physical pages the group holds, each counted once "
          "(/proc/PID/pagemap; '-' without CAP_SYS_ADMIN)")
    client_kind = {"unicorn": "C clients (scripts/decode-worker.c, libunicorn.so.1)"
                   if args.worker else "CLI clients (unicorn bench decode-worker)",
                   "unicorn-cli": "CLI clients (unicorn bench decode-worker)"}
    print(f"unicorn's clients in the table: {client_kind['unicorn']}")
    for side in [s for s in ("unicorn", "unicorn-cli") if (s, counts[0]) in results]:
        print(f"unicorn memory with {client_kind[side]} = unicornd + its clients: "
              + "; ".join(f"N={n}: unicornd {mib(least(side, n, 'daemon_rss')):.0f} MiB "
                          f"({mib(least(side, n, 'daemon_hwm')):.0f} MiB peak"
                          f"{'' if peak_reset else ' since start'}), clients "
                          f"{mib(least(side, n, 'clients_rss')):.0f} MiB"
                          for n in counts))
    if ("unicorn-cli", counts[0]) in results:
        print(f"unicorn with {client_kind['unicorn-cli']}, in the same rounds: " + ", ".join(
            f"N={n}: {med('unicorn-cli', n, 'aggregate'):.1f} tok/s (p50 "
            f"{med('unicorn-cli', n, 'p50'):.2f} ms, p99 {med('unicorn-cli', n, 'p99'):.2f} ms), "
            f"memory {memcell('unicorn-cli', n)} MiB" for n in counts))
    if len(peer_settings) > 1:
        for name, _, _ in peer_settings:
            print(f"llama.cpp, {name}: " + ", ".join(
                f"N={n}: {med(name, n, 'aggregate'):.1f} tok/s (p50 {med(name, n, 'p50'):.1f} ms)"
                for n in counts))
    if batched:
        print(f"llama.cpp batched in one process ({args.threads} threads, N sequences, one "
              f"llama_decode of N tokens per step; scripts/peer-batched.py, after the groups): "
              + ", ".join(f"N={n}: {batched[n]['tokens_per_s']:.1f} tok/s (step p50 "
                          f"{batched[n]['step_p50_ms']:.1f} ms)" for n in counts if n in batched))
    per_round = lambda side, n: ", ".join(f"{g['aggregate']:.0f}" for g in results.get((side, n), []))
    print("aggregate tok/s of each round: " + "; ".join(
        f"N={n}: unicorn {per_round('unicorn', n)}"
        + (f" (CLI clients {per_round('unicorn-cli', n)})" if args.worker else "")
        + f", llama.cpp {per_round(best[n], n)}" for n in counts))
    # Greedy text: the same for every unicorn worker whatever the batch, and how far it agrees
    # with the peer's (the first timed tokens, after the prompt and the warm-up ones).
    heads = {}
    for (side, _), gs in results.items():
        for g in gs:
            heads.setdefault(side, set()).update(g["heads"])

    def shared(a, b):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return k

    ours_heads = heads.get("unicorn", set()) | heads.get("unicorn-cli", set())
    print(f"greedy text: unicorn's workers{' (C and CLI)' if args.worker else ''} generated {len(ours_heads)} distinct sequence(s) over "
          f"all N; of the first {max(len(h) for h in ours_heads)} timed tokens, the peer's agree "
          f"with unicorn's on: " + ", ".join(
              f"{name} {min(shared(a, b) for a in ours_heads for b in heads[name])}"
              for name, _, _ in peer_settings))
    print()
    if 1 in counts and 4 in counts:
        u1, u4 = med("unicorn", 1, "aggregate"), med("unicorn", 4, "aggregate")
        p4 = med(best[4], 4, "aggregate")
        m1, m4 = least("unicorn", 1, "rss"), least("unicorn", 4, "rss")
        verdict = lambda ok: "met" if ok else "NOT met"
        print(f"target: 4 clients >= 2.5x the aggregate tok/s of 1 client: "
              f"{u4 / u1:.2f}x ({u4:.1f} / {u1:.1f}): {verdict(u4 >= 2.5 * u1)}")
        if 1 in batched and 4 in batched:
            b1, b4 = batched[1]["tokens_per_s"], batched[4]["tokens_per_s"]
            print(f"         for comparison, llama.cpp's 4 vs 1 here: 4 processes "
                  f"{p4 / med(best[1], 1, 'aggregate'):.2f}x, 4 sequences batched in one process "
                  f"{b4 / b1:.2f}x ({b4:.1f} / {b1:.1f})")
        print(f"target: 4 clients >= 2x the aggregate tok/s of 4 llama.cpp processes ({best[4]}): "
              f"{u4 / p4:.2f}x ({u4:.1f} / {p4:.1f}): {verdict(u4 >= 2 * p4)}")
        print(f"target: memory (RSS, unicornd + clients) for 4 clients within 1.2x of 1 client: "
              f"{m4 / m1:.2f}x ({mib(m4):.0f} / {mib(m1):.0f} MiB): {verdict(m4 <= 1.2 * m1)}")
        # RSS counts every shared page (libc, the client binary) once per process; PSS splits
        # them, so it is what the group of processes adds to the machine.
        s1, s4 = least("unicorn", 1, "pss"), least("unicorn", 4, "pss")
        print(f"         the same in PSS: {s4 / s1:.2f}x ({mib(s4):.0f} / {mib(s1):.0f} MiB): "
              f"{verdict(s4 <= 1.2 * s1)}")
        q1, q4 = least("unicorn", 1, "unique"), least("unicorn", 4, "unique")
        if not (math.isnan(q1) or math.isnan(q4)):
            print(f"         the same in unique physical pages: {q4 / q1:.2f}x ({mib(q4):.0f} / "
                  f"{mib(q1):.0f} MiB): {verdict(q4 <= 1.2 * q1)}")
        if args.worker:
            # The same targets with the CLI as the client: a bigger process (its own binary's
            # pages and more of libc), which RSS counts once per client.
            c1, c4 = med("unicorn-cli", 1, "aggregate"), med("unicorn-cli", 4, "aggregate")
            r1, r4 = least("unicorn-cli", 1, "rss"), least("unicorn-cli", 4, "rss")
            print(f"         with CLI clients: 4 vs 1 client {c4 / c1:.2f}x ({c4:.1f} / {c1:.1f}), "
                  f"vs 4 llama.cpp processes {c4 / p4:.2f}x, memory (RSS) {r4 / r1:.2f}x "
                  f"({mib(r4):.0f} / {mib(r1):.0f} MiB)")
    else:
        print("targets: need N=1 and N=4 in --clients")


if __name__ == "__main__":
    main()
