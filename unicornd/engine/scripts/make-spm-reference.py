#!/usr/bin/env python3
"""Generate unicornd/engine/tests/data/spm_reference.json: llama.cpp's SentencePiece (`llama`)
tokenization and detokenization of a seeded corpus of awkward strings, with Gemma 3's vocabulary.

Gemma 3 is the project's SentencePiece model. Its file sets `tokenizer.ggml.add_space_prefix =
false`; to check the dummy-prefix rules too, the vocabulary is also loaded with that key
overridden to true (llama.cpp's `kv_overrides`). For each text and each mode (add_space_prefix,
add_special, parse_special) the file holds llama.cpp's ids and two detokenizations of them:
`llama_detokenize(ids, remove_special=False, unparse_special=True)` and
`llama_detokenize(ids, remove_special=True, unparse_special=False)`. It also holds digests of
`llama_token_to_piece(id, lstrip=0, special)` for every token (special on and off), the
control-token ids and the end-of-generation ids. The Rust test
`unicornd/engine/tests/tokenizer_gemma.rs` must reproduce all of it. Run with the peer venv
(scripts/peer-setup) from the repository root:

    PEER=$(scripts/peer-setup)
    "$PEER/bin/python" unicornd/engine/scripts/make-spm-reference.py

The corpus comes from a fixed seed, so the output is reproducible for a given peer. For a larger
one-off comparison, write elsewhere and point the test at it:

    "$PEER/bin/python" unicornd/engine/scripts/make-spm-reference.py --random 20000 --seed 7 \
        --max-items 200 --out /tmp/spm.json
    UNICORN_SPM_REFERENCE=/tmp/spm.json cargo test -p unicorn-engine --test tokenizer_gemma
"""

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys

import llama_cpp
from llama_cpp import Llama

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
OUT = os.path.join(REPO, "unicornd", "engine", "tests", "data", "spm_reference.json")
N_RANDOM = 150
SEED = 20250301

# (add_space_prefix override or None for the file's value, add_special, parse_special)
MODES = [
    (None, True, False),
    (None, False, True),
    (True, True, True),
    (True, False, False),
]

FIXED = [
    "Hello world",
    " Hello",
    "  Hello  world  ",
    "Hello▁world ▁ ▁▁",
    "",
    " ",
    "\n",
    "a",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><bos>Hello<eos>",
    "<start_of_turn> user<end_of_turn> <start_of_turn>",
    "<0x41><0x0A><0xZZ><0x4><0xe9> <0x00>",
    "<unused0><unused12> <mask>[multimodal]<pad><unk></s><s>",
    "ctrl\x00\x01\x02\x1f\x7f done",
    "unassigned\u0378 pua\ue000\U000f0000 \U0010fffd noncharacter\ufdd0\uffff",
    "e\u0301 a\u0308 n\u0303 \u0915\u093f \u0e01\u0e34 Z\u0335\u0321",
    "你好，世界！日本語のテキスト。한국어 텍스트",
    "I love 🦀 and 🐍! 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "مرحبا بالعالم، كيف حالك؟ שלום",
    "\t\ttabs\tand\x0bvt\x0cff\r\nCRLF\n\n\nend\r",
    "    indented\n        more\n\t\n  \n",
    "def f(x):\n    return x ** 2  # square\n",
    "1234567890 3.14159 -0.5e-10 1,000,000 $19.99",
]

POOL = (
    list("abcXYZ019 \t\n\r'!?.,;:-_()[]{}<>=+$^`|~/\\\"#%&*@")
    + ["\x0b", "\x0c", "\x85", "\xa0", "\u2009", "\u3000", "\x1f", "\x00", "\x7f", "\u2581"]
    + ["é", "ß", "Ω", "ж", "ع", "ש", "क", "ि", "\u0301", "\u0308", "你", "好", "。", "，", "「"]
    + ["٣", "²", "３", "Ⅻ", "¼", "𝟘", "€", "©", "™", "→", "∮", "🦀", "👍", "🏽", "\u200d", "\u200b"]
    + ["\ufeff", "\u0378", "\u1c89", "\ue000", "\U000f0000", "\U0001f9ff", "’", "«", "—", "…"]
    + [" the", " The", "the", "ing", " and", "Hello", " world", " 2024", "tion", "un", "ly"]
    + ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<mask>", "<unused7>"]
    + ["[multimodal]", "</s>", "<0x41>", "<0x0A>", "<0x", ">"]
    + ["\r\n", "  ", "   ", "\n\n", "\t\t", " \n", "\n "]
)


