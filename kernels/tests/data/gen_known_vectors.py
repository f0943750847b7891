#!/usr/bin/env python3
"""Writes known_vectors.txt: inputs and their GGUF encodings as computed by gguf-py's numpy
reference quantizers (`gguf.quants`), which that project keeps bit-exact with ggml's C.

    python3 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install gguf numpy
    /tmp/kvenv/bin/python kernels/tests/data/gen_known_vectors.py [--ggml-lib DIR]

With --ggml-lib (the directory holding libggml-base.so and libggml-cpu.so, e.g.
llama-cpp-python's site-packages/llama_cpp/lib), ggml's own C is called too: every gguf-py
encoding must equal `quantize_row_*_ref`'s, and the formats gguf-py cannot quantize are taken
from ggml alone: Q8_1 from `quantize_row_q8_1_ref`; Q2_K..Q6_K and Q8_K from
`quantize_row_q*_K_ref`, decoded by ggml's `dequantize_row_q*_K` (and checked against gguf-py's
numpy dequantization, Q8_K excepted: gguf-py has none).

Format, one record per line: `<TYPE> <input f32 LE hex> <encoded hex> <decoded f32 LE hex>`.
With --ggml-lib there are also dot-product records, `DOT <TYPE> <generic f32 LE hex> <arch f32 LE
hex>`: ggml's `ggml_vec_dot_<type>_q8_K_generic` and `ggml_vec_dot_<type>_q8_K` (the SIMD path
llama.cpp runs) of that type's record encoding with the Q8_K record's encoding.
"""

import argparse
import ctypes
import glob
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
K_BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_K": 292}


def c_name(name: str) -> str:
    # ggml spells the k-quants with a capital K: quantize_row_q4_K_ref.
    return name.lower().replace("_k", "_K")


