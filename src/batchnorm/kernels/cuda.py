"""Triton kernels for CUDA tensors: fp32/fp16/bf16, NCHW and channels-last, fused epilogues.

The same functions, signatures and semantics as `native` (stats, forward, train_forward, backward);
`kernels.implementation` sends CUDA tensors here when triton imports and `supports(x)` holds.
Statistics and sums accumulate in fp32; outputs keep the input's dtype and memory format.

Layouts. Every tensor an op touches is brought to one of two dense layouts (a copy only when the
caller hands in another one, e.g. a dy whose strides differ from x's):
  NCHW  contiguous with spatial size S > 1: channel c of sample n is the run x[(n*C + c)*S :][:S];
        a tile is BLOCK_R samples x BLOCK_K positions of ONE channel, loads coalesced along S.
  NHWC  channels-last, and every (N, C) input: an (M, C) row-major matrix, M = N*S; a tile is
        BLOCK_R rows x BLOCK_K channels, loads coalesced along C.
Paths. When a channel's M values fit in one tile (`FUSED_MAX`), one program per channel (group)
does the whole op while the values sit in registers: the training forward reads x once and writes
y once; the backward reads dy and x once and writes dx once. Otherwise an op splits into a
reduction (each program walks a contiguous run of tiles and leaves one partial per channel:
Chan-merged (count, mean, m2) for the statistics, sums of g and g*x_hat for the backward), a
per-channel merge, and an elementwise pass. Kernel boundaries are the only synchronization: no
grid-wide barriers, no atomics, so results are deterministic.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor


# Elements per tile in the split path: 16 KiB of fp32 per load, 16 values per thread at 8 warps.
TILE = 4096
# Largest tile (elements) the one-program-per-channel path holds in registers.
FUSED_MAX = 8192
# Reduction programs per SM: enough resident programs to hide memory latency, few enough that the
# (programs x C) partials stay a small fraction of the tensor.
PROGRAMS_PER_SM = 4
# Reduction programs on a non-CUDA device (Triton's CPU interpreter in the tests): few, so each one
# walks several tiles, as it does on a GPU with a large input.
INTERPRETER_PROGRAMS = 3
# NHWC tiles keep at least this many channels per row (64 B of bf16, 2 sectors of fp32) so
# loads stay coalesced, and at most NHWC_BLOCK_C so there are enough programs.
NHWC_MIN_C = 16
NHWC_BLOCK_C = 64
# The merge of the statistics partials reads MERGE_BLOCK_P programs x MERGE_BLOCK_C channels a step.
MERGE_BLOCK_P = 32
MERGE_BLOCK_C = 64

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# kernels.ACTIVATIONS -> the ACT constexpr the kernels branch on
_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu_tanh": 4}

# ---- device helpers (inlined into the kernels) -----------------------------------------------


@triton.jit
def _tile(tile, group, N, C, S, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
          CHANNELS_LAST: tl.constexpr):
    """Offsets (BLOCK_R, BLOCK_K) int64, their mask, and the tile's channels with their mask:
    a (BLOCK_K,) vector in NHWC, the scalar `group` in NCHW."""
    if CHANNELS_LAST:
        # x[m, c] at m*C + c, m = n*S + s < M = N*S; `tile` walks m, `group` walks channel blocks.
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        chans = group * BLOCK_K + tl.arange(0, BLOCK_K)
        offs = rows.to(tl.int64)[:, None] * C + chans[None, :]
        mask = (rows < N * S)[:, None] & (chans < C)[None, :]
        return offs, mask, chans, chans < C
    else:
        # x[n, c, s] at (n*C + c)*S + s; `tile` walks a (samples, positions) grid of channel
        # `group`.
        tiles_k = tl.cdiv(S, BLOCK_K)
        rows = (tile // tiles_k) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs = (rows.to(tl.int64)[:, None] * C + group) * S + cols[None, :]
        mask = (rows < N)[:, None] & (cols < S)[None, :]
        return offs, mask, group, group < C


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al. 1979: merge two (count, mean, m2) partials.
    d = mean_b - mean_a, n = n_a + n_b, mean = mean_a + d n_b/n, m2 = m2_a + m2_b + d^2 n_a n_b/n.
    """
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _scale_shift(mean, invstd, w_ptr, b_ptr, chans, cmask, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr):
    """y = a*x + b folds normalization and affine: a = weight*invstd, b = bias - mean*a."""
    a = invstd
    if HAS_W:
        a = a * tl.load(w_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    b = -mean * a
    if HAS_B:
        b = b + tl.load(b_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _tanh(u):
    # tanh(u) = 2 sigmoid(2u) - 1: core Triton has sigmoid on every backend and the interpreter.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _activate(pre, act_param, ACT: tl.constexpr):
    """act(pre) for the codes of `_ACT_CODES`; NaN stays NaN (a NaN batch must show in y)."""
    if ACT == 1:
        return tl.where(pre < 0.0, 0.0, pre)
    elif ACT == 2:
        return tl.where(pre < 0.0, pre * act_param, pre)
    elif ACT == 3:
        return pre * tl.sigmoid(pre)
    elif ACT == 4:
        k = 0.7978845608028654  # sqrt(2/pi)
        return 0.5 * pre * (1.0 + _tanh(k * (pre + 0.044715 * pre * pre * pre)))
    else:
        return pre


@triton.jit
def _activation_grad(dy, pre, y, act_param, ACT: tl.constexpr):
    """g = dy * act'(pre). relu and leaky_relu read the sign from y; silu and gelu_tanh use pre."""
    if ACT == 1:
        return tl.where(y > 0.0, dy, 0.0)
    elif ACT == 2:
        return tl.where(y > 0.0, dy, dy * act_param)
    elif ACT == 3:
        s = tl.sigmoid(pre)
        return dy * s * (1.0 + pre * (1.0 - s))
    elif ACT == 4:
        k = 0.7978845608028654  # sqrt(2/pi)
        t = _tanh(k * (pre + 0.044715 * pre * pre * pre))
        d_inner = k * (1.0 + 3.0 * 0.044715 * pre * pre)
        return dy * (0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * d_inner)
    else:
        return dy


@triton.jit
def _grad_tile(dy_ptr, x_ptr, y_ptr, z_ptr, offs, mask, mean, invstd, a, b, act_param,
               CHANNELS_LAST: tl.constexpr, HAS_Z: tl.constexpr, ACT: tl.constexpr):
    """g = dy * act'(pre) and x_hat = (x - mean) * invstd on one tile, fp32; 0 where masked."""
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean) * invstd
    pre = x  # only silu and gelu_tanh read pre; relu and leaky_relu read y
    y = x
    if ACT == 1 or ACT == 2:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 3 or ACT == 4:
        pre = x * a + b
        if HAS_Z:
            pre += tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return _activation_grad(dy, pre, y, act_param, ACT), x_hat


# ---- kernels -----------------------------------------------------------------------------------


@triton.jit
def _stats_partial_kernel(
    x_ptr,                  # (N, C, S) NCHW or (M, C) NHWC, fp32/fp16/bf16
    pcount_ptr,             # (P, C) fp32 out: values seen by program p in channel c
    pmean_ptr,              # (P, C) fp32 out: their mean
    pm2_ptr,                # (P, C) fp32 out: their sum of squared deviations from it
    N, C, S,                # sizes; M = N*S values per channel
    tiles, tiles_per_program,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    REDUCE_AXIS: tl.constexpr,
):
    # Program (p, group) walks tiles [p*T, (p+1)*T), T = tiles_per_program: per tile the
    # two-pass (count, mean, m2) of its values in registers, folded into the running partial
    # with Chan's merge.
    p = tl.program_id(0)
    group = tl.program_id(1)
    n_a = tl.sum(tl.zeros((BLOCK_R, BLOCK_K), tl.float32), axis=REDUCE_AXIS)  # 0 per channel
    mean_a = n_a
    m2_a = n_a
    # the channels this program stores; offs and mask are reassigned per tile in the loop
    offs, mask, chans, cmask = _tile(0, group, N, C, S, BLOCK_R, BLOCK_K, CHANNELS_LAST)
    for t in range(p * tiles_per_program, tl.minimum((p + 1) * tiles_per_program, tiles)):
        offs, mask, chans, cmask = _tile(t, group, N, C, S, BLOCK_R, BLOCK_K, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum(mask.to(tl.float32), axis=REDUCE_AXIS)
        mean_b = tl.sum(x, axis=REDUCE_AXIS) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - mean_b, 0.0)
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, n_b, mean_b,
                                        tl.sum(d * d, axis=REDUCE_AXIS))
    tl.store(pcount_ptr + p * C + chans, n_a, mask=cmask)
    tl.store(pmean_ptr + p * C + chans, mean_a, mask=cmask)
    tl.store(pm2_ptr + p * C + chans, m2_a, mask=cmask)


