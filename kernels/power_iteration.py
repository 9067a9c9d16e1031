"""Triton body of the batched power iteration (pyadvk/ops/power_iteration.py defines it).

A kernel takes a fixed set of pointers, so the matrices are reached through an offset table: in
eager mode every weight is read where it lies, at its element offset from ``weights[0]`` (one
address space on a GPU, and in the interpreter's CPU memory); while the op is traced
(torch.compile, fake tensors) the weights are packed into one buffer instead, since a traced
graph cannot hold data pointers. u, v and W v live in packed float32 buffers. Per iteration, five
launches over all matrices at once:

1. ``Wᵀu`` tiles: one program per BLOCK_N columns × ROW_CHUNK rows of a matrix (split over rows,
   so the programs of a tall matrix run in parallel), each writing its share to ``vpart``;
2. one program per column block: ``v_raw`` = Σ of its tiles' shares (in order: deterministic) and
   its Σ v_raw² in float64;
3. one program per matrix: ``v = v_raw / ||v||`` divided in float64 (0 when ``||v|| = 0``, NaN when
   it is NaN or inf: a non-finite W or u);
4. one program per BLOCK_M rows: ``t = W v`` and its Σ t² in float64;
5. one program per matrix: ``σ = ||t||``, ``u = t / σ`` (u unchanged when σ is 0, NaN or inf).

The offset tables depend only on the weights' data pointers and shapes; in eager mode they are
built once per set of weights and kept on the device in a small LRU cache, copied from pinned
memory without a host sync, so a call with cached weights can be captured in a CUDA graph. Every
launch runs under the device context of the weights' device. Registered with
torch.library.triton_op.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

BLOCK_M = 16  # rows per row task (W v) and per step of a tile
BLOCK_N = 64  # columns per column task and tile
ROW_CHUNK = 64  # rows per tile of Wᵀu
BLOCK = 128  # elements per step of the per-matrix programs
CACHE_ENTRIES = 64
# Fields of a matrix's row in the meta table.
W_OFF, U_OFF, V_OFF, ROWS, COLS, COL0, COL1, ROW0, ROW1, PART, META = range(11)


@triton.jit
def _wt_u_tile_kernel(
    w_ptr,
    u_ptr,
    vpart_ptr,
    meta_ptr,
    col_ptr,
    tiles_ptr,
    META: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_CHUNK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    i = tl.load(tiles_ptr + 3 * k)
    task = tl.load(tiles_ptr + 3 * k + 1)
    chunk = tl.load(tiles_ptr + 3 * k + 2)
    w_off = tl.load(meta_ptr + META * i)
    u_off = tl.load(meta_ptr + META * i + 1)
    m = tl.load(meta_ptr + META * i + 3)
    n = tl.load(meta_ptr + META * i + 4)
    part = tl.load(meta_ptr + META * i + 9)
    cols = tl.load(col_ptr + 3 * task + 1) + tl.arange(0, BLOCK_N)
    cmask = cols < tl.load(col_ptr + 3 * task + 2)
    r0 = chunk * ROW_CHUNK
    acc = tl.zeros([BLOCK_N], tl.float32)
    for rr in range(0, ROW_CHUNK, BLOCK_M):
        rows = r0 + rr + tl.arange(0, BLOCK_M)
        rmask = rows < m
        u = tl.load(u_ptr + u_off + rows, mask=rmask, other=0.0)
        w = tl.load(
            w_ptr + w_off + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(w * u[:, None], axis=0)
    tl.store(vpart_ptr + part + chunk * n + cols, acc, mask=cmask)


@triton.jit
def _reduce_v_kernel(
    vpart_ptr, v_ptr, meta_ptr, col_ptr, partial_ptr, META: tl.constexpr, BLOCK_N: tl.constexpr, ROW_CHUNK: tl.constexpr
):
    k = tl.program_id(0).to(tl.int64)
    i = tl.load(col_ptr + 3 * k)
    v_off = tl.load(meta_ptr + META * i + 2)
    m = tl.load(meta_ptr + META * i + 3)
    n = tl.load(meta_ptr + META * i + 4)
    part = tl.load(meta_ptr + META * i + 9)
    cols = tl.load(col_ptr + 3 * k + 1) + tl.arange(0, BLOCK_N)
    cmask = cols < tl.load(col_ptr + 3 * k + 2)
    s = tl.zeros([BLOCK_N], tl.float32)
    for j in range(0, tl.cdiv(m, ROW_CHUNK)):
        s += tl.load(vpart_ptr + part + j * n + cols, mask=cmask, other=0.0)
    tl.store(v_ptr + v_off + cols, s, mask=cmask)
    s64 = s.to(tl.float64)
    tl.store(partial_ptr + k, tl.sum(s64 * s64, axis=0))


@triton.jit
def _normalize_v_kernel(v_ptr, meta_ptr, partial_ptr, META: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    v_off = tl.load(meta_ptr + META * i + 2)
    n = tl.load(meta_ptr + META * i + 4)
    k0 = tl.load(meta_ptr + META * i + 5)
    k1 = tl.load(meta_ptr + META * i + 6)
    ss = tl.zeros([BLOCK], tl.float64)
    for s in range(k0, k1, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        ss += tl.load(partial_ptr + idx, mask=idx < k1, other=0.0)
    nv = tl.sqrt(tl.sum(ss, axis=0))
    ok = (nv > 0) & (nv < float("inf"))  # False for NaN
    div = tl.where(ok, nv, 1.0)
    for s in range(0, n, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        mask = idx < n
        v = tl.load(v_ptr + v_off + idx, mask=mask, other=0.0)
        scaled = (v.to(tl.float64) / div).to(tl.float32)
        out = tl.where(ok, scaled, tl.where(nv == 0, 0.0, float("nan")))
        tl.store(v_ptr + v_off + idx, out, mask=mask)


@triton.jit
def _w_v_kernel(
    w_ptr,
    v_ptr,
    t_ptr,
    meta_ptr,
    row_ptr,
    partial_ptr,
    META: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    i = tl.load(row_ptr + 3 * k)
    rows = tl.load(row_ptr + 3 * k + 1) + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(row_ptr + 3 * k + 2)
    w_off = tl.load(meta_ptr + META * i)
    u_off = tl.load(meta_ptr + META * i + 1)
    v_off = tl.load(meta_ptr + META * i + 2)
    n = tl.load(meta_ptr + META * i + 4)
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
    acc64 = acc.to(tl.float64)
    tl.store(partial_ptr + k, tl.sum(acc64 * acc64, axis=0))


@triton.jit
def _normalize_u_kernel(u_ptr, t_ptr, meta_ptr, partial_ptr, sigma_ptr, META: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    u_off = tl.load(meta_ptr + META * i + 1)
    m = tl.load(meta_ptr + META * i + 3)
    k0 = tl.load(meta_ptr + META * i + 7)
    k1 = tl.load(meta_ptr + META * i + 8)
    ss = tl.zeros([BLOCK], tl.float64)
    for s in range(k0, k1, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        ss += tl.load(partial_ptr + idx, mask=idx < k1, other=0.0)
    nt = tl.sqrt(tl.sum(ss, axis=0))
    tl.store(sigma_ptr + i, nt.to(tl.float32))
    good = (nt > 0) & (nt < float("inf"))
    div = tl.where(good, nt, 1.0)
    for s in range(0, m, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        mask = idx < m
        u = tl.load(u_ptr + u_off + idx, mask=mask, other=0.0)
        t = tl.load(t_ptr + u_off + idx, mask=mask, other=0.0)
        tl.store(u_ptr + u_off + idx, tl.where(good, (t.to(tl.float64) / div).to(tl.float32), u), mask=mask)


class _Plan:
    """The offset tables of one set of weights, in one int64 tensor on their device."""

    def __init__(self, shapes: list[tuple[int, int]], w_offsets: list[int], device: torch.device, *, traced: bool):
        meta: list[int] = []
        col: list[int] = []
        row: list[int] = []
        tiles: list[int] = []
        u_total = v_total = part_total = 0
        for i, ((m, n), w_off) in enumerate(zip(shapes, w_offsets)):
            c0 = len(col) // 3
            for c in range(0, n, BLOCK_N):
                col += [i, c, min(n, c + BLOCK_N)]
            c1 = len(col) // 3
            chunks = -(-m // ROW_CHUNK)
            for task in range(c0, c1):
                for j in range(chunks):
                    tiles += [i, task, j]
            r0 = len(row) // 3
            for r in range(0, m, BLOCK_M):
                row += [i, r, min(m, r + BLOCK_M)]
            meta += [w_off, u_total, v_total, m, n, c0, c1, r0, len(row) // 3, part_total]
            u_total, v_total, part_total = u_total + m, v_total + n, part_total + n * chunks
        self.n_col, self.n_row, self.n_tiles = len(col) // 3, len(row) // 3, len(tiles) // 3
        self.u_total, self.v_total, self.part_total = u_total, v_total, part_total
        data = meta + col + row + tiles
        if device.type == "cuda" and not traced:  # pinned memory, non-blocking copy: no host sync
            table = torch.empty(len(data), dtype=torch.int64, device=device)
            table.copy_(torch.tensor(data, dtype=torch.int64).pin_memory(), non_blocking=True)
        else:  # (traced: a constant of the graph)
            table = torch.tensor(data, dtype=torch.int64, device=device)
        ends = [len(meta), len(meta) + len(col), len(meta) + len(col) + len(row)]
        self.meta, self.col, self.row, self.tiles = table.tensor_split(ends)


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()


def _traced(weights: list[torch.Tensor]) -> bool:
    """Whether the op is being traced (fake or functional tensors, torch.compile): no data pointers."""
    return torch.compiler.is_compiling() or any(is_fake(w) or type(w) is not torch.Tensor for w in weights)


def _eager_plan(weights: list[torch.Tensor]) -> _Plan | None:
    """The cached plan of real weights, read in place at offsets from weights[0] (None when an
    offset is not a whole number of elements: the caller packs them instead)."""
    size = weights[0].element_size()
    base = weights[0].data_ptr()
    if any((w.data_ptr() - base) % size for w in weights):
        return None
    dev = weights[0].device
    key = (dev, weights[0].dtype, tuple((w.data_ptr(), *w.shape) for w in weights))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"power_iteration_packed_triton: these weights ({len(weights)} matrices) have no device plan yet, and "
            "building one copies a table to the device, which cannot happen during CUDA graph capture: call it "
            "once with the same weights before capturing"
        )
    shapes = [(w.shape[0], w.shape[1]) for w in weights]
    plan = _Plan(shapes, [(w.data_ptr() - base) // size for w in weights], dev, traced=False)
    _PLANS[key] = plan
    if len(_PLANS) > CACHE_ENTRIES:
        _PLANS.popitem(last=False)
    return plan


def _device_context(device: torch.device):
    """The context the launches run in: the tensor's CUDA device (a tensor on cuda:1 must not be
    launched on the current device), nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton_op("pyadvk::power_iteration_packed_triton", mutates_args=())
