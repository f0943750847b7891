#!/usr/bin/env python3
"""unicorn's NPU kernels for XDNA1 (AIE2, "npu1") in AMD's IRON API (mlir-aie, aie.iron).

UNVERIFIED: written against the IRON API of mlir-aie's programming guide and never compiled or
run (the machines this was written on have neither the toolchain nor an NPU). build.sh runs it;
kernels/xdna/README.md says what has run where.

Each design prints MLIR; build.sh lowers it with aiecc.py to an xclbin and an instruction
stream. The compute-tile code is aie/ops.cc (bf16 in, f32 accumulation, bf16 out).

usage: iron_ops.py OP [shape...]
  matvec M K      y[M] = W[M,K] x[K]      (W streamed by row blocks over the columns)
  matmul M K N    Y[N,M] = X[N,K] W[M,K]^T (N tokens at once, for prefill)
  rms_norm K      y = x / sqrt(mean(x^2) + eps) * w
  rope H D        neox-style rotation of H heads of D dims, angles precomputed by the host
  silu K          y = silu(g) * u          (the SwiGLU gate)
  softmax K       y = softmax(x)
"""

import sys

import numpy as np
from ml_dtypes import bfloat16

from aie.iron import Kernel, ObjectFifo, Program, Runtime, Worker
from aie.iron.placers import SequentialPlacer
from aie.iron.device import NPU1Col1, NPU1Col4

OBJ = "ops.o"
ROWS_PER_TILE = 16  # rows of W one compute tile holds per step (16 x 576 bf16 = 18 KiB)


def tensor(n, dtype=bfloat16):
    return np.ndarray[(n,), np.dtype[dtype]]


def row_block_products(wf, xv, yf, kf, blocks, k):
    """In a core: `blocks` blocks of ROWS_PER_TILE rows of W, each times the vector xv."""
    for _ in range(blocks):
        wv, yv = wf.acquire(1), yf.acquire(1)
        kf(wv, xv, yv, ROWS_PER_TILE, k)
        wf.release(1)
        yf.release(1)


def matvec(m, k, cols=4):
    """Each of `cols` columns takes every `cols`-th block of ROWS_PER_TILE rows of W."""
    assert m % (ROWS_PER_TILE * cols) == 0, "M must split into row blocks per column"
    blocks = m // (ROWS_PER_TILE * cols)
    w_ty, x_ty, y_ty = tensor(ROWS_PER_TILE * k), tensor(k), tensor(ROWS_PER_TILE)
    kern = Kernel("matvec_bf16", OBJ, [w_ty, x_ty, y_ty, np.int32, np.int32])
    ws, xs, ys, workers = [], [], [], []
    for c in range(cols):
        w = ObjectFifo(w_ty, name=f"w{c}")
        x = ObjectFifo(x_ty, name=f"x{c}", depth=1)
        y = ObjectFifo(y_ty, name=f"y{c}")

        def core(wf, xf, yf, kf):
            xv = xf.acquire(1)
            row_block_products(wf, xv, yf, kf, blocks, k)
            xf.release(1)

        workers.append(Worker(core, [w.cons(), x.cons(), y.prod(), kern]))
        ws.append(w), xs.append(x), ys.append(y)
    rt = Runtime()
    with rt.sequence(tensor(m * k), tensor(k), tensor(m)) as (W, X, Y):
        rt.start(*workers)
        for c in range(cols):
            # Column c's blocks: rows [(b*cols + c)*R, +R) for b in 0..blocks.
            rt.fill(xs[c].prod(), X)
            rt.fill(ws[c].prod(), W, tap=row_blocks(m, k, c, cols))
            rt.drain(ys[c].cons(), Y, tap=row_blocks(m, 1, c, cols), wait=True)
    return Program(NPU1Col4() if cols == 4 else NPU1Col1(), rt).resolve_program(SequentialPlacer())


