"""Triton body of the batched power iteration (pyadvk/ops/power_iteration.py defines it).

The weights are packed into one flat buffer (their native dtype) with an offset table, since a
kernel takes a fixed set of pointers; u, v and W v live in packed float32 buffers. Per iteration,
four launches over all matrices at once: ``Wᵀu`` (one program per BLOCK_N columns of a matrix,
looping over its rows in BLOCK_M tiles, writing the program's Σ v²), normalize v (one program
per matrix), ``W v`` (one program per BLOCK_M rows, looping over columns, writing Σ t²),
normalize u and write σ (one program per matrix). Registered with torch.library.triton_op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_M = 16
BLOCK_N = 64
_META = 10  # w_off, u_off, v_off, m, n, col_task0, col_task1, row_task0, row_task1, unused


@triton.jit
def _wt_u_kernel(
    w_ptr,
    u_ptr,
    v_ptr,
    meta_ptr,
    tasks_ptr,
    partial_ptr,
    META: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    i = tl.load(tasks_ptr + 2 * k)
    c0 = tl.load(tasks_ptr + 2 * k + 1)
    w_off = tl.load(meta_ptr + META * i)
    u_off = tl.load(meta_ptr + META * i + 1)
    v_off = tl.load(meta_ptr + META * i + 2)
    m = tl.load(meta_ptr + META * i + 3)
    n = tl.load(meta_ptr + META * i + 4)
    cols = c0 + tl.arange(0, BLOCK_N)
    cmask = cols < n
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(0, m, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < m
        u = tl.load(u_ptr + u_off + rows, mask=rmask, other=0.0)
        w = tl.load(
            w_ptr + w_off + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(w * u[:, None], axis=0)
    tl.store(v_ptr + v_off + cols, acc, mask=cmask)
    tl.store(partial_ptr + k, tl.sum(acc * acc, axis=0))


@triton.jit
def _normalize_v_kernel(v_ptr, meta_ptr, partial_ptr, META: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    v_off = tl.load(meta_ptr + META * i + 2)
    n = tl.load(meta_ptr + META * i + 4)
    k0 = tl.load(meta_ptr + META * i + 5)
    k1 = tl.load(meta_ptr + META * i + 6)
    ss = tl.zeros([BLOCK], tl.float32)
    for s in range(k0, k1, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        ss += tl.load(partial_ptr + idx, mask=idx < k1, other=0.0)
    nv = tl.sqrt(tl.sum(ss, axis=0))
    div = tl.where(nv > 0, nv, 1.0)
    for s in range(0, n, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        mask = idx < n
        v = tl.load(v_ptr + v_off + idx, mask=mask, other=0.0)
        tl.store(v_ptr + v_off + idx, tl.where(nv > 0, v / div, 0.0), mask=mask)


@triton.jit
def _w_v_kernel(
    w_ptr,
    v_ptr,
    t_ptr,
    meta_ptr,
    tasks_ptr,
    partial_ptr,
    META: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    i = tl.load(tasks_ptr + 2 * k)
    r0 = tl.load(tasks_ptr + 2 * k + 1)
    w_off = tl.load(meta_ptr + META * i)
    u_off = tl.load(meta_ptr + META * i + 1)
    v_off = tl.load(meta_ptr + META * i + 2)
    m = tl.load(meta_ptr + META * i + 3)
    n = tl.load(meta_ptr + META * i + 4)
    rows = r0 + tl.arange(0, BLOCK_M)
    rmask = rows < m
    acc = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < n
        v = tl.load(v_ptr + v_off + cols, mask=cmask, other=0.0)
        w = tl.load(
            w_ptr + w_off + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(w * v[None, :], axis=1)
    tl.store(t_ptr + u_off + rows, acc, mask=rmask)
    tl.store(partial_ptr + k, tl.sum(acc * acc, axis=0))


@triton.jit
def _normalize_u_kernel(u_ptr, t_ptr, meta_ptr, partial_ptr, sigma_ptr, META: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    u_off = tl.load(meta_ptr + META * i + 1)
    m = tl.load(meta_ptr + META * i + 3)
    k0 = tl.load(meta_ptr + META * i + 7)
    k1 = tl.load(meta_ptr + META * i + 8)
    ss = tl.zeros([BLOCK], tl.float32)
    for s in range(k0, k1, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        ss += tl.load(partial_ptr + idx, mask=idx < k1, other=0.0)
    nt = tl.sqrt(tl.sum(ss, axis=0))
    tl.store(sigma_ptr + i, nt)
    div = tl.where(nt > 0, nt, 1.0)
    for s in range(0, m, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        mask = idx < m
        u = tl.load(u_ptr + u_off + idx, mask=mask, other=0.0)
        t = tl.load(t_ptr + u_off + idx, mask=mask, other=0.0)
        tl.store(u_ptr + u_off + idx, tl.where(nt > 0, t / div, u), mask=mask)


def _tables(weights: list[torch.Tensor]):
    meta, col, row = [], [], []
    w_off = u_off = v_off = 0
    for i, w in enumerate(weights):
        m, n = w.shape
        c0 = len(col) // 2
        for c in range(0, n, BLOCK_N):
            col += [i, c]
        r0 = len(row) // 2
        for r in range(0, m, BLOCK_M):
            row += [i, r]
        meta += [w_off, u_off, v_off, m, n, c0, len(col) // 2, r0, len(row) // 2, 0]
        w_off, u_off, v_off = w_off + m * n, u_off + m, v_off + n
    dev = weights[0].device
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)  # noqa: E731
    return as_t(meta), as_t(col), as_t(row), u_off, v_off


@triton_op("pyadvk::power_iteration_triton", mutates_args=())
def power_iteration_triton(
    weights: list[torch.Tensor], us: list[torch.Tensor], n_iters: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    meta, col, row, total_m, total_n = _tables(weights)
    dev = weights[0].device
    w = torch.cat([x.reshape(-1) for x in weights])
    u = torch.cat([x.reshape(-1) for x in us]).to(torch.float32)
    v = torch.zeros(total_n, device=dev, dtype=torch.float32)
    t = torch.empty(total_m, device=dev, dtype=torch.float32)
    n_col, n_row = col.numel() // 2, row.numel() // 2
    partial = torch.empty(max(n_col, n_row), device=dev, dtype=torch.float32)
    sigma = torch.zeros(len(weights), device=dev, dtype=torch.float32)
    for _ in range(n_iters):
        wrap_triton(_wt_u_kernel)[(n_col,)](w, u, v, meta, col, partial, META=_META, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        wrap_triton(_normalize_v_kernel)[(len(weights),)](v, meta, partial, META=_META, BLOCK=128)
        wrap_triton(_w_v_kernel)[(n_row,)](w, v, t, meta, row, partial, META=_META, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        wrap_triton(_normalize_u_kernel)[(len(weights),)](u, t, meta, partial, sigma, META=_META, BLOCK=128)
    rows = [x.shape[0] for x in weights]
    cols = [x.shape[1] for x in weights]
    return sigma, [x.clone() for x in u.split(rows)], [x.clone() for x in v.split(cols)]