@triton.jit
def _stats_merge_kernel(
    pcount_ptr, pmean_ptr, pm2_ptr,     # (P, C) fp32: the partials of _stats_partial_kernel
    count_ptr, mean_ptr, m2_ptr,        # (C,) fp32 out
    invstd_ptr,                         # (C,) fp32 out, 1/sqrt(m2/count + eps), if WRITE_INVSTD
    P, C, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_INVSTD: tl.constexpr,
):
    # A block of BLOCK_P partials merges at once (mean = sum n_k mean_k / n,
    # m2 = sum m2_k + sum n_k (mean_k - mean)^2), then into the running result with Chan's merge.
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    n_a = tl.zeros((BLOCK_C,), tl.float32)
    mean_a = n_a
    m2_a = n_a
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        offs = rows[:, None] * C + chans[None, :]
        mask = (rows < P)[:, None] & cmask[None, :]
        n_k = tl.load(pcount_ptr + offs, mask=mask, other=0.0)
        mean_k = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        m2_k = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        n_b = tl.sum(n_k, axis=0)
        mean_b = tl.sum(n_k * mean_k, axis=0) / tl.maximum(n_b, 1.0)
        spread = n_k * (mean_k - mean_b[None, :]) * (mean_k - mean_b[None, :])
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, n_b, mean_b,
                                        tl.sum(m2_k, axis=0) + tl.sum(spread, axis=0))
    tl.store(count_ptr + chans, n_a, mask=cmask)
    tl.store(mean_ptr + chans, mean_a, mask=cmask)
    tl.store(m2_ptr + chans, m2_a, mask=cmask)
    if WRITE_INVSTD:
        tl.store(invstd_ptr + chans, tl.rsqrt(m2_a / tl.maximum(n_a, 1.0) + eps), mask=cmask)


