#!/usr/bin/env python3
"""Generate llama.cpp reference data for unicorn's parity tests.

Run with the peer venv's python (see scripts/peer-setup):

    PEER=$(scripts/peer-setup)
    "$PEER/bin/python" scripts/make-reference.py smollm2
    "$PEER/bin/python" scripts/make-reference.py gemma3 --model /path/to/gemma-3-270m-q4_k_m.gguf

It writes into tests/data/reference/<model-key>/:

    tokens.json      llama.cpp tokenizer ids and token pieces for a varied set of texts
    greedy.json      greedy continuations, teacher-forced top-k logits, some full logit vectors,
                     and the peer's own logit variation between its settings (flash attention on/off,
                     one batch versus one token per eval)
    perplexity.json  perplexity on tests/data/reference/texts/GPL-3.txt with per-window NLL sums

Every file carries a "peer" object with the exact llama-cpp-python / llama.cpp versions and the
context settings, and a "model" object with the GGUF file's name, size and SHA-256.
The format is documented in tests/data/reference/README.md.
"""

import argparse
import base64
import ctypes
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

import llama_cpp
from llama_cpp import Llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DIR = os.path.join(REPO, "tests", "data", "reference")
TEXT_FILE = os.path.join(REF_DIR, "texts", "GPL-3.txt")
FORMAT_VERSION = 1