def row_blocks(m, k, c, cols):
    from aie.helpers.taplib import TensorAccessPattern

    r = ROWS_PER_TILE
    return TensorAccessPattern(
        (m, k), offset=c * r * k, sizes=[1, m // (r * cols), r, k], strides=[0, r * cols * k, k, 1]
    )


def matmul(m, k, n, cols=4):
    """N tokens: each token row of X is a matvec against W; tokens are independent."""
    assert n % cols == 0
    x_ty, w_ty, y_ty = tensor(k), tensor(ROWS_PER_TILE * k), tensor(ROWS_PER_TILE)
    kern = Kernel("matvec_bf16", OBJ, [w_ty, x_ty, y_ty, np.int32, np.int32])
    blocks = m // ROWS_PER_TILE
    fifos, workers = [], []
    for c in range(cols):
        w, x, y = (ObjectFifo(w_ty, name=f"w{c}"), ObjectFifo(x_ty, name=f"x{c}"),
                   ObjectFifo(y_ty, name=f"y{c}"))

        def core(wf, xf, yf, kf):
            for _ in range(n // cols):
                xv = xf.acquire(1)
                row_block_products(wf, xv, yf, kf, blocks, k)
                xf.release(1)

        workers.append(Worker(core, [w.cons(), x.cons(), y.prod(), kern]))
        fifos.append((w, x, y))
    rt = Runtime()
    with rt.sequence(tensor(n * k), tensor(m * k), tensor(n * m)) as (X, W, Y):
        rt.start(*workers)
        for c, (w, x, y) in enumerate(fifos):
            rt.fill(x.prod(), X)
            rt.fill(w.prod(), W)
            rt.drain(y.cons(), Y, wait=True)
    return Program(NPU1Col4(), rt).resolve_program(SequentialPlacer())


def rowwise(fn, ins, k, rows=1, weights=None):
    """One compute tile applies kernel `fn` to `rows` rows of `k` values."""
    row = tensor(k)
    args = [row] * ins + ([tensor(k, np.float32)] if weights else []) + [row, np.int32]
    kern = Kernel(fn, OBJ, args)
    in_f = [ObjectFifo(row, name=f"in{i}") for i in range(ins)]
    w_f = ObjectFifo(tensor(k, np.float32), name="w", depth=1) if weights else None
    out_f = ObjectFifo(row, name="out")

    def core(*a):
        *ins_, outf, kf = a
        wv = None
        if w_f is not None:
            wf = ins_.pop()
            wv = wf.acquire(1)
        for _ in range(rows):
            vs = [f.acquire(1) for f in ins_]
            o = outf.acquire(1)
            kf(*vs, *([wv] if wv is not None else []), o, k)
            for f in ins_:
                f.release(1)
            outf.release(1)

    fifo_args = [f.cons() for f in in_f] + ([w_f.cons()] if w_f else []) + [out_f.prod(), kern]
    worker = Worker(core, fifo_args)
    rt = Runtime()
    types = [tensor(rows * k)] * ins + ([tensor(k, np.float32)] if weights else []) + [tensor(rows * k)]
    with rt.sequence(*types) as bufs:
        rt.start(worker)
        for f, b in zip(in_f, bufs):
            rt.fill(f.prod(), b)
        if w_f:
            rt.fill(w_f.prod(), bufs[ins])
        rt.drain(out_f.cons(), bufs[-1], wait=True)
    return Program(NPU1Col1(), rt).resolve_program(SequentialPlacer())


def main(argv):
    op, shape = argv[1], [int(a) for a in argv[2:]]
    designs = {
        "matvec": lambda: matvec(*shape),
        "matmul": lambda: matmul(*shape),
        "rms_norm": lambda: rowwise("rms_norm_bf16", 1, shape[0], weights=True),
        # x and the host-computed cos/sin table: the kernel reads (x, table) per head.
        "rope": lambda: rowwise("rope_neox_bf16", 2, shape[1], rows=shape[0]),
        "silu": lambda: rowwise("silu_mul_bf16", 2, shape[0]),
        "softmax": lambda: rowwise("softmax_bf16", 1, shape[0]),
    }
    if op not in designs:
        sys.exit(f"unknown op {op}; one of {', '.join(designs)}")
    print(designs[op]())


if __name__ == "__main__":
    main(sys.argv)