def power_iteration_packed_triton(
    weights: list[torch.Tensor], u: torch.Tensor, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = weights[0].device
    traced = _traced(weights)
    plan = None if traced else _eager_plan(weights)
    if plan is None:  # traced, or misaligned weights: one packed buffer
        w = torch.cat([x.reshape(-1) for x in weights])
        offsets = [0]
        for x in weights[:-1]:
            offsets.append(offsets[-1] + x.numel())
        plan = _Plan([(x.shape[0], x.shape[1]) for x in weights], offsets, dev, traced=traced)
    else:
        w = weights[0]
    with _device_context(dev):
        u_out = u.clone()
        v = torch.empty(plan.v_total, device=dev, dtype=torch.float32)
        t = torch.empty(max(plan.u_total, 1), device=dev, dtype=torch.float32)
        vpart = torch.empty(max(plan.part_total, 1), device=dev, dtype=torch.float32)
        partial = torch.empty(max(plan.n_col, plan.n_row, 1), device=dev, dtype=torch.float64)
        sigma = torch.empty(len(weights), device=dev, dtype=torch.float32)
        n = len(weights)
        for _ in range(n_iters):
            # (no launch of an empty grid: matrices without columns or rows have no such tasks)
            if plan.n_tiles:
                wrap_triton(_wt_u_tile_kernel)[(plan.n_tiles,)](
                    w, u_out, vpart, plan.meta, plan.col, plan.tiles, META=META, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                    ROW_CHUNK=ROW_CHUNK,
                )  # fmt: skip
            if plan.n_col:
                wrap_triton(_reduce_v_kernel)[(plan.n_col,)](
                    vpart, v, plan.meta, plan.col, partial, META=META, BLOCK_N=BLOCK_N, ROW_CHUNK=ROW_CHUNK
                )
            wrap_triton(_normalize_v_kernel)[(n,)](v, plan.meta, partial, META=META, BLOCK=BLOCK)
            if plan.n_row:
                wrap_triton(_w_v_kernel)[(plan.n_row,)](
                    w, v, t, plan.meta, plan.row, partial, META=META, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N
                )
            wrap_triton(_normalize_u_kernel)[(n,)](u_out, t, plan.meta, partial, sigma, META=META, BLOCK=BLOCK)
    return sigma, u_out, v


__all__ = ["power_iteration_packed_triton"]