def log(msg):
    print(f"make-reference: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# JSON output: pretty at the top, compact rows (one position / one case per line) below.


class Compact:
    """A value written on one line."""

    def __init__(self, value):
        self.value = value


def _dump(obj, indent, level):
    pad = " " * (indent * (level + 1))
    end = " " * (indent * level)
    if isinstance(obj, Compact):
        return json.dumps(_plain(obj.value), ensure_ascii=False, separators=(",", ":"))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {_dump(v, indent, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if not obj or all(not isinstance(x, (dict, list, tuple, Compact)) for x in obj):
            return json.dumps(_plain(obj), ensure_ascii=False, separators=(",", ":"))
        items = [pad + _dump(v, indent, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return json.dumps(_plain(obj), ensure_ascii=False)


def _plain(obj):
    if isinstance(obj, Compact):
        return _plain(obj.value)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return f32(obj)
    return obj


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = _dump(obj, 1, 0) + "\n"
    json.loads(text)  # self-check
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    log(f"wrote {os.path.relpath(path, REPO)} ({len(text.encode()):,} bytes)")


def f32(x):
    """A float32 as the shortest decimal that parses back to the same float32."""
    v = np.float32(x)
    if not np.isfinite(v):
        return str(v)  # "-inf" etc; never expected for logits
    return float(str(v))


# ----------------------------------------------------------------------------------------------
# Peer and model description


def model_key_path(key):
    out = subprocess.run([os.path.join(REPO, "scripts", "fetch-model"), key], check=True,
                         stdout=subprocess.PIPE, text=True)
    return out.stdout.strip()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ggml_build_info():
    """ggml_version() and ggml_commit() from the libggml-base the binding loaded."""
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    info = {}
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = os.path.join(libdir, name)
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            for fn in ("ggml_version", "ggml_commit"):
                try:
                    f = getattr(lib, fn)
                    f.restype = ctypes.c_char_p
                    info[fn] = f().decode()
                except AttributeError:
                    pass
            break
    return info


def peer_info(settings):
    info = ggml_build_info()
    return {
        "engine": "llama.cpp via llama-cpp-python",
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_commit": info.get("ggml_commit", "unknown"),
        "ggml_version": info.get("ggml_version", "unknown"),
        "build": "from source, GGML_NATIVE=ON, -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 (scripts/peer-setup)",
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        "cpu": cpu_name(),
        **settings,
    }


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def model_info(path, llm):
    md = llm.metadata
    keep = ["general.architecture", "general.name", "general.file_type", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"]
    return {
        "file": os.path.basename(path),
        "size": os.path.getsize(path),
        "sha256": sha256_of(path),
        "n_vocab": llm.n_vocab(),
        "bos": llm.token_bos(),
        "eos": llm.token_eos(),
        "add_bos": bool(llm._model.add_bos_token()),
        "metadata": {k: md[k] for k in keep if k in md},
    }


def make_llm(path, args, *, n_ctx, flash_attn=False, logits_all=True, n_batch=None):
    n_batch = n_batch or n_ctx
    settings = {
        "n_threads": args.threads,
        "n_threads_batch": args.threads,
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "n_ubatch": n_batch,
        "flash_attn": flash_attn,
        "logits_all": logits_all,
        "type_k": "f16 (default)",
        "type_v": "f16 (default)",
        "n_gpu_layers": 0,
        "use_mmap": True,
        "rope/yarn": "model defaults",
    }
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=logits_all,
                flash_attn=flash_attn, n_gpu_layers=0, verbose=False, seed=0)
    settings["n_ctx_actual"] = llm.n_ctx()
    return llm, settings


# ----------------------------------------------------------------------------------------------
# tokens.json

PYTHON_CODE = '''def fib(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


class Point:
    def __init__(self, x=0.0, y=0.0):
        self.x, self.y = x, y

    def __repr__(self):
        return f"Point({self.x!r}, {self.y!r})"
'''

RUST_CODE = '''use std::collections::HashMap;

fn main() {
    let mut v: Vec<u32> = (0..10).map(|x| x * x).collect();
    v.sort_by(|a, b| b.cmp(a));
    let mut m: HashMap<&str, i64> = HashMap::new();
    *m.entry("k").or_insert(0) += 1;
    if v.len() >= 3 && v[0] != 0 || m["k"] <= -1 {
        println!("{:?} {}", v, m.len());
    }
}
'''

ENGLISH_LONG = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us."
)


def token_cases(model_key, add_bos_default):
    """(name, text, add_bos, special). add_bos=None means the model's own default."""
    d = None
    cases = [
        ("english_simple", "Hello world", d, False),
        ("english_sentence", "The quick brown fox jumps over the lazy dog.", d, False),
        ("english_leading_space", " Hello", d, False),
        ("english_long", ENGLISH_LONG, d, False),
        ("english_mixed_case", "HELLO World hElLo wORLD", d, False),
        ("code_python", PYTHON_CODE, d, False),
        ("code_rust", RUST_CODE, d, False),
        ("code_operators", "a += b; c <<= 2; d != e && f || !g; x->y; p::q; r => s; 1..=5; t ** 2 // 3", d, False),
        ("code_json", '{"key": [1, 2.5, null, true], "nested": {"a": "b\\n"}}', d, False),
        ("markdown", "# Title\n\n- item 1\n- item 2\n\n```rust\nlet x = 1;\n```\n", d, False),
        ("url_email", "https://example.com/path/to?q=1&r=2#frag user.name+tag@example.org", d, False),
        ("unicode_accents", "café naïve résumé Ångström façade jalapeño", d, False),
        ("unicode_cjk", "你好，世界！日本語のテキスト。한국어 텍스트", d, False),
        ("unicode_emoji", "I love 🦀 and 🐍! 👍🏽 👨‍👩‍👧‍👦 🇫🇷", d, False),
        ("unicode_arabic", "مرحبا بالعالم، كيف حالك؟", d, False),
        ("unicode_combining", "e\u0301 a\u0308 n\u0303 o\u0302\u0323 Z\u0335\u0321", d, False),
        ("unicode_cyrillic_greek", "Привет, мир! Γειά σου κόσμε.", d, False),
        ("unicode_math_rare", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q, ﬁ ligature, zero\u200bwidth", d, False),
        ("numbers_digits", "1234567890", d, False),
        ("numbers_long_run", "12345678901234567890123456789", d, False),
        ("numbers_decimals", "3.14159265358979 and 2.718281828, -0.5e-10", d, False),
        ("numbers_in_text", "In 2024, 1,000,000 people paid $19.99 (a 15% discount) on 03/04.", d, False),
        ("ws_multiple_spaces", "a  b   c    d     e", d, False),
        ("ws_tabs", "\ttab\tseparated\t\tvalues", d, False),
        ("ws_newlines", "line1\nline2\n\nline4\r\nline5", d, False),
        ("ws_three_newlines", "\n\n\n", d, False),
        ("ws_trailing_spaces", "trailing spaces   ", d, False),
        ("ws_indented", "    indented\n        more", d, False),
        ("ws_mixed", " \t \n mixed", d, False),
        ("contractions_lower", "don't can't won't isn't", d, False),
        ("contractions_upper", "I'VE SEEN IT. We'll see. they're you'd she's I'M", d, False),
        ("contractions_names", "It's O'Reilly's book, rock 'n' roll", d, False),
        ("chatml_special", "<|im_start|>user\nhi<|im_end|>", d, True),
        ("chatml_nonspecial", "<|im_start|>user\nhi<|im_end|>", d, False),
        ("gemma_turn_special", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", d, True),
        ("gemma_turn_nonspecial", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", d, False),
        ("empty", "", d, False),
        ("empty_bos_flipped", "", not add_bos_default, False),
        ("single_space", " ", d, False),
        ("punctuation_runs", "!!!???...,,,;;;---***", d, False),
        ("punctuation_text", "Hello!!! What?! ...Really... (yes) [no] {maybe}", d, False),
        ("repeated_letters", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", d, False),
        ("hello_world_bos_flipped", "Hello world", not add_bos_default, False),
    ]
    return cases


def token_piece(llm, tok, special):
    vocab = llm._model.vocab
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(tok), buf, size, 0, special)
        if n < 0:
            size = -n + 1
            continue
        return buf.raw[:n]


def detokenize(llm, ids, remove_special, unparse_special):
    vocab = llm._model.vocab
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 256 + 16 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        if n < 0:
            size = -n + 1
            continue
        return buf.raw[:n]


def make_tokens(llm, key, path_info, peer):
    add_bos_default = bool(llm._model.add_bos_token())
    out_cases = []
    for name, text, add_bos, special in token_cases(key, add_bos_default):
        ab = add_bos_default if add_bos is None else add_bos
        ids = llm.tokenize(text.encode("utf-8"), add_bos=ab, special=special)
        pieces = [token_piece(llm, t, True).hex() for t in ids]
        detok = detokenize(llm, ids, False, True)
        out_cases.append(Compact({
            "name": name,
            "text": text,
            "add_bos": ab,
            "special": special,
            "ids": ids,
            "pieces_hex": pieces,
            "detok_hex": detok.hex(),
        }))
    return {
        "format": "unicorn-reference-tokens",
        "format_version": FORMAT_VERSION,
        "model_key": key,
        "model": path_info,
        "peer": peer,
        "notes": ("ids = Llama.tokenize(text.encode('utf-8'), add_bos=add_bos, special=special) "
                  "(special = parse_special). pieces_hex[i] = llama_token_to_piece(ids[i], lstrip=0, "
                  "special=True) as hex bytes. detok_hex = llama_detokenize(ids, remove_special=False, "
                  "unparse_special=True) as hex bytes."),
        "cases": out_cases,
    }


# ----------------------------------------------------------------------------------------------
# greedy.json


def greedy_prompts(key):
    if key == "gemma3":
        chat = ("<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
                "<start_of_turn>model\n")
        chat2 = ("<start_of_turn>user\nName three primary colors.<end_of_turn>\n"
                 "<start_of_turn>model\n")
    else:
        chat = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                "<|im_start|>assistant\n")
        # with SmolLM2's default system prompt
        chat2 = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n<|im_start|>user\nName three primary colors."
                 "<|im_end|>\n<|im_start|>assistant\n")
    return [
        ("capital", "The capital of France is", False),
        ("chat", chat, True),
        ("chat_colors", chat2, True),
        ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', False),
        ("story", "Once upon a time, in a small village by the sea,", False),
        ("question", "Q: How many legs does a spider have?\nA:", False),
    ]


def topk(row, k):
    idx = np.argpartition(-row, k)[:k]
    # deterministic order: logit descending, then id ascending
    order = sorted(idx.tolist(), key=lambda i: (-float(row[i]), i))
    return order


def teacher_forced(llm, seq):
    llm.reset()
    llm.eval(seq)
    return np.array(llm.scores[: len(seq)], dtype=np.float32, copy=True)


def free_running(llm, prompt_ids, n):
    """Greedy: eval the prompt in one batch, then one token per eval; argmax of the last row."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    rows = []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32, copy=True)
        rows.append(row)
        tok = int(np.argmax(row))  # ties -> lowest id
        out.append(tok)
        llm.eval([tok])
    return out, np.stack(rows)


def make_greedy(path, key, args, path_info):
    n_gen = args.n_gen
    n_ctx = 256
    llm, settings = make_llm(path, args, n_ctx=n_ctx, flash_attn=False)
    llm_fa, settings_fa = make_llm(path, args, n_ctx=n_ctx, flash_attn=True)
    n_vocab = llm.n_vocab()
    eos = llm.token_eos()
    add_bos = bool(llm._model.add_bos_token())

    full_bytes = n_vocab * 4 * 4 / 3  # base64 size of one full vector
    budget = int(args.full_logits_budget_mb * 1e6 // full_bytes)
    log(f"full-logit vectors: budget {args.full_logits_budget_mb} MB -> {budget} vectors of {n_vocab} floats")

    prompts_out = []
    wanted_full = []  # (priority, prompt index, position)
    results = []
    fa_max_all = 0.0
    fa_top16_all = 0.0
    rep_max_all = 0.0
    inc_max_all = 0.0
    for pi, (name, text, special) in enumerate(greedy_prompts(key)):
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        P = len(prompt_ids)
        t0 = time.perf_counter()
        cont, inc_rows = free_running(llm, prompt_ids, n_gen)
        t_free = time.perf_counter() - t0
        seq = prompt_ids + cont
        t0 = time.perf_counter()
        logits = teacher_forced(llm, seq)
        t_tf = time.perf_counter() - t0
        logits_fa = teacher_forced(llm_fa, seq)
        repeat_diff = float(np.abs(teacher_forced(llm, seq) - logits).max())

        # peer variation: flash attention on vs off; one token per eval vs one batch
        fa_diff = np.abs(logits - logits_fa).max(axis=1)
        inc_diff = np.abs(logits[P - 1: P - 1 + n_gen] - inc_rows).max(axis=1)
        fa_top1_agree = int((logits.argmax(axis=1) == logits_fa.argmax(axis=1)).sum())
        fa_max_all = max(fa_max_all, float(fa_diff.max()))
        fa_top16 = max(abs(float(logits[p][i]) - float(logits_fa[p][i]))
                       for p in range(len(seq)) for i in topk(logits[p], 16))
        fa_top16_all = max(fa_top16_all, fa_top16)
        rep_max_all = max(rep_max_all, repeat_diff)
        inc_max_all = max(inc_max_all, float(inc_diff.max()))

        positions = []
        tf_mismatch = []
        for p in range(len(seq)):
            row = logits[p]
            top = topk(row, 16)
            t1, t2 = top[0], top[1]
            positions.append(Compact({
                "pos": p,
                "token": seq[p],
                "next": seq[p + 1] if p + 1 < len(seq) else None,
                "top2_ids": [t1, t2],
                "top2_logits": [f32(row[t1]), f32(row[t2])],
                "margin": f32(np.float32(row[t1]) - np.float32(row[t2])),
                "top16": [[i, f32(row[i])] for i in top],
                "fa_maxdiff": f32(fa_diff[p]),
                "fa_top16_maxdiff": f32(max(abs(float(row[i]) - float(logits_fa[p][i])) for i in top)),
            }))
            if p >= P - 1 and p + 1 < len(seq) and t1 != seq[p + 1]:
                tf_mismatch.append(p)
        eos_at = [i for i, t in enumerate(cont) if t == eos]
        cont_text = detokenize(llm, cont, False, True)
        log(f"[{name}] prompt {P} tokens; greedy: {cont_text.decode('utf-8', 'replace')!r}")
        log(f"[{name}] flash-attn on/off max |dlogit| {fa_diff.max():.4f} (top-16 ids: {fa_top16:.4f}); "
            f"same settings again {repeat_diff:.4g}; "
            f"incremental vs batch {inc_diff.max():.4f}; teacher-forced argmax != greedy at {tf_mismatch}; "
            f"free-run {n_gen / t_free:.1f} tok/s (incl. prompt), teacher-forced eval {len(seq) / t_tf:.1f} tok/s")
        prompts_out.append({
            "name": name,
            "text": text,
            "add_bos": add_bos,
            "special": special,
            "prompt_ids": Compact(prompt_ids),
            "continuation_ids": Compact(cont),
            "continuation_text": cont_text.decode("utf-8", "replace"),
            "continuation_hex": cont_text.hex(),
            "eos_positions_in_continuation": eos_at,
            "teacher_forced_argmax_differs_at": tf_mismatch,
            "flash_attn_maxdiff": f32(fa_diff.max()),
            "flash_attn_top1_agree": fa_top1_agree,
            "incremental_vs_batch_maxdiff": f32(inc_diff.max()),
            "same_settings_repeat_maxdiff": f32(repeat_diff),
            "positions": positions,
            "full_logits": [],
        })
        results.append(logits)
        wanted_full.append((0, pi, P - 1))  # last prompt position
        if n_gen > 8:
            wanted_full.append((1, pi, P - 1 + 8))  # the position predicting continuation[8]
        wanted_full.append((2, pi, P - 1 + n_gen - 1))  # predicting the last continuation token

    wanted_full.sort()
    for _, pi, pos in wanted_full[:budget]:
        row = results[pi][pos]
        prompts_out[pi]["full_logits"].append(Compact({
            "pos": pos,
            "argmax": int(np.argmax(row)),
            "max": f32(row.max()),
            "f32le_base64": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii"),
        }))
    for p in prompts_out:
        p["full_logits"].sort(key=lambda c: c.value["pos"])

    peer = peer_info(settings)
    return {
        "format": "unicorn-reference-greedy",
        "format_version": FORMAT_VERSION,
        "model_key": key,
        "model": path_info,
        "peer": peer,
        "n_gen": n_gen,
        "notes": (
            "Free-running greedy: the prompt is evaluated in one batch, then one token per eval, "
            "next = argmax of the last logit row (ties to the lowest id; EOS is not a stop). "
            "Teacher-forced: prompt_ids + continuation_ids evaluated in ONE batch with logits_all=True; "
            "positions[p] describes the logit row at sequence position p (it predicts sequence[p+1]). "
            "fa_maxdiff = max over the vocabulary of |logit(flash_attn off) - logit(flash_attn on)| for the "
            "same teacher-forced batch; fa_top16_maxdiff is the same over the reference row's top-16 "
            "ids only. same_settings_repeat_maxdiff: the same teacher-forced eval repeated with the same "
            "settings. incremental_vs_batch_maxdiff compares the free-running rows "
            "(one token per eval) with the teacher-forced rows for positions P-1 .. P+n_gen-2. "
            "full_logits holds whole rows as base64 of little-endian float32."),
        "peer_variation": {
            "flash_attn_on_vs_off_maxdiff": f32(fa_max_all),
            "flash_attn_on_vs_off_top16_maxdiff": f32(fa_top16_all),
            "incremental_vs_batch_maxdiff": f32(inc_max_all),
            "same_settings_repeat_maxdiff": f32(rep_max_all),
            "note": ("the flash-attention-on run used the settings in 'peer' except flash_attn=%s"
                     % settings_fa["flash_attn"]),
        },
        "prompts": prompts_out,
    }


# ----------------------------------------------------------------------------------------------
# perplexity.json


def log_softmax_nll(rows, targets):
    """NLL (float64) of targets[i] under logits rows[i]."""
    r = rows.astype(np.float64)
    m = r.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(r - m).sum(axis=1))
    return lse - r[np.arange(len(targets)), targets]


def make_perplexity(path, key, args, path_info):
    with open(TEXT_FILE, "rb") as f:
        raw = f.read()
    W = args.ppl_window
    n_ctx = W + 1
    llm, settings = make_llm(path, args, n_ctx=n_ctx, flash_attn=False)
    add_bos = bool(llm._model.add_bos_token())
    bos = llm.token_bos()
    ids = llm.tokenize(raw, add_bos=False, special=False)
    n_windows = min(len(ids) // W, args.ppl_max_windows)
    log(f"perplexity: {len(ids)} tokens in the text, {n_windows} windows of {W}")
    windows = []
    tot_half = tot_all = 0.0
    cnt_half = cnt_all = 0
    t_eval = 0.0
    for k in range(n_windows):
        chunk = ids[k * W:(k + 1) * W]
        inp = ([bos] if add_bos else []) + chunk
        off = 1 if add_bos else 0
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(inp)
        t_eval += time.perf_counter() - t0
        rows = np.array(llm.scores[: len(inp)], dtype=np.float32)
        # logits row at input index off+i-1 predicts chunk[i]
        targets = np.array(chunk[1:], dtype=np.int64)
        nll = log_softmax_nll(rows[off: off + W - 1], targets)  # nll[j] is for chunk[j+1]
        half = nll[W // 2 - 1:]  # chunk[W/2 .. W-1]
        windows.append(Compact({
            "window": k,
            "first_token": k * W,
            "nll_sum_second_half": float(half.sum()),
            "n_second_half": int(len(half)),
            "nll_sum_all": float(nll.sum()),
            "n_all": int(len(nll)),
        }))
        tot_half += float(half.sum())
        cnt_half += len(half)
        tot_all += float(nll.sum())
        cnt_all += len(nll)
        log(f"window {k}: ppl(second half) {math.exp(half.sum() / len(half)):.4f}")
    speed = n_windows * len(inp) / t_eval if t_eval else 0.0
    ppl_half = math.exp(tot_half / cnt_half)
    ppl_all = math.exp(tot_all / cnt_all)
    log(f"perplexity: second-half {ppl_half:.4f} over {cnt_half} tokens, all {ppl_all:.4f} over "
        f"{cnt_all} tokens; prefill {speed:.1f} tok/s")
    return {
        "format": "unicorn-reference-perplexity",
        "format_version": FORMAT_VERSION,
        "model_key": key,
        "model": path_info,
        "peer": peer_info(settings),
        "text": {
            "file": "texts/GPL-3.txt",
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "n_tokens": len(ids),
        },
        "protocol": {
            "tokenize": "Llama.tokenize(file bytes, add_bos=False, special=False) of the whole file",
            "window": W,
            "n_windows": n_windows,
            "windows": "window k is ids[k*W:(k+1)*W] (non-overlapping; the tail shorter than W is dropped)",
            "input": ("[BOS] + window if the model's add_bos is true (here: %s), else the window; a fresh KV "
                      "cache per window, the whole input in one batch" % add_bos),
            "nll": ("nll of window[i] = logsumexp(row) - row[window[i]] where row is the logit row at the "
                    "input position holding window[i-1]; computed in float64 from float32 logits"),
            "second_half": "scores window[i] for i in W/2 .. W-1 (W/2 tokens per window; like llama-perplexity)",
            "all": "scores window[i] for i in 1 .. W-1 (W-1 tokens per window)",
            "ppl": "exp(sum of nll sums / sum of token counts) over all windows",
        },
        "ppl_second_half": ppl_half,
        "n_scored_second_half": cnt_half,
        "ppl_all": ppl_all,
        "n_scored_all": cnt_all,
        "prefill_tokens_per_s": round(speed, 1),
        "windows": windows,
    }


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_key", help="smollm2 or gemma3 (as in scripts/fetch-model)")
    ap.add_argument("--model", help="GGUF path (default: scripts/fetch-model MODEL_KEY)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="output directory (default tests/data/reference/MODEL_KEY)")
    ap.add_argument("--only", default="tokens,greedy,perplexity",
                    help="comma-separated subset of tokens,greedy,perplexity")
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--full-logits-budget-mb", type=float, default=2.2,
                    help="budget for whole-vocabulary logit rows in greedy.json (base64 MB)")
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--ppl-max-windows", type=int, default=16)
    args = ap.parse_args()

    path = args.model or model_key_path(args.model_key)
    out = args.out or os.path.join(REF_DIR, args.model_key)
    only = set(args.only.split(","))
    log(f"model {path}; llama-cpp-python {llama_cpp.__version__}; llama.cpp {ggml_build_info()}")

    llm, settings = make_llm(path, args, n_ctx=64, logits_all=False)
    info = model_info(path, llm)
    if "tokens" in only:
        write_json(os.path.join(out, "tokens.json"),
                   make_tokens(llm, args.model_key, info, peer_info(settings)))
    del llm
    if "greedy" in only:
        write_json(os.path.join(out, "greedy.json"), make_greedy(path, args.model_key, args, info))
    if "perplexity" in only:
        write_json(os.path.join(out, "perplexity.json"),
                   make_perplexity(path, args.model_key, args, info))


if __name__ == "__main__":
    main()