def ggml_ref(lib: ctypes.CDLL, name: str, x: np.ndarray) -> np.ndarray:
    f = getattr(lib, f"quantize_row_{c_name(name)}_ref")
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype=np.float32)
    qk, size = (256, K_BLOCK_BYTES[name]) if name in K_BLOCK_BYTES else (32, BLOCK_BYTES[name])
    # Zeroed: ggml's Q8_K leaves an all-zero block's bsums unwritten; we define them as 0.
    out = np.zeros(len(x) // qk * size, np.uint8)
    f(x.ctypes.data, out.ctypes.data, len(x))
    return out


def ggml_dequant(lib: ctypes.CDLL, name: str, q: np.ndarray, n: int) -> np.ndarray:
    f = getattr(lib, f"dequantize_row_{c_name(name)}")
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    out = np.zeros(n, np.float32)
    f(q.ctypes.data, out.ctypes.data, n)
    return out


def ggml_dot(cpu: ctypes.CDLL, fname: str, w: np.ndarray, a: np.ndarray, n: int) -> np.ndarray:
    f = getattr(cpu, fname)
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    out = np.zeros(1, np.float32)
    f(n, out.ctypes.data, 0, w.ctypes.data, 0, a.ctypes.data, 0, 1)
    return out


def k_blocks() -> np.ndarray:
    """Weights for the k-quants: super-blocks of 256 that reach each branch of ggml's searches."""
    rng = np.random.default_rng(20250301)
    n = 256
    out = [rng.standard_normal(n * 2).astype(np.float32)]                 # typical weights
    out.append((rng.standard_normal(n) * 1e-3).astype(np.float32))       # small scale
    out.append((rng.standard_normal(n) * 3e3).astype(np.float32))        # large scale
    out.append(np.zeros(n, np.float32))                                  # all zero
    out.append(np.full(n, 0.7, np.float32))                              # constant: max == min
    out.append(rng.uniform(1e-8, 1e-7, n).astype(np.float32))            # subnormal f16 scales
    out.append(-rng.uniform(0.1, 1.0, n).astype(np.float32))             # all negative
    z = rng.standard_normal(n).astype(np.float32)                        # zero sub-blocks
    z[:32] = 0
    z[96:112] = 0
    out.append(z)
    spikes = rng.standard_normal(n).astype(np.float32)                   # outliers: tiny scales
    spikes[[7, 77, 200]] = [60.0, -45.0, 80.0]
    out.append(spikes)
    out.append(np.linspace(-1, 3, n, dtype=np.float32))                  # ramp
    out.append((rng.integers(-8, 8, n) * 0.5).astype(np.float32))        # ties
    wide = rng.standard_normal(n).astype(np.float32)                     # sub-block scales
    wide *= np.repeat(10.0 ** np.arange(-4, 4, dtype=np.float32), 32)    # 10^-4 .. 10^3
    out.append(wide)
    return np.concatenate(out)


def k_acts() -> np.ndarray:
    """Activations for Q8_K, as many as k_blocks()."""
    rng = np.random.default_rng(20250302)
    n = 256
    out = [rng.standard_normal(n * 3).astype(np.float32)]
    out.append(np.zeros(n, np.float32))
    ties = (rng.integers(-126, 126, n) + 0.5).astype(np.float32)        # iscale = -1: x.5 ties
    ties[9] = -127.0
    out.append(ties)
    first = rng.uniform(-1, 1, n).astype(np.float32)                     # +5 before -5: max = +5
    first[3] = 5.0
    first[10] = -5.0
    out.append(first)
    out.append(-rng.uniform(0.5, 2.0, n).astype(np.float32))
    out.append((rng.standard_normal(n) * 1e4).astype(np.float32))
    out.append((rng.standard_normal(n) * 1e-6).astype(np.float32))
    out.append(rng.standard_normal(n * 4).astype(np.float32))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ggml-lib", help="directory with libggml-base.so")
    args = ap.parse_args()
    lib = ctypes.CDLL(os.path.join(args.ggml_lib, "libggml-base.so")) if args.ggml_lib else None
    cpu = ctypes.CDLL(os.path.join(args.ggml_lib, "libggml-cpu.so")) if args.ggml_lib else None
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
        cpu.ggml_cpu_init()
        xk, xa = k_blocks(), k_acts()
        assert len(xk) == len(xa)
        n = len(xk)
        a = ggml_ref(lib, "Q8_K", xa)
        enc = {}
        for ty in [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
            q = ggml_ref(lib, ty.name, xk)
            d = ggml_dequant(lib, ty.name, q, n)
            py = dequantize(q.reshape(-1, K_BLOCK_BYTES[ty.name]), ty).reshape(-1)
            assert (py.view(np.uint32) == d.view(np.uint32)).all(), f"gguf-py decodes {ty.name} differently"
            lines.append(f"{ty.name} {hexf(xk)} {q.tobytes().hex()} {hexf(d)}")
            enc[ty.name] = q
        lines.append(f"Q8_K {hexf(xa)} {a.tobytes().hex()} {hexf(ggml_dequant(lib, 'Q8_K', a, n))}")
        for name, q in enc.items():
            g = ggml_dot(cpu, f"ggml_vec_dot_{c_name(name)}_q8_K_generic", q, a, n)
            s = ggml_dot(cpu, f"ggml_vec_dot_{c_name(name)}_q8_K", q, a, n)
            lines.append(f"DOT {name} {hexf(g)} {hexf(s)}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "known_vectors.txt")
    with open(path, "w") as f:
        src = ""
        if lib is not None:
            # Name the build when the library comes from an installed llama-cpp-python.
            dist = glob.glob(os.path.join(args.ggml_lib, "..", "..", "llama_cpp_python-*.dist-info"))
            build = f" of llama-cpp-python {os.path.basename(dist[0])[17:-10]}" if dist else ""
            src = f"ggml C{build} (Q8_1, k-quants, dots) via ctypes, "
        f.write(f"# {src}gguf-py {version('gguf')}, numpy {np.__version__}\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