def corpus(n_random, seed, max_items):
    rng = random.Random(seed)
    texts = list(FIXED)
    for _ in range(n_random):
        n = rng.randint(1, max_items)
        texts.append("".join(rng.choice(POOL) for _ in range(n)))
    return texts


def detokenize(llm, ids, remove_special, unparse_special):
    vocab = llm._model.vocab
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 256 + 16 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special,
                                       unparse_special)
        if n < 0:
            size = -n + 1
            continue
        return buf.raw[:n]


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


FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a64(chunks):
    """FNV-1a (64-bit) over the chunks, each preceded by its length as 4 little-endian bytes."""
    h = FNV_OFFSET
    for c in chunks:
        for b in len(c).to_bytes(4, "little") + c:
            h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def ranges(ids):
    """Ascending ids as [first, last] runs."""
    out = []
    for t in ids:
        if out and out[-1][1] + 1 == t:
            out[-1][1] = t
        else:
            out.append([t, t])
    return out


def text_or_hex(b):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": b.hex()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", type=int, default=N_RANDOM, help="number of random texts")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--max-items", type=int, default=30, help="pool items per random text, at most")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    src = subprocess.run([os.path.join(REPO, "scripts", "fetch-model"), "gemma3"], check=True,
                         capture_output=True, text=True).stdout.strip()
    texts = corpus(args.random, args.seed, args.max_items)
    llms = {
        None: Llama(model_path=src, vocab_only=True, verbose=False),
        True: Llama(model_path=src, vocab_only=True, verbose=False,
                    kv_overrides={"tokenizer.ggml.add_space_prefix": True}),
    }
    base = llms[None]
    vocab = base._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    pieces = {}
    for special in (True, False):
        pieces["special" if special else "plain"] = fnv1a64(
            token_piece(base, t, special) for t in range(n_vocab))
    control = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_control(vocab, t)]
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]

    modes = []
    for asp, add_special, parse_special in MODES:
        llm = llms[asp]
        rows = []
        for t in texts:
            ids = llm.tokenize(t.encode("utf-8"), add_bos=add_special, special=parse_special)
            rows.append({
                "ids": ids,
                "detok": text_or_hex(detokenize(llm, ids, False, True)),
                "detok_rs": text_or_hex(detokenize(llm, ids, True, False)),
            })
        modes.append({
            "add_space_prefix": asp,
            "add_special": add_special,
            "parse_special": parse_special,
            "rows": rows,
        })
        print(f"mode {asp} {add_special} {parse_special}: done", file=sys.stderr)

    header = {
        "format": "unicorn-spm-reference",
        "model_file": os.path.basename(src),
        "model_size": os.path.getsize(src),
        "peer": {"llama_cpp_python_version": llama_cpp.__version__},
        "notes": (
            "Gemma 3's vocabulary in llama.cpp (vocab_only). Per mode: add_space_prefix null = "
            "the file's value (false), true = kv_overrides tokenizer.ggml.add_space_prefix=true; "
            "ids = Llama.tokenize(text, add_bos=add_special, special=parse_special); detok = "
            "llama_detokenize(ids, remove_special=false, unparse_special=true), detok_rs = "
            "llama_detokenize(ids, remove_special=true, unparse_special=false), as UTF-8 text or "
            "{hex}. pieces_fnv1a64: FNV-1a 64 over every token's llama_token_to_piece(id, "
            "lstrip=0, special), each preceded by its length as u32 LE. control_ranges ([first, last] "
            "runs) / eog: the ids llama_vocab_is_control / llama_vocab_is_eog accept. Generated by "
            "unicornd/engine/scripts/make-spm-reference.py."),
        "n_vocab": n_vocab,
        "pieces_fnv1a64": pieces,
        "control_ranges": ranges(control),
        "eog": eog,
    }
    with open(args.out, "w") as f:
        f.write("{\n")
        for k, v in header.items():
            f.write(f" {json.dumps(k)}: {json.dumps(v)},\n")
        f.write(' "texts": [\n')
        f.write(",\n".join("  " + json.dumps(t) for t in texts))
        f.write("\n ],\n")
        f.write(' "modes": [\n')
        for i, m in enumerate(modes):
            f.write("  {")
            f.write(", ".join(f"{json.dumps(k)}: {json.dumps(m[k])}"
                              for k in ("add_space_prefix", "add_special", "parse_special")))
            f.write(', "rows": [\n')
            f.write(",\n".join("   " + json.dumps(r, ensure_ascii=False) for r in m["rows"]))
            f.write("\n  ]}" + ("," if i + 1 < len(modes) else "") + "\n")
        f.write(" ]\n}\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
