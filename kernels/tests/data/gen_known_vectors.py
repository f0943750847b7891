#!/usr/bin/env python3
"""Writes known_vectors.txt: inputs and their GGUF encodings as computed by gguf-py's numpy
reference quantizers (`gguf.quants`), which that project keeps bit-exact with ggml's C.

    python3 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install gguf numpy
    /tmp/kvenv/bin/python kernels/tests/data/gen_known_vectors.py [--ggml-lib DIR]

With --ggml-lib (the directory holding libggml-base.so, e.g. llama-cpp-python's
site-packages/llama_cpp/lib), ggml's own C is called too: every gguf-py encoding must equal
`quantize_row_*_ref`'s, and Q8_1 (which gguf-py lacks) is taken from `quantize_row_q8_1_ref`.

Format, one record per line: `<TYPE> <input f32 LE hex> <encoded hex> <decoded f32 LE hex>`.
"""

import argparse
import ctypes
import os
from importlib.metadata import version

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize


def blocks() -> np.ndarray:
    rng = np.random.default_rng(20240607)
    out = []
    out.append(rng.standard_normal(32 * 6).astype(np.float32))          # typical weights
    out.append((rng.standard_normal(32 * 2) * 1e-3).astype(np.float32))  # small scale
    out.append((rng.standard_normal(32 * 2) * 3e3).astype(np.float32))   # large scale
    out.append(np.zeros(32, np.float32))                                 # d = 0
    out.append(np.full(32, 0.7, np.float32))                             # max == min
    out.append(rng.uniform(1e-8, 1e-7, 32).astype(np.float32))           # subnormal f16 d
    ties = np.arange(-15.5, 16.5, 1.0, dtype=np.float32)                 # roundf ties
    ties[0] = 127.0
    out.append(ties)
    neg = rng.uniform(-1, 1, 32).astype(np.float32)                      # negative extreme
    neg[5] = -4.0
    neg[20] = 4.0                                                        # equal magnitude later
    out.append(neg)
    out.append(np.linspace(-1, 3, 32, dtype=np.float32))                 # even ramp
    return np.concatenate(out)


def hexf(a: np.ndarray) -> str:
    return a.astype("<f4").tobytes().hex()


BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q8_1": 36}


def ggml_ref(lib: ctypes.CDLL, name: str, x: np.ndarray) -> np.ndarray:
    f = getattr(lib, f"quantize_row_{name.lower()}_ref")
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(len(x) // 32 * BLOCK_BYTES[name], np.uint8)
    f(x.ctypes.data, out.ctypes.data, len(x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ggml-lib", help="directory with libggml-base.so")
    args = ap.parse_args()
    lib = ctypes.CDLL(os.path.join(args.ggml_lib, "libggml-base.so")) if args.ggml_lib else None
    x = blocks()
    lines = []
    for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]:
        q = quantize(x.reshape(1, -1), ty)
        d = dequantize(q, ty).reshape(-1)
        if lib is not None and ty.name in BLOCK_BYTES:
            assert (ggml_ref(lib, ty.name, x) == q.reshape(-1)).all(), f"gguf-py differs from C: {ty.name}"
        lines.append(f"{ty.name} {hexf(x)} {q.tobytes().hex()} {hexf(d)}")
    if lib is not None:
        q = ggml_ref(lib, "Q8_1", x)
        blk = q.reshape(-1, 36)
        d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
        qs = blk[:, 4:].copy().view(np.int8).astype(np.float32)
        lines.append(f"Q8_1 {hexf(x)} {q.tobytes().hex()} {hexf((qs * d).reshape(-1))}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "known_vectors.txt")
    with open(path, "w") as f:
        src = "ggml C (Q8_1) via ctypes, " if lib is not None else ""
        f.write(f"# {src}gguf-py {version('gguf')}, numpy {np.__version__}\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