@triton.jit
def _normalize_kernel(
    x_ptr,                  # (N, C, S) NCHW or (M, C) NHWC
    mean_ptr, invstd_ptr,   # (C,): read; written (with count, m2) when STATS_IN_PROGRAM
    count_ptr, m2_ptr,      # (C,) fp32 out when STATS_IN_PROGRAM
    w_ptr, b_ptr,           # (C,) weight, bias, if HAS_W / HAS_B
    z_ptr,                  # like x: residual added before the activation, if HAS_Z
    y_ptr,                  # like x, x's dtype out, if WRITE_Y
    N, C, S, eps, act_param,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    REDUCE_AXIS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr, ACT: tl.constexpr,
    STATS_IN_PROGRAM: tl.constexpr, WRITE_Y: tl.constexpr,
):
    # y = act(a*x + b (+ z)), a = weight*invstd, b = bias - mean*a.
    # STATS_IN_PROGRAM: the tile holds whole channels (grid (1, groups)); mean and m2 are the
    # two-pass statistics of the tile, invstd = 1/sqrt(m2/M + eps), so x is read once.
    offs, mask, chans, cmask = _tile(tl.program_id(0), tl.program_id(1), N, C, S, BLOCK_R,
                                     BLOCK_K, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if STATS_IN_PROGRAM:
        # count is 0 only in the padding channels of an NHWC tile, which are never stored.
        count = tl.sum(mask.to(tl.float32), axis=REDUCE_AXIS)
        mean = tl.sum(x, axis=REDUCE_AXIS) / tl.maximum(count, 1.0)
        d = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(d * d, axis=REDUCE_AXIS)
        tl.store(count_ptr + chans, count, mask=cmask)
        tl.store(mean_ptr + chans, mean, mask=cmask)
        tl.store(m2_ptr + chans, m2, mask=cmask)
        invstd = tl.rsqrt(m2 / tl.maximum(count, 1.0) + eps)
        if WRITE_Y:
            tl.store(invstd_ptr + chans, invstd, mask=cmask)
    else:
        mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
        invstd = tl.load(invstd_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    if WRITE_Y:
        a, b = _scale_shift(mean, invstd, w_ptr, b_ptr, chans, cmask, HAS_W, HAS_B)
        pre = x * a + b
        if HAS_Z:
            pre += tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _activate(pre, act_param, ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_partial_kernel(
    dy_ptr, x_ptr,          # like x: upstream gradient and input
    y_ptr,                  # like x: forward output, read for relu / leaky_relu
    z_ptr,                  # like x: residual, read for silu / gelu_tanh if HAS_Z
    mean_ptr, invstd_ptr,   # (C,) statistics the forward normalized with
    w_ptr, b_ptr,           # (C,) weight, bias, if HAS_W / HAS_B
    psum_g_ptr,             # (P, C) fp32 out: sum of g over program p's tiles
    psum_gxhat_ptr,         # (P, C) fp32 out: sum of g * x_hat
    N, C, S, act_param, tiles, tiles_per_program,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    REDUCE_AXIS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr, ACT: tl.constexpr,
):
    # g = dy * act'(pre), x_hat = (x - mean) * invstd; partial sums of g and g*x_hat per channel.
    p = tl.program_id(0)
    group = tl.program_id(1)
    # the channels this program stores; offs and mask are reassigned per tile in the loop
    offs, mask, chans, cmask = _tile(0, group, N, C, S, BLOCK_R, BLOCK_K, CHANNELS_LAST)
    mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    a, b = _scale_shift(mean, invstd, w_ptr, b_ptr, chans, cmask, HAS_W, HAS_B)
    sum_g = tl.sum(tl.zeros((BLOCK_R, BLOCK_K), tl.float32), axis=REDUCE_AXIS)  # 0 per channel
    sum_gxhat = sum_g
    for t in range(p * tiles_per_program, tl.minimum((p + 1) * tiles_per_program, tiles)):
        offs, mask, chans, cmask = _tile(t, group, N, C, S, BLOCK_R, BLOCK_K, CHANNELS_LAST)
        g, x_hat = _grad_tile(dy_ptr, x_ptr, y_ptr, z_ptr, offs, mask, mean, invstd, a, b,
                              act_param, CHANNELS_LAST, HAS_Z, ACT)
        sum_g += tl.sum(g, axis=REDUCE_AXIS)
        sum_gxhat += tl.sum(g * x_hat, axis=REDUCE_AXIS)
    tl.store(psum_g_ptr + p * C + chans, sum_g, mask=cmask)
    tl.store(psum_gxhat_ptr + p * C + chans, sum_gxhat, mask=cmask)


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, y_ptr, z_ptr,    # like x (see _backward_partial_kernel)
    mean_ptr, invstd_ptr,           # (C,)
    w_ptr, b_ptr,                   # (C,) weight, bias, if HAS_W / HAS_B
    sum_g_ptr, sum_gxhat_ptr,       # (C,) fp32: read; written when SUMS_IN_PROGRAM
    count_ptr,                      # (C,) M per channel, if HAS_COUNT (else M = N*S)
    dx_ptr,                         # like x, x's dtype out, if WRITE_DX
    dz_ptr,                         # like x, z's dtype out: dz = g, if WRITE_DZ
    N, C, S, act_param,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    REDUCE_AXIS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr, ACT: tl.constexpr,
    TRAINING: tl.constexpr, HAS_COUNT: tl.constexpr, SUMS_IN_PROGRAM: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
):
    # training: dx = a/M * (M g - sum(g) - x_hat * sum(g x_hat)),  eval: dx = a g,  a = w*invstd.
    # SUMS_IN_PROGRAM: the tile holds whole channels (grid (1, groups)), so the sums come from the
    # tile itself and dy, x are read once.
    offs, mask, chans, cmask = _tile(tl.program_id(0), tl.program_id(1), N, C, S, BLOCK_R,
                                     BLOCK_K, CHANNELS_LAST)
    mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    a, b = _scale_shift(mean, invstd, w_ptr, b_ptr, chans, cmask, HAS_W, HAS_B)
    g, x_hat = _grad_tile(dy_ptr, x_ptr, y_ptr, z_ptr, offs, mask, mean, invstd, a, b, act_param,
                          CHANNELS_LAST, HAS_Z, ACT)
    if WRITE_DZ:
        tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
    if SUMS_IN_PROGRAM:
        sum_g = tl.sum(g, axis=REDUCE_AXIS)
        sum_gxhat = tl.sum(g * x_hat, axis=REDUCE_AXIS)
        tl.store(sum_g_ptr + chans, sum_g, mask=cmask)
        tl.store(sum_gxhat_ptr + chans, sum_gxhat, mask=cmask)
    else:
        sum_g = tl.load(sum_g_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
        sum_gxhat = tl.load(sum_gxhat_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    if WRITE_DX:
        if TRAINING:
            if HAS_COUNT:
                m = tl.load(count_ptr + chans, mask=cmask, other=1.0).to(tl.float32)
            else:
                m = N * S * 1.0  # M as fp32
            dx = a * (g - sum_g / m
                                             - x_hat * sum_gxhat / m)
        else:
            dx = a * g
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- host side: layouts, tilings, launches ------------------------------------------------------


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_nhwc(x: Tensor) -> bool:
    """Whether x is (M, C) row-major: channels-last, or spatial size 1 ((N, C), (N, C, 1, 1))."""
    return x.movedim(1, -1).is_contiguous()


def _layout(x: Tensor) -> tuple[bool, bool]:
    """(channels_last, needs_copy) for x: contiguous with spatial > 1 is NCHW; any other dense
    layout is NHWC; anything else is copied to contiguous (which is NCHW unless spatial is 1)."""
    spatial = x.numel() // (x.shape[0] * x.shape[1])
    if spatial > 1 and x.is_contiguous():
        return False, False
    if _is_nhwc(x):
        return True, False
    return spatial == 1, True


def _to_layout(t: Tensor, channels_last: bool) -> Tensor:
    """t in the layout the kernels read: a copy only if it is not already there."""
    if channels_last:
        return t if _is_nhwc(t) else t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


class _Tiling:
    """How a launch covers one tensor: tiles of (block_r, block_k), grid axis 0 over `tiles` along
    the reduced dimension(s), axis 1 over `groups` of channels (C in NCHW, blocks of block_k in
    NHWC)."""

    def __init__(self, n: int, c: int, s: int, channels_last: bool, block_r: int, block_k: int):
        self.block_r, self.block_k = block_r, block_k
        if channels_last:
            self.tiles, self.groups = _cdiv(n * s, block_r), _cdiv(c, block_k)
        else:
            self.tiles, self.groups = _cdiv(n, block_r) * _cdiv(s, block_k), c
        # ~16 values per thread; small tiles (tiny tensors) get fewer warps, not idle lanes.
        self.num_warps = min(16, max(1, block_r * block_k // 512))


def _row_block(s: int) -> int:
    """NCHW tile width: the power of two in [32, 1024] (at most TILE) that wastes the fewest lanes
    on a row of S positions (S = 49 -> 64, 196 -> 32, 3136 -> 64); ties go to the wider."""
    widest = min(_pow2(s), 1024, TILE)
    candidates = [b for b in (32, 64, 128, 256, 512, 1024) if b <= widest] or [widest]
    return min(candidates, key=lambda b: (_cdiv(s, b) * b, -b))


class _Plan:
    """Layout and tilings of one (N, C, *spatial) tensor: `split` for the elementwise and reduction
    kernels, `fused` (or None) when every channel fits in one tile."""

    def __init__(self, x: Tensor, channels_last: bool):
        self.channels_last = channels_last
        self.n, self.c = x.shape[0], x.shape[1]
        self.s = x.numel() // (self.n * self.c)
        n, c, s, m = self.n, self.c, self.s, self.n * self.s
        if channels_last:
            block_c = min(_pow2(c), NHWC_BLOCK_C)
            self.split = _Tiling(n, c, s, True, min(_pow2(m), max(1, TILE // block_c)), block_c)
            narrowest = min(_pow2(c), NHWC_MIN_C)
            fits = _pow2(m) * narrowest <= FUSED_MAX
            block_c = min(max(FUSED_MAX // _pow2(m), narrowest), block_c) if fits else 0
            self.fused = _Tiling(n, c, s, True, _pow2(m), block_c) if fits else None
        else:
            block_s = _row_block(s)
            self.split = _Tiling(n, c, s, False, min(_pow2(n), max(1, TILE // block_s)), block_s)
            fits = _pow2(n) * _pow2(s) <= FUSED_MAX
            self.fused = _Tiling(n, c, s, False, _pow2(n), _pow2(s)) if fits else None

    def sizes(self) -> tuple[int, int, int]:
        return self.n, self.c, self.s

    def layout(self) -> dict:
        """The layout constants: a per-channel sum is over the rows of an NHWC tile (axis 0) and
        over the whole tile in NCHW (axis None), where a tile holds one channel."""
        return dict(CHANNELS_LAST=self.channels_last, REDUCE_AXIS=0 if self.channels_last else None)

    def reduction_grid(self, device: torch.device) -> tuple[int, int, int]:
        """(programs, groups, tiles_per_program) for a split reduction: about `_programs(device)`
        programs in all, each walking a contiguous run of tiles, none empty."""
        t = self.split
        per = _cdiv(t.tiles, max(1, min(t.tiles, _cdiv(_programs(device), t.groups))))
        return _cdiv(t.tiles, per), t.groups, per


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _flags(weight: Tensor | None, bias: Tensor | None, z: Tensor | None, act: str) -> dict:
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_Z=z is not None,
                ACT=_ACT_CODES[act])


def _split_stats(x: Tensor, plan: _Plan, eps: float | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(count, mean, m2, invstd or None) through per-program partials and a Chan merge."""
    programs, groups, per = plan.reduction_grid(x.device)
    t = plan.split
    partials = torch.empty((3, programs, plan.c), device=x.device, dtype=torch.float32)
    _stats_partial_kernel[(programs, groups)](
        x, partials[0], partials[1], partials[2], *plan.sizes(), t.tiles, per,
        BLOCK_R=t.block_r, BLOCK_K=t.block_k, **plan.layout(), num_warps=t.num_warps)
    out = torch.empty((4, plan.c), device=x.device, dtype=torch.float32)
    _stats_merge_kernel[(_cdiv(plan.c, MERGE_BLOCK_C),)](
        partials[0], partials[1], partials[2], out[0], out[1], out[2], out[3], programs, plan.c,
        0.0 if eps is None else eps, BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C,
        WRITE_INVSTD=eps is not None)
    return out[0], out[1], out[2], (out[3] if eps is not None else None)


def _normalize(x: Tensor, plan: _Plan, tiling: _Tiling, mean: Tensor, invstd: Tensor,
               count: Tensor, m2: Tensor, weight: Tensor | None, bias: Tensor | None,
               z: Tensor | None, eps: float, act: str, act_param: float, stats_in_program: bool,
               write_y: bool) -> Tensor | None:
    y = torch.empty_like(x) if write_y else None
    z = _to_layout(z, plan.channels_last) if z is not None else None
    grid = (1 if stats_in_program else tiling.tiles, tiling.groups)
    _normalize_kernel[grid](
        x, mean, invstd, count, m2, weight if weight is not None else mean,
        bias if bias is not None else mean, z if z is not None else x, y if write_y else x,
        *plan.sizes(), eps, act_param, BLOCK_R=tiling.block_r, BLOCK_K=tiling.block_k,
        **plan.layout(), **_flags(weight, bias, z, act),
        STATS_IN_PROGRAM=stats_in_program, WRITE_Y=write_y, num_warps=tiling.num_warps)
    return y


def _launch_backward(grid, t: _Tiling, dy, x, mean, invstd, sum_g, sum_gxhat, count, dx, dz,
                     plan: _Plan, act_param: float, training: bool, has_count: bool,
                     sums_in_program: bool, write_dx: bool, write_dz: bool, pointers: dict,
                     constants: dict) -> None:
    _backward_kernel[grid](
        dy, x, pointers["y_ptr"], pointers["z_ptr"], mean, invstd, pointers["w_ptr"],
        pointers["b_ptr"], sum_g, sum_gxhat, count, dx if write_dx else x,
        dz if write_dz else x, *plan.sizes(), act_param, BLOCK_R=t.block_r, BLOCK_K=t.block_k,
        **constants, TRAINING=training, HAS_COUNT=has_count, SUMS_IN_PROGRAM=sums_in_program,
        WRITE_DX=write_dx, WRITE_DZ=write_dz, num_warps=t.num_warps)


def _acc(v: Tensor, like: Tensor) -> Tensor:
    """Reductions are returned in the statistics' dtype, as `native.backward` returns them."""
    return v.to(like.dtype)


def _like(dz: Tensor, z: Tensor | None) -> Tensor:
    """dz in z's memory format (what the op's fake implementation promises); the kernels write it
    in x's, so a z in another layout costs a copy."""
    if z is None or dz.stride() == z.stride():
        return dz
    return torch.empty_like(z).copy_(dz)


def _prepare(x: Tensor) -> tuple[Tensor, _Plan]:
    channels_last, copy = _layout(x)
    if copy:
        x = x.contiguous()
    return x, _Plan(x, channels_last)


# ---- dispatch: which CUDA tensors take this path ------------------------------------------------

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "kernels-cuda.json"


def path_key(x: Tensor) -> tuple[str, str, str]:
    """The benchmark class of x: (layout "nchw"/"nhwc", dtype name, path "fused"/"split")."""
    channels_last, _ = _layout(x)
    plan = _Plan(x, channels_last)
    return ("nhwc" if channels_last else "nchw", str(x.dtype).removeprefix("torch."),
            "split" if plan.fused is None else "fused")


def load_wins(path: Path = RESULTS) -> frozenset[tuple[str, str, str]]:
    """The classes (`path_key`) the dispatch sends here: those whose median speedup over eager
    PyTorch, across the training cases `benchmarks/kernels_cuda.py` measured for them (train fwd,
    fwd+bwd, BN+ReLU fwd+bwd), is at least 1. No results file (the kernels have not run on a GPU
    yet): none, and CUDA runs torch's kernels unless `use_backend("triton")` asks for these."""
    if not path.exists():
        return frozenset()
    speedups = defaultdict(list)
    for case in json.loads(path.read_text())["cases"]:
        speedups[tuple(case["class"])].append(case["speedup"])
    return frozenset(key for key, values in speedups.items() if statistics.median(values) >= 1.0)


WINS = load_wins()


def supports(x: Tensor) -> bool:
    """Whether the Triton path takes x: fp32/fp16/bf16, non-empty, at most 65535 channels (a grid
    axis limit) with fewer than 2^31 values each (int32 row indices)."""
    return (x.dtype in DTYPES and x.numel() > 0 and x.shape[1] <= 65535
            and x.numel() // x.shape[1] < 2**31)


# ---- the functions `implementation()` dispatches to (same contract as `native`) -----------------


def stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of a non-empty (N, C, *spatial) tensor, fp32.

    Each tile's statistics are two-pass in registers (exact up to fp32 rounding whatever the mean),
    and tiles merge with Chan's formula, so |mean| >> std costs no precision.
    """
    x, plan = _prepare(x)
    if plan.fused is None:
        count, mean, m2, _ = _split_stats(x, plan, None)
        return count, mean, m2
    out = torch.empty((3, plan.c), device=x.device, dtype=torch.float32)
    # no y: the kernel stores count, mean and m2 only (mean also fills the unread invstd slot)
    _normalize(x, plan, plan.fused, out[1], out[1], out[0], out[2], None, None, None, 0.0,
               "identity", 0.0, stats_in_program=True, write_y=False)
    return out[0], out[1], out[2]


def forward(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
            z: Tensor | None, act: str, act_param: float) -> Tensor:
    """y = act(a*x + b (+ z)) with given statistics (eval, or after `stats`), in x's dtype."""
    x, plan = _prepare(x)
    # statistics are read, not computed: mean fills the unread count and m2 slots
    return _normalize(x, plan, plan.split, mean, invstd, mean, mean, weight, bias, z, 0.0, act,
                      act_param, stats_in_program=False, write_y=True)


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor | None,
                  eps: float, act: str, act_param: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics and normalization; returns (y, count, mean, m2, invstd). One kernel that reads
    x once when channels fit in a tile; else partials, merge, normalize."""
    x, plan = _prepare(x)
    if plan.fused is not None:
        out = torch.empty((4, plan.c), device=x.device, dtype=torch.float32)
        count, mean, m2, invstd = out
        y = _normalize(x, plan, plan.fused, mean, invstd, count, m2, weight, bias, z, eps, act,
                       act_param, stats_in_program=True, write_y=True)
        return y, count, mean, m2, invstd
    count, mean, m2, invstd = _split_stats(x, plan, eps)
    y = _normalize(x, plan, plan.split, mean, invstd, count, m2, weight, bias, z, eps, act,
                   act_param, stats_in_program=False, write_y=True)
    return y, count, mean, m2, invstd


def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
             bias: Tensor | None, z: Tensor | None, y: Tensor | None, act: str, act_param: float,
             training: bool, count: Tensor | None, sum_dy: Tensor | None,
             sum_dy_xhat: Tensor | None, input_grad: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form backward, (dx, dweight, dbias, dz); the formulas are `native.backward`'s.

    With no reductions or count passed in and channels that fit in a tile, one kernel computes the
    sums and dx (dy and x read once). Otherwise: per-program partial sums, their sum over programs,
    then the elementwise dx (and dz when an activation sits between z and the output).
    """
    x, plan = _prepare(x)
    cl = plan.channels_last
    dy = _to_layout(dy, cl)
    y = _to_layout(y, cl) if act in ("relu", "leaky_relu") else None
    z_read = _to_layout(z, cl) if z is not None and act in ("silu", "gelu_tanh") else None
    # dz = g = dy * act'(pre); with no activation that is dy itself, no pass needed.
    write_dz = z is not None and act != "identity"
    dz = torch.empty_like(x, dtype=z.dtype) if write_dz else x.new_empty(0)
    if z is not None and not write_dz:
        dz = dy.to(z.dtype)
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    pointers = dict(y_ptr=y if y is not None else x, z_ptr=z_read if z_read is not None else x,
                    w_ptr=weight if weight is not None else mean,
                    b_ptr=bias if bias is not None else mean)
    constants = dict(**plan.layout(), **_flags(weight, bias, z_read, act))
    elementwise = input_grad or write_dz
    local_only = sum_dy is None and sum_dy_xhat is None and count is None
    if plan.fused is not None and local_only:
        sums = torch.empty((2, plan.c), device=x.device, dtype=torch.float32)
        t = plan.fused
        _launch_backward((1, t.groups), t, dy, x, mean, invstd, sums[0], sums[1], mean, dx, dz,
                         plan, act_param, training, False, True, input_grad, write_dz, pointers,
                         constants)
        return dx, _acc(sums[1], invstd), _acc(sums[0], invstd), _like(dz, z)
    if sum_dy is None or sum_dy_xhat is None:
        programs, groups, per = plan.reduction_grid(x.device)
        t = plan.split
        partials = torch.empty((2, programs, plan.c), device=x.device, dtype=torch.float32)
        _backward_partial_kernel[(programs, groups)](
            dy, x, pointers["y_ptr"], pointers["z_ptr"], mean, invstd, pointers["w_ptr"],
            pointers["b_ptr"], partials[0], partials[1], *plan.sizes(), act_param, t.tiles, per,
            BLOCK_R=t.block_r, BLOCK_K=t.block_k, **constants, num_warps=t.num_warps)
        local = partials.sum(dim=1)
        sum_dy = _acc(local[0], invstd) if sum_dy is None else sum_dy
        sum_dy_xhat = _acc(local[1], invstd) if sum_dy_xhat is None else sum_dy_xhat
    if elementwise:
        t = plan.split
        _launch_backward((t.tiles, t.groups), t, dy, x, mean, invstd, sum_dy, sum_dy_xhat,
                         count if count is not None else mean, dx, dz, plan, act_param, training,
                         count is not None, False, input_grad, write_dz, pointers, constants)
    return dx, sum_dy_xhat, sum_dy, _like(dz, z)
