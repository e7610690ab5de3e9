"""Numba kernels for fp32/fp64 CPU batch norm: the same four functions as `native`, fused.

Batch norm is memory-bound, so its speed is the number of walks over the tensor. The kernels
finish each piece of the tensor while it is still in cache:

- training forward: shifted sums of a channel, then y = act(a*(x - mean) + b (+ z)) over the
  same channel (the second read comes from L2/L3, not memory): one read of x and one write of y
  from DRAM;
- backward: sum(g) and sum(g*x_hat), then dx over the same channel; g = dy*act'(pre) is
  recomputed from x (and z), so neither y nor a mask is read;
- eval forward: the per-channel affine plus epilogue, one pass.

Three layouts, chosen by `_plan`; the flat memory is P rows of C channels of S values
(contiguous: P = N, S = prod(spatial); channels-last and (N, C): S = 1):
- "nchw": S >= 512: a channel is N runs of S values; one thread owns whole channels and reduces
  each run in registers.
- "lanes": shorter runs: a thread owns groups of channels whose part of every row is ~4096
  contiguous values (lanes) and accumulates per lane over the rows.
- "rows": S = 1 with many rows (channels-last, long (N, C)): threads own ranges of rows: partial
  sums, a merge, then the elementwise pass.

Numerics: statistics accumulate in float64 from d = x - shift, the shift being the channel's
first element, so m2 = sum(d^2) - sum(d)^2/M does not cancel when |mean| >> std. Every partial of a
channel uses the same shift, so plain addition is the exact merge of partials (Chan's merge
reduces to it). The normalize and dx passes compute in x's dtype with per-channel coefficients
formed in float64, from x - mean (exact where x is near the mean; see `_affine`).

Numba is imported when this module is, which `kernels.implementation` delays to the first CPU
fp32/fp64 call (importing `batchnorm` stays fast). Kernels compile lazily with `cache=True`, one
specialization per kernel and dtype (activation, residual and affine are runtime arguments); when
the package directory is read-only the cache goes to a user directory (`_choose_cache_dir`).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

import numba
from numba import njit, types
from numba.extending import overload


def _choose_cache_dir() -> None:
    """Numba caches next to this file; a read-only install (site-packages owned by root, a zip,
    a container layer) would recompile in every process, so point Numba at a user cache instead.
    An explicit NUMBA_CACHE_DIR wins."""
    if numba.config.CACHE_DIR:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    pycache = os.path.join(here, "__pycache__")
    if os.access(pycache if os.path.isdir(pycache) else here, os.W_OK):
        return
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (xdg, os.path.join(tempfile.gettempdir(), f"batchnorm-{os.getuid()}")):
        path = os.path.join(root, "batchnorm", "numba")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            numba.config.CACHE_DIR = path
            return


_choose_cache_dir()

_FLAGS = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
# Helpers called per row (loops over slices) are inlined into their kernel at Numba IR level:
# called, each call pays the reference counting of its slice arguments, which costs more than a
# 256-value loop. The scalar helpers are inlined too: each separately compiled function costs a
# whole Numba pipeline, and compile time is what a fresh install's first step waits for. The
# activation loops (`_activate`, `_activation_grad`, `_grad`) stay calls: inlined at every site
# they made a plain BatchNorm's first step compile 5 s longer.
_INLINE = dict(_FLAGS, inline="always")
# Values per inner chunk: the chunk and its scratch stay in L1 between the fused loops.
_CHUNK = 1024

IDENTITY, RELU, LEAKY_RELU, SILU, GELU_TANH = range(5)
ACT_CODES = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "silu": SILU,
             "gelu_tanh": GELU_TANH}
# The epilogues worth fusing here (`kernels.fused_activations`). silu and gelu_tanh call Numba's
# exp and tanh, which are scalar libm calls (no SVML): fused, a 64x256x14x14 training step
# measured 0.56x (silu) and 0.18x (gelu_tanh) the speed of torch.nn's batch norm followed by
# torch's vectorized activation, so `functional` applies those as torch ops after the kernel.
# The kernels still compute them when asked (the custom ops take every activation).
FUSED_ACTIVATIONS = ("identity", "relu", "leaky_relu")


# ---- per-element math, shared by every kernel -------------------------------------------------
# `k` is a tuple of x's dtype (so fp32 math stays fp32 and vectorizes; a tuple, not an array,
# so its loads cannot alias an output):
# k = (slope, 0.5, 1, sqrt(2/pi), 0.044715, 2, 0, 3*0.044715).

# One function per epilogue and direction, each inlined into its own loop below: a single
# act(v, code) inlined with a constant code still types all five bodies at each of the eight
# sites, which Numba's first compile pays for.

# relu and leaky_relu add k[6] = 0 to the value they keep: applied in place (`_activate`), "keep v"
# would let LLVM store only the changed elements, with a masked store (vmaskmovps) that is
# microcoded on AMD Zen: it made a ReLU pass ~10x slower than the affine before it (measured
# 0.87 against 0.08 ns per value here). A runtime zero is an addition LLVM cannot fold away, so
# every element is stored; v + 0 is v, and -0.0 becomes 0.0, as torch.relu gives.

@njit(**_INLINE)
def _relu(v, k):
    return k[6] if v < k[6] else v + k[6]


@njit(**_INLINE)
def _leaky_relu(v, k):
    return v * k[0] if v < k[6] else v + k[6]


@njit(**_INLINE)
def _silu(v, k):
    return v / (k[2] + np.exp(-v))


@njit(**_INLINE)
def _gelu_tanh(v, k):
    # tanh itself: 1 - 2/(1 + exp(2u)) loses ~1e-7 absolutely near u = 0, and the parameter
    # gradients sum that error over the batch.
    return k[1] * v * (k[2] + np.tanh(k[3] * (v + k[4] * v * v * v)))


# dy * act'(v), v the pre-activation (relu/leaky_relu: the sign of v, as y > 0 iff v > 0).

@njit(**_INLINE)
def _relu_grad(dy, v, k):
    return dy if v > k[6] else k[6]


@njit(**_INLINE)
def _leaky_relu_grad(dy, v, k):
    return dy if v > k[6] else dy * k[0]


@njit(**_INLINE)
def _silu_grad(dy, v, k):
    s = k[2] / (k[2] + np.exp(-v))
    return dy * s * (k[2] + v * (k[2] - s))


@njit(**_INLINE)
def _gelu_tanh_grad(dy, v, k):
    c = k[3]
    t = np.tanh(c * (v + k[4] * v * v * v))
    return dy * (k[1] * (k[2] + t) + k[1] * v * (k[2] - t * t) * c * (k[2] + k[7] * v * v))


def _at(coefficient, j):
    """Element j of a per-element coefficient array, or the coefficient itself if a scalar."""


@overload(_at)
def _at_impl(coefficient, j):
    # Resolved at compile time: "nchw" kernels pass a channel's scalars, "rows" kernels (C,)
    # arrays aligned with the row, so one copy of each loop below serves both layouts.
    if isinstance(coefficient, types.Array):
        return lambda coefficient, j: coefficient[j]
    return lambda coefficient, j: coefficient


@njit(**_INLINE)
def _affine(x, z, out, a, m, b, has_z):
    """out = a*(x - m) + b (+ z) over a slice; a, m, b scalars or arrays aligned with it.
    Not a*x + (b - a*m): where |mean| >> std that form cancels in the input's dtype (fp32 output
    error 1.5e-5 of its scale at |mean|/std = 500, measured; 5.6e-6 this way), while x - m is
    exact there."""
    for j in range(out.shape[0]):
        out[j] = _at(a, j) * (x[j] - _at(m, j)) + _at(b, j)
    if has_z:
        for j in range(out.shape[0]):
            out[j] += z[j]


# The activation loops below branch once, outside the loop: with `code` tested per element LLVM
# does not unswitch the loop and nothing vectorizes (measured 5-30x slower).

@njit(**_FLAGS)
def _activate(y, code, k):
    """y = act(y) in place over a slice."""
    if code == RELU:
        for j in range(y.shape[0]):
            y[j] = _relu(y[j], k)
    elif code == LEAKY_RELU:
        for j in range(y.shape[0]):
            y[j] = _leaky_relu(y[j], k)
    elif code == SILU:
        for j in range(y.shape[0]):
            y[j] = _silu(y[j], k)
    elif code == GELU_TANH:
        for j in range(y.shape[0]):
            y[j] = _gelu_tanh(y[j], k)


@njit(**_FLAGS)
def _activation_grad(g, dy, code, k):
    """g = dy * act'(g) in place: g holds the pre-activation on entry."""
    if code == RELU:
        for j in range(g.shape[0]):
            g[j] = _relu_grad(dy[j], g[j], k)
    elif code == LEAKY_RELU:
        for j in range(g.shape[0]):
            g[j] = _leaky_relu_grad(dy[j], g[j], k)
    elif code == SILU:
        for j in range(g.shape[0]):
            g[j] = _silu_grad(dy[j], g[j], k)
    elif code == GELU_TANH:
        for j in range(g.shape[0]):
            g[j] = _gelu_tanh_grad(dy[j], g[j], k)


@njit(**_INLINE)
def _normalize(x, z, y, a, m, b, has_z, code, k):
    """y = act(a*(x - m) + b (+ z)) over a slice (the forward epilogue)."""
    _affine(x, z, y, a, m, b, has_z)
    _activate(y, code, k)


@njit(**_FLAGS)
def _grad(dy, x, z, buf, a, m, b, has_z, code, k):
    """g = dy * act'(a*(x - m) + b (+ z)) over a slice: dy itself for identity, else written to
    buf."""
    if code == IDENTITY:
        return dy
    g = buf[:dy.shape[0]]
    _affine(x, z, g, a, m, b, has_z)
    _activation_grad(g, dy, code, k)
    return g


# relu and leaky_relu without a residual: the backward forms g in its own loops, one select per
# value, instead of writing it to `_grad`'s buffer first (a call and two more passes per chunk:
# the relu backward measured ~2x the identity one that way).

@njit(**_INLINE)
def _rectified(code, has_z):
    """Whether g = dy*act'(pre) is formed in the caller's loop (`_rectifier_grad`)."""
    return (code == RELU or code == LEAKY_RELU) and not has_z


@njit(**_INLINE)
def _rectifier_grad(dy, v, k, code):
    """dy*act'(v) for relu and leaky_relu."""
    return dy if v > k[6] else (dy * k[0] if code == LEAKY_RELU else k[6])


@njit(**_INLINE)
def _input_grad(dy, x, z, dx, dz, buf, a, m, b, p, q, has_z, code, k, write_dx, write_dz):
    """dx = a*g + p*(x - m) + q and dz = g over a slice, g = dy*act'(a*(x - m) + b (+ z))
    (p, q: see `_dx_coefficients`)."""
    if _rectified(code, has_z):
        if write_dx:
            for j in range(dx.shape[0]):
                e = x[j] - _at(m, j)
                g = _rectifier_grad(dy[j], _at(a, j) * e + _at(b, j), k, code)
                dx[j] = _at(a, j) * g + _at(p, j) * e + _at(q, j)
        return
    g = _grad(dy, x, z, buf, a, m, b, has_z, code, k)
    if write_dz:
        _copy(g, dz)
    if write_dx:
        _grad_input(g, x, dx, a, m, p, q)


# Loops rather than `dst[a:b] = src` and `v.sum()`: Numba compiles a slice assignment's
# shape-mismatch error message with its whole string-formatting machinery (measured: 4.8 s of a
# backward kernel's 12.7 s first compile).
@njit(**_INLINE)
def _copy(src, dst):
    """dst[:] = src over a slice."""
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@njit(**_INLINE)
def _total(v):
    """sum(v) over a slice, in float64."""
    t = 0.0
    for j in range(v.shape[0]):
        t += v[j]
    return t


@njit(**_INLINE)
def _grad_input(g, x, dx, a, mean, p, q):
    """dx = a*g + p*(x - mean) + q over a slice (p, q: see `_dx_coefficients`)."""
    for j in range(dx.shape[0]):
        dx[j] = _at(a, j) * g[j] + _at(p, j) * (x[j] - _at(mean, j)) + _at(q, j)


@njit(**_INLINE)
def _coefficients(invstd, weight, bias, has_w, has_b, c):
    """y = a*(x - mean) + b: a = weight*invstd (float64), b = bias (0 without one)."""
    a = np.float64(invstd[c]) * (np.float64(weight[c]) if has_w else 1.0)
    return a, (np.float64(bias[c]) if has_b else 0.0)


@njit(**_INLINE)
def _dx_coefficients(a, invstd, sum_g, sum_gxhat, m, training):
    """dx = a*(g - sum(g)/M - x_hat*sum(g*x_hat)/M) = a*g + p*(x - mean) + q with
    p = -a*invstd*sum(g*x_hat)/M, q = -a*sum(g)/M; eval (constant statistics): p = q = 0."""
    if not training:
        return 0.0, 0.0
    return -a * invstd * sum_gxhat / m, -a * sum_g / m


@njit(**_INLINE)
def _unpack(kv):
    return (kv[0], kv[1], kv[2], kv[3], kv[4], kv[5], kv[6], kv[7])


@njit(**_INLINE)
def _moments(x, start, stride, rows, w, shift, t1, t2):
    """Per lane j < w: t1[j] += sum(d), t2[j] += sum(d^2), d = x[start + r*stride + j] - shift[j],
    over `rows` rows; four rows per walk over the accumulators, which quarters their loads and
    stores (they, not x, bound this loop)."""
    r = 0
    while r + 4 <= rows:
        o = start + r * stride
        x0, x1 = x[o:o + w], x[o + stride:o + stride + w]
        x2, x3 = x[o + 2 * stride:o + 2 * stride + w], x[o + 3 * stride:o + 3 * stride + w]
        for j in range(w):
            d0, d1, d2, d3 = x0[j] - shift[j], x1[j] - shift[j], x2[j] - shift[j], x3[j] - shift[j]
            t1[j] += (d0 + d1) + (d2 + d3)
            t2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    for r in range(r, rows):
        xr = x[start + r * stride:start + r * stride + w]
        for j in range(w):
            d = xr[j] - shift[j]
            t1[j] += d
            t2[j] += d * d


@njit(**_FLAGS)
def _grad_moments(dy, x, z, buf, start, stride, rows, w, a, b, mu, has_z, code, k, t1, t2):
    """Per lane j < w: t1[j] += sum(g), t2[j] += sum(g*(x - mu[j])) over `rows` rows of lanes
    at start + r*stride, g = dy*act'(a*(x - mu) + b (+ z)). identity (g = dy), relu and
    leaky_relu without a residual walk four rows per pass over the accumulators (as `_moments`);
    the rest, and the last rows % 4 rows, form g in buf (_CHUNK long) a row at a time. A call,
    not inlined: it runs once per walk, and each inlined copy costs seconds of first compile."""
    r = 0
    if code == IDENTITY or _rectified(code, has_z):
        while r + 4 <= rows:
            o0, o1, o2, o3 = start + r * stride, start + (r + 1) * stride, \
                start + (r + 2) * stride, start + (r + 3) * stride
            x0, x1, x2, x3 = x[o0:o0 + w], x[o1:o1 + w], x[o2:o2 + w], x[o3:o3 + w]
            d0, d1, d2, d3 = dy[o0:o0 + w], dy[o1:o1 + w], dy[o2:o2 + w], dy[o3:o3 + w]
            if code == IDENTITY:
                for j in range(w):
                    e0, e1, e2, e3 = x0[j] - mu[j], x1[j] - mu[j], x2[j] - mu[j], x3[j] - mu[j]
                    t1[j] += (d0[j] + d1[j]) + (d2[j] + d3[j])
                    t2[j] += (d0[j] * e0 + d1[j] * e1) + (d2[j] * e2 + d3[j] * e3)
            else:
                for j in range(w):
                    e0, e1, e2, e3 = x0[j] - mu[j], x1[j] - mu[j], x2[j] - mu[j], x3[j] - mu[j]
                    g0 = _rectifier_grad(d0[j], a[j] * e0 + b[j], k, code)
                    g1 = _rectifier_grad(d1[j], a[j] * e1 + b[j], k, code)
                    g2 = _rectifier_grad(d2[j], a[j] * e2 + b[j], k, code)
                    g3 = _rectifier_grad(d3[j], a[j] * e3 + b[j], k, code)
                    t1[j] += (g0 + g1) + (g2 + g3)
                    t2[j] += (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3)
            r += 4
    for r in range(r, rows):
        o = start + r * stride
        for l0 in range(0, w, _CHUNK):
            n = min(w - l0, _CHUNK)
            i, mm, s1, s2 = o + l0, mu[l0:l0 + n], t1[l0:l0 + n], t2[l0:l0 + n]
            xr = x[i:i + n]
            g = _grad(dy[i:i + n], xr, z[i:i + n], buf, a[l0:l0 + n], mm, b[l0:l0 + n], has_z,
                      code, k)
            for j in range(n):
                s1[j] += g[j]
                s2[j] += g[j] * (xr[j] - mm[j])


# ---- layout "nchw": x is flat (N*C*S,), channel c is the N rows x[(n*C + c)*S : ... + S] -----
# One thread owns a channel: statistics, then the normalize (or dx) pass over the same rows while
# they are in L2. Loops index slices from 0: with a runtime offset in the index Numba keeps its
# negative-index check and the loop does not vectorize (measured 5x slower).

@njit(**_INLINE)
def _nchw_stats(x, n, c, s, ch):
    """(mean, m2) of channel ch in float64 from d = x - x[first]: mean = shift + sum(d)/M,
    m2 = sum(d^2) - sum(d)^2/M, M = n*s."""
    shift = np.float64(x[ch * s])
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        start = (i * c + ch) * s
        xr = x[start:start + s]
        for j in range(s):
            d = xr[j] - shift
            s1 += d
            s2 += d * d
    m = n * s
    m2 = s2 - s1 * s1 / m
    return shift + s1 / m, (0.0 if m2 < 0.0 else m2)


@njit(**_INLINE)
def _nchw_channel_stats(x, n, c, s, ch, eps, one, st):
    """st[:, ch] = count, mean, m2, one/sqrt(m2/count + eps), the last in st's dtype (eps, one
    too), the way `functional` forms invstd with torch.rsqrt under torch.compile: the eager and
    compiled paths then agree to the bit."""
    mu, sq = _nchw_stats(x, n, c, s, ch)
    st[0, ch], st[1, ch], st[2, ch] = n * s, mu, sq
    st[3, ch] = one / np.sqrt(st[2, ch] / st[0, ch] + eps)


def _nchw_stats_kernel(x, n, c, s, eps, one, st, lo, hi):
    # x: (N*C*S,) flat NCHW; st: (4, C) output rows count, mean, m2, invstd = 1/sqrt(m2/M + eps);
    # channels lo..hi
    for ch in range(lo, hi):
        _nchw_channel_stats(x, n, c, s, ch, eps, one, st)


def _nchw_train_forward_kernel(x, z, y, n, c, s, weight, bias, has_w, has_b, has_z, eps, one,
                               code, kv, st, lo, hi):
    # x, z, y: (N*C*S,) flat NCHW (z ignored unless has_z); weight, bias: (C,) (ignored unless
    # has_w/has_b); kv: (8,) epilogue constants; st: (4, C) output rows count, mean, m2, invstd;
    # channels lo..hi. invstd = 1/sqrt(m2/M + eps); y = act(weight*(x - mean)*invstd + bias (+ z))
    k = _unpack(kv)
    ab = np.empty(2, x.dtype)  # a, b rounded to x's dtype
    for ch in range(lo, hi):
        _nchw_channel_stats(x, n, c, s, ch, eps, one, st)
        ab[0], ab[1] = _coefficients(st[3], weight, bias, has_w, has_b, ch)
        for i in range(n):
            for j0 in range((i * c + ch) * s, (i * c + ch + 1) * s, _CHUNK):
                j1 = min(j0 + _CHUNK, (i * c + ch + 1) * s)
                _normalize(x[j0:j1], z[j0:j1], y[j0:j1], ab[0], st[1, ch], ab[1], has_z, code,
                           k)


def _nchw_forward_kernel(x, z, y, n, c, s, mean, invstd, weight, bias, has_w, has_b, has_z, code,
                         kv, lo, hi):
    # x, z, y: (N*C*S,) flat NCHW; mean, invstd, weight, bias: (C,); kv: (8,) epilogue constants;
    # rows (n, ch) lo..hi. y = act(weight*(x - mean)*invstd + bias (+ z))
    k = _unpack(kv)
    ab = np.empty(2, x.dtype)
    for row in range(lo, hi):
        ab[0], ab[1] = _coefficients(invstd, weight, bias, has_w, has_b, row % c)
        for j0 in range(row * s, (row + 1) * s, _CHUNK):
            j1 = min(j0 + _CHUNK, (row + 1) * s)
            _normalize(x[j0:j1], z[j0:j1], y[j0:j1], ab[0], mean[row % c], ab[1], has_z, code,
                       k)


def _nchw_backward_kernel(dy, x, z, dx, dz, n, c, s, mean, invstd, weight, bias, has_w, has_b,
                          has_z, code, kv, training, has_count, count, sum_g, sum_gxhat, need_sums,
                          write_dx, write_dz, lo, hi):
    # dy, x, z, dx, dz: (N*C*S,) flat NCHW; mean, invstd, weight, bias, count: (C,) (count: M
    # per channel if has_count, else M = N*S);
    # sum_g, sum_gxhat: (C,) sum(g), sum(g*x_hat): outputs when need_sums, else inputs;
    # channels lo..hi.
    # g = dy*act'(pre); dx = a*(g - sum(g)/M - x_hat*sum(g*x_hat)/M) (training) or a*g (eval)
    k = _unpack(kv)
    coef = np.empty(5, x.dtype)  # a, b, mean, p, q rounded to x's dtype
    buf = np.empty(_CHUNK, x.dtype)
    for ch in range(lo, hi):
        a64, b64 = _coefficients(invstd, weight, bias, has_w, has_b, ch)
        inv = np.float64(invstd[ch])
        mu = np.float64(mean[ch])
        coef[0], coef[1], coef[2] = a64, b64, mu
        if need_sums:
            sg = 0.0
            sgx = 0.0
            for i in range(n):
                for j0 in range((i * c + ch) * s, (i * c + ch + 1) * s, _CHUNK):
                    j1 = min(j0 + _CHUNK, (i * c + ch + 1) * s)
                    xr, dr = x[j0:j1], dy[j0:j1]
                    if _rectified(code, has_z):
                        for j in range(j1 - j0):
                            g = _rectifier_grad(dr[j], coef[0] * (xr[j] - coef[2]) + coef[1], k,
                                                code)
                            sg += g
                            sgx += g * (np.float64(xr[j]) - mu)
                        continue
                    g = _grad(dr, xr, z[j0:j1], buf, coef[0], coef[2], coef[1], has_z, code, k)
                    for j in range(j1 - j0):
                        sg += g[j]
                        sgx += g[j] * (np.float64(xr[j]) - mu)
            sum_g[ch], sum_gxhat[ch] = sg, sgx * inv
        if write_dx or write_dz:
            coef[3], coef[4] = _dx_coefficients(
                a64, inv, np.float64(sum_g[ch]), np.float64(sum_gxhat[ch]),
                np.float64(count[ch]) if has_count else np.float64(n * s), training)
            for i in range(n):
                for j0 in range((i * c + ch) * s, (i * c + ch + 1) * s, _CHUNK):
                    j1 = min(j0 + _CHUNK, (i * c + ch + 1) * s)
                    _input_grad(dy[j0:j1], x[j0:j1], z[j0:j1], dx[j0:j1], dz[j0:j1], buf,
                                coef[0], coef[2], coef[1], coef[3], coef[4], has_z, code, k,
                                write_dx, write_dz)


# ---- layout "lanes": x is flat (P*C*S,), element (p, ch, j) at (p*C + ch)*S + j ---------------
# For short channel rows (S small: 7x7, 8x8, 14x14, and S = 1 with few rows), where a loop per row
# of S values costs more than the values. A thread owns groups of `group` channels; the group's
# part of every row is w = group*S contiguous values ("lanes"), and the kernels walk the rows
# accumulating per lane (lane j belongs to channel c0 + j // S), so every inner loop is w long and
# vectorizes. The group's rows are long (`_plan`): the normalize pass re-reads them from L2 or L3.

@njit(**_INLINE)
def _spread(dst, value, j0, s):
    """dst[j0:j0+s] = value (a channel's scalar over its lanes)."""
    for j in range(j0, j0 + s):
        dst[j] = value


def _lanes_forward_kernel(x, z, y, p_rows, c, s, mean, invstd, weight, bias, has_w, has_b, has_z,
                          batch_stats, write_y, eps, one, code, kv, st, group, lo, hi):
    # x, z, y: (P*C*S,) flat; mean, invstd, weight, bias: (C,); kv: (8,) epilogue constants;
    # channels lo..hi in groups of `group`. batch_stats: st (4, C) gets count, mean, m2,
    # invstd = 1/sqrt(m2/M + eps) of x (shifted by each channel's first value, as
    # `_nchw_stats`), and those normalize (the caller passes st[1], st[3] as mean, invstd);
    # else mean, invstd do. write_y: y = act(weight*(x - mean)*invstd + bias (+ z))
    k = _unpack(kv)
    width = c * s
    wmax = group * s
    shift = np.empty(wmax)
    acc1 = np.empty(wmax)
    acc2 = np.empty(wmax)
    a = np.empty(wmax, x.dtype)
    mu = np.empty(wmax, x.dtype)
    b = np.empty(wmax, x.dtype)
    for c0 in range(lo, hi, group):
        c1 = min(c0 + group, hi)
        l0, w = c0 * s, (c1 - c0) * s
        if batch_stats:
            sh, t1, t2 = shift[:w], acc1[:w], acc2[:w]
            for ch in range(c0, c1):
                _spread(sh, np.float64(x[ch * s]), (ch - c0) * s, s)
            t1[:] = 0.0
            t2[:] = 0.0
            _moments(x, l0, width, p_rows, w, sh, t1, t2)
            m = p_rows * s
            for ch in range(c0, c1):
                j0 = (ch - c0) * s
                s1 = _total(t1[j0:j0 + s])
                m2 = _total(t2[j0:j0 + s]) - s1 * s1 / m
                st[0, ch], st[1, ch], st[2, ch] = m, sh[j0] + s1 / m, (0.0 if m2 < 0.0 else m2)
                st[3, ch] = one / np.sqrt(st[2, ch] / st[0, ch] + eps)  # as `_nchw_channel_stats`
        if write_y:
            for ch in range(c0, c1):
                av, bv = _coefficients(invstd, weight, bias, has_w, has_b, ch)
                _spread(a, av, (ch - c0) * s, s)
                _spread(mu, mean[ch], (ch - c0) * s, s)
                _spread(b, bv, (ch - c0) * s, s)
            for p in range(p_rows):
                o = p * width + l0
                _normalize(x[o:o + w], z[o:o + w], y[o:o + w], a[:w], mu[:w], b[:w], has_z, code,
                           k)


def _lanes_backward_kernel(dy, x, z, dx, dz, p_rows, c, s, mean, invstd, weight, bias, has_w,
                           has_b, has_z, code, kv, training, has_count, count, sum_g, sum_gxhat,
                           need_sums, write_dx, write_dz, group, lo, hi):
    # dy, x, z, dx, dz: (P*C*S,) flat; the other arguments as `_nchw_backward_kernel`'s;
    # channels lo..hi in groups of `group` (see `_lanes_forward_kernel`).
    k = _unpack(kv)
    width = c * s
    wmax = group * s
    a = np.empty(wmax, x.dtype)
    b = np.empty(wmax, x.dtype)
    mu = np.empty(wmax, x.dtype)
    pp = np.empty(wmax, x.dtype)
    qq = np.empty(wmax, x.dtype)
    acc1 = np.empty(wmax)
    acc2 = np.empty(wmax)
    buf = np.empty(_CHUNK, x.dtype)
    for c0 in range(lo, hi, group):
        c1 = min(c0 + group, hi)
        l0, w = c0 * s, (c1 - c0) * s
        for ch in range(c0, c1):
            j0 = (ch - c0) * s
            av, bv = _coefficients(invstd, weight, bias, has_w, has_b, ch)
            _spread(a, av, j0, s)
            _spread(b, bv, j0, s)
            _spread(mu, mean[ch], j0, s)
        if need_sums:
            t1, t2 = acc1[:w], acc2[:w]
            t1[:] = 0.0
            t2[:] = 0.0
            _grad_moments(dy, x, z, buf, l0, width, p_rows, w, a, b, mu, has_z, code, k, t1, t2)
            for ch in range(c0, c1):
                j0 = (ch - c0) * s
                sum_g[ch] = _total(t1[j0:j0 + s])
                sum_gxhat[ch] = _total(t2[j0:j0 + s]) * np.float64(invstd[ch])
        if write_dx or write_dz:
            for ch in range(c0, c1):
                av, _ = _coefficients(invstd, weight, bias, has_w, has_b, ch)
                pc, qc = _dx_coefficients(
                    av, np.float64(invstd[ch]), np.float64(sum_g[ch]), np.float64(sum_gxhat[ch]),
                    np.float64(count[ch]) if has_count else np.float64(p_rows * s), training)
                _spread(pp, pc, (ch - c0) * s, s)
                _spread(qq, qc, (ch - c0) * s, s)
            piece = w if code == IDENTITY or _rectified(code, has_z) else _CHUNK  # buf in L1
            for p in range(p_rows):
                for j0 in range(0, w, piece):
                    n = min(w - j0, piece)
                    o = p * width + l0 + j0
                    _input_grad(dy[o:o + n], x[o:o + n], z[o:o + n], dx[o:o + n], dz[o:o + n],
                                buf, a[j0:j0 + n], mu[j0:j0 + n], b[j0:j0 + n], pp[j0:j0 + n],
                                qq[j0:j0 + n], has_z, code, k, write_dx, write_dz)


# ---- layout "rows": x is flat (P*C,), row r holds channels x[r*C : r*C + C] ------------------
# The rows are split between threads, so each kernel has two phases: per-thread partial sums over
# its rows (all shifted by x[0, :], so adding partials is the exact merge), a merge, then the
# elementwise pass. The second read of x comes from L3 when the tensor fits (32 MB here).
# A row is short (C values), so loops run over blocks of R = _CHUNK // C whole rows against
# per-channel vectors tiled R times: one long vectorized loop instead of R short ones.

@njit(**_INLINE)
def _tile(v, rows, dtype_like):
    """v (C,) repeated `rows` times, in dtype_like's dtype: element i belongs to channel i % C."""
    c = v.shape[0]
    out = np.empty(rows * c, dtype_like.dtype)
    for r in range(rows):
        for j in range(c):
            out[r * c + j] = v[j]
    return out


@njit(**_INLINE)
def _fold(tiled, c, out):
    """out[j] += sum over the tiled copies of channel j."""
    for r in range(tiled.shape[0] // c):
        for j in range(c):
            out[j] += tiled[r * c + j]


@njit(**_INLINE)
def _tiled_walk(lo, hi, rows, c):
    """Rows lo..hi as (start, stride, count, width) walks of lanes: the whole tiles of `rows`
    rows, then the rest as one short tile. A loop over both keeps one inlined copy of the walk
    (each copy costs a second of first compile)."""
    tiles = (hi - lo) // rows
    return ((lo * c, rows * c, tiles, rows * c),
            ((lo + tiles * rows) * c, 0, 1, (hi - lo - tiles * rows) * c))


def _rows_stats_kernel(x, c, s1, s2, lo, hi):
    # x: (P*C,) flat rows; s1, s2: (C,) float64 partials (this thread's) of sum(d), sum(d^2),
    # d = x - x[0, :], over rows lo..hi
    rows = max(1, _CHUNK // c)
    shift = _tile(x[:c], rows, s1)
    t1 = np.zeros(rows * c)
    t2 = np.zeros(rows * c)
    for start, stride, count, w in _tiled_walk(lo, hi, rows, c):
        _moments(x, start, stride, count, w, shift, t1, t2)
    _fold(t1, c, s1)
    _fold(t2, c, s2)


def _rows_stats_merge_kernel(x, p, eps, one, s1, s2, st):
    # x: (P*C,) flat rows; s1, s2: (T, C) per-thread partials; st: (4, C) output rows count, mean,
    # m2, invstd. mean = x[0] + sum(d)/P, m2 = sum(d^2) - sum(d)^2/P, invstd = 1/sqrt(m2/P + eps)
    for j in range(st.shape[1]):
        t1 = _total(s1[:, j])
        sq = _total(s2[:, j]) - t1 * t1 / p
        sq = 0.0 if sq < 0.0 else sq
        st[0, j], st[1, j], st[2, j] = p, np.float64(x[j]) + t1 / p, sq
        st[3, j] = one / np.sqrt(st[2, j] / st[0, j] + eps)  # as `_nchw_channel_stats`


@njit(**_INLINE)
def _rows_coefficients(invstd, weight, bias, has_w, has_b, rows, like):
    """a, b of `_coefficients` for every channel, tiled `rows` times, in like's dtype."""
    c = invstd.shape[0]
    a = np.empty(c)
    b = np.empty(c)
    for j in range(c):
        a[j], b[j] = _coefficients(invstd, weight, bias, has_w, has_b, j)
    return _tile(a, rows, like), _tile(b, rows, like)


def _rows_forward_kernel(x, z, y, c, mean, invstd, weight, bias, has_w, has_b, has_z, code, kv,
                         lo, hi):
    # x, z, y: (P*C,) flat rows; mean, invstd, weight, bias: (C,); kv: (8,) epilogue constants;
    # rows lo..hi. y = act(weight*(x - mean)*invstd + bias (+ z))
    k = _unpack(kv)
    rows = max(1, _CHUNK // c)
    a, b = _rows_coefficients(invstd, weight, bias, has_w, has_b, rows, x)
    mu = _tile(mean, rows, x)
    for r0 in range(lo, hi, rows):
        j0, j1 = r0 * c, min(hi, r0 + rows) * c
        n = j1 - j0
        _normalize(x[j0:j1], z[j0:j1], y[j0:j1], a[:n], mu[:n], b[:n], has_z, code, k)


def _rows_grad_sums_kernel(dy, x, z, c, mean, invstd, weight, bias, has_w, has_b, has_z, code,
                           kv, sg, sgx, lo, hi):
    # dy, x, z: (P*C,) flat rows; mean, invstd, weight, bias: (C,); sg, sgx: (C,) float64
    # partials (this thread's) of sum(g), sum(g*(x - mean)) over rows lo..hi, g = dy*act'(pre)
    k = _unpack(kv)
    rows = max(1, _CHUNK // c)
    a, b = _rows_coefficients(invstd, weight, bias, has_w, has_b, rows, x)
    mu = _tile(mean, rows, x)
    tg = np.zeros(rows * c)
    tgx = np.zeros(rows * c)
    buf = np.empty(_CHUNK, x.dtype)
    for start, stride, count, w in _tiled_walk(lo, hi, rows, c):
        _grad_moments(dy, x, z, buf, start, stride, count, w, a, b, mu, has_z, code, k, tg, tgx)
    _fold(tg, c, sg)
    _fold(tgx, c, sgx)


def _rows_grad_input_kernel(dy, x, z, dx, dz, p, c, mean, invstd, weight, bias, has_w, has_b,
                            has_z, code, kv, training, has_count, count, sg, sgx, sum_g,
                            sum_gxhat, need_sums, write_dx, write_dz, lo, hi):
    # dy, x, z, dx, dz: (P*C,) flat rows; mean, invstd, weight, bias, count: (C,) (count: M per
    # channel if has_count, else M = P); sg, sgx: (T, C) partials of `_rows_grad_sums_kernel`;
    # sum_g, sum_gxhat: (C,) sum(g), sum(g*x_hat): written from the partials by the range that
    # starts at row 0 when need_sums, else inputs; rows lo..hi.
    # dx = a*g + p*(x - mean) + q (`_dx_coefficients`), dz = g
    k = _unpack(kv)
    rows = max(1, _CHUNK // c)
    a, b = _rows_coefficients(invstd, weight, bias, has_w, has_b, rows, x)
    pq = np.empty((2, c))
    for j in range(c):
        total_g = _total(sg[:, j]) if need_sums else np.float64(sum_g[j])
        total_gxhat = _total(sgx[:, j]) * invstd[j] if need_sums else np.float64(sum_gxhat[j])
        if need_sums and lo == 0:
            sum_g[j], sum_gxhat[j] = total_g, total_gxhat
        pq[0, j], pq[1, j] = _dx_coefficients(
            np.float64(a[j]), np.float64(invstd[j]), total_g, total_gxhat,
            np.float64(count[j]) if has_count else np.float64(p), training)
    mu, pp, qq = _tile(mean, rows, x), _tile(pq[0], rows, x), _tile(pq[1], rows, x)
    buf = np.empty(rows * c, x.dtype)
    for r0 in range(lo, hi, rows):
        j0, j1 = r0 * c, min(hi, r0 + rows) * c
        n = j1 - j0
        _input_grad(dy[j0:j1], x[j0:j1], z[j0:j1], dx[j0:j1], dz[j0:j1], buf, a[:n], mu[:n],
                    b[:n], pp[:n], qq[:n], has_z, code, k, write_dx, write_dz)


# ---- host side: layout, threads, and the four functions of the kernel interface ------------
# Threads: the kernels are serial and release the GIL; `_run` splits the channels (or rows) into
# torch.get_num_threads() ranges and runs them on a small thread pool. Unlike Numba's parallel=True
# this never touches an OpenMP runtime (so torch's thread setting cannot be reset), is safe in
# fork-based DataLoader workers (the pool is rebuilt after a fork) and from several Python threads,
# and compiles in half the time.
# Small batches are overhead-bound (torch.nn's BatchNorm1d step on (100, 100) takes ~130 us), so
# the host code makes as few torch calls as it can: one allocation for all per-channel outputs,
# numpy views instead of reshapes, no dtype conversions when none is needed.

_SOURCES = {f.__name__[1:-len("_kernel")]: f for f in (
    _nchw_stats_kernel, _nchw_train_forward_kernel, _nchw_forward_kernel, _nchw_backward_kernel,
    _lanes_forward_kernel, _lanes_backward_kernel, _rows_stats_kernel, _rows_stats_merge_kernel,
    _rows_forward_kernel, _rows_grad_sums_kernel, _rows_grad_input_kernel)}
_compiled: dict = {}
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_ACC = {torch.float32: torch.float32, torch.float64: torch.float64}
# Below this many values per thread a second thread costs more (a pool hand-off, ~20 us) than it
# saves.
_MIN_NUMEL_PER_THREAD = 1 << 16
# Layout choice (`_plan`), tuned on a 2-core EPYC (512 KB of L2 per core, 32 MB of L3): a channel
# row of at least _SEGMENT_MIN values is walked by the "nchw" loops; shorter ones by "lanes", in
# groups of about _LANES lanes (16 KB of fp32 per row); with S = 1 and fewer than _MIN_LANES
# channels per thread, or at least _ROWS_MIN rows (measured: its backward is faster there), by
# "rows". The lanes group is not shrunk to keep its P rows in L2 for the second pass: long
# contiguous runs, which the prefetchers follow, paid more than L2 hits (measured on
# 256x128x8x8: groups of 8 channels, 2 KB runs that fit L2: forward 1.6 ms, backward 3.5 ms;
# groups of 64, 16 KB runs from L3: 1.2 and 1.7 ms; and 1024x128x8x8, past L3: 15 and 21 ms
# against 10 and 12 ms).
_SEGMENT_MIN = 512
_LANES = 4096
_MIN_LANES = 256
_ROWS_MIN = 256


def supports(x: Tensor) -> bool:
    """Whether these kernels take `x`: a non-empty dense fp32/fp64 CPU tensor, contiguous or
    channels-last."""
    if x.device.type != "cpu" or x.dtype not in _ACC or x.numel() == 0:
        return False
    if x.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def _threads(numel: int) -> int:
    """How many threads split a tensor of `numel` values: torch.get_num_threads(), fewer when
    there is too little work."""
    return max(1, min(torch.get_num_threads(), numel // _MIN_NUMEL_PER_THREAD))


def _plan(x: Tensor) -> tuple[str, int, int, int, int]:
    """(kind, P, C, S, group): the flat memory of `x` is P rows of C channels of S values
    (contiguous: P = N; channels-last: P = N*spatial, S = 1), walked by the "nchw", "lanes" or
    "rows" kernels; `group` is the channels per group of "lanes"."""
    c = x.shape[1]
    numel = x.numel()
    p = x.shape[0] if x.is_contiguous() else numel // c
    s = numel // (p * c)
    if s >= _SEGMENT_MIN:
        return "nchw", p, c, s, 1
    group = min(-(-_LANES // s), -(-c // _threads(numel)))
    if s == 1 and (p >= _ROWS_MIN or group * s < _MIN_LANES):
        return "rows", p, c, 1, 0
    if group * s < _MIN_LANES:
        group = -(-_MIN_LANES // s)
    return "lanes", p, c, s, min(group, c)


def _flat(t: Tensor) -> np.ndarray:
    """The memory of a dense tensor as a 1-d array in memory order (a view: kernels write it)."""
    return t.detach().numpy().ravel(order="K")


def _huge_pages_madvise():
    """libc's madvise when the kernel backs madvised memory with transparent huge pages (Linux
    with THP "always" or "madvise"), else None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _huge_pages_madvise()
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 1 << 21


def _empty_like(x: Tensor) -> Tensor:
    """torch.empty_like(x), backed by huge pages where the kernel can: a fresh large output is
    first touched by the kernel, and with 4 KB pages that costs a page fault per 4 KB (measured
    here: 23 ms to fill a fresh 32 MB tensor, 7 ms with huge pages, 4 ms for memory already
    mapped). torch does the same for all its allocations under THP_MEM_ALLOC_ENABLE=1; we do it
    for our own outputs only. Memory already mapped (reused by malloc) is unaffected."""
    out = torch.empty_like(x)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and nbytes >= 2 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)
    return out


def _like(t: Tensor, x: Tensor) -> Tensor:
    """`t` with x's dtype and strides, so one flat index addresses the same element in both
    (a gradient or residual may arrive in another memory format, or expanded)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return _empty_like(x).copy_(t)


def _vector(t: Tensor, acc: torch.dtype) -> np.ndarray:
    t = t.detach()
    return (t if t.dtype == acc else t.to(acc)).numpy()


def _optional(t: Tensor | None, acc: torch.dtype, absent: np.ndarray) -> np.ndarray:
    """(C,) parameter in the accumulation dtype; an absent one is replaced by `absent` (same
    type, ignored by the kernel) so that absence does not create another specialization."""
    return absent if t is None else _vector(t, acc)


_constants: dict = {}


def _epilogue_constants(dtype: np.dtype, slope: float) -> np.ndarray:
    key = (dtype, slope)
    kv = _constants.get(key)
    if kv is None:
        kv = _constants[key] = np.array(
            [slope, 0.5, 1.0, math.sqrt(2.0 / math.pi), 0.044715, 2.0, 0.0, 3 * 0.044715], dtype)
    return kv


def _kernel(name: str):
    kernel = _compiled.get(name)
    if kernel is None:
        kernel = _compiled[name] = njit(**_FLAGS)(_SOURCES[name])
    return kernel


def _ranges(items: int, numel: int, unit: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) ranges splitting `items` channels or rows between `_threads(numel)` threads,
    at multiples of `unit` (a "lanes" group)."""
    units = -(-items // unit)
    threads = min(_threads(numel), units)
    return [(units * t // threads * unit, min(items, units * (t + 1) // threads * unit))
            for t in range(threads)]


def _run(name: str, calls: list[tuple]) -> None:
    """kernel(*args) for each args in `calls`, in parallel: on torch's OpenMP threads where they
    can be borrowed, else on this thread and a small pool."""
    kernel = _kernel(name)
    if len(calls) == 1:
        kernel(*calls[0])
    elif (team := _openmp_team()) is not None:
        team(kernel, calls)
    else:
        _run_on_pool(kernel, calls)


def _run_on_pool(kernel, calls: list[tuple]) -> None:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        # A forked child inherits the pool object but not its threads: build a new one.
        _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                   thread_name_prefix="batchnorm-cpu")
        _pool_pid = os.getpid()
    futures = [_pool.submit(kernel, *args) for args in calls[1:]]
    kernel(*calls[0])
    for future in futures:
        future.result()


class _OpenMPTeam:
    """Runs the kernel calls on torch's own OpenMP threads (`GOMP_parallel` of the runtime torch
    loaded, the call `at::parallel_for` makes).

    Why not our own threads: after each parallel op torch's OpenMP threads spin for a while
    waiting for the next one, so a pool of our own that runs right after a convolution shares
    its cores with spinning threads (measured: 2.5 ms alone, 4.5 ms after a torch op). Borrowing
    the team instead finds them awake. The callback runs Python for a few microseconds (it takes
    the GIL), then the nogil kernel.
    """

    _callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    def __init__(self, runtime: ctypes.CDLL) -> None:
        self._parallel = runtime.GOMP_parallel
        self._parallel.argtypes = [self._callback_type, ctypes.c_void_p, ctypes.c_uint,
                                   ctypes.c_uint]
        self._parallel.restype = None
        self._thread_num = runtime.omp_get_thread_num
        self._num_threads = runtime.omp_get_num_threads
        self._jobs: dict[int, tuple] = {}
        self._keys = itertools.count(1)
        self._callback = self._callback_type(self._work)  # kept alive as long as the team

    def _work(self, key: int) -> None:
        kernel, calls, errors = self._jobs[key]
        try:
            # A team smaller than asked for (OMP_THREAD_LIMIT, nesting) still runs every call.
            for i in range(self._thread_num(), len(calls), self._num_threads()):
                kernel(*calls[i])
        except BaseException as error:  # raised again on the calling thread
            errors.append(error)

    def __call__(self, kernel, calls: list[tuple]) -> None:
        key = next(self._keys)
        errors: list[BaseException] = []
        self._jobs[key] = (kernel, calls, errors)
        try:
            self._parallel(self._callback, key, len(calls), 0)
        finally:
            del self._jobs[key]
        if errors:
            raise errors[0]


_team: _OpenMPTeam | None = None
_team_checked = False
_forked = False


def _after_fork_in_child() -> None:
    # GNU OpenMP hangs in a forked child whose parent used it (torch's own ops do too, which is
    # why DataLoader workers run torch single-threaded): children use the pool.
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _openmp_team() -> _OpenMPTeam | None:
    """The team of torch's OpenMP runtime, when torch runs its ops on OpenMP (its default Linux
    build), the runtime exports GOMP_parallel, and this process is not a fork child."""
    global _team, _team_checked
    if _forked:
        return None
    if not _team_checked:
        _team_checked = True
        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            runtime = _loaded_library(("libgomp", "libiomp5", "libomp"))
            try:
                _team = None if runtime is None else _OpenMPTeam(ctypes.CDLL(runtime))
            except (OSError, AttributeError):
                _team = None
    return _team


def _loaded_library(names: tuple[str, ...]) -> str | None:
    """The path of the first already-loaded shared library whose file name starts with one of
    `names` (Linux: /proc/self/maps; elsewhere None)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if os.path.basename(path).startswith(names):
                    return path
    except OSError:
        pass
    return None


# ---- first compile: the backward kernels compile in a second process ------------------------
# A fresh install's first training step compiles the forward kernels of its walk, then the
# backward ones, about 5 s each here, one after the other: Numba compiles on one core, under a
# process-wide lock. So the first training forward of a walk and dtype starts a child process that
# compiles the backward kernels into the same on-disk cache on another core, and the backward waits
# for it and loads them. The child leaves a marker next to the cache once done, so later processes
# (their kernels cached) start none. Should the child fail, the backward compiles them itself.

_SAMPLES = {"nchw": ((2, 2, 32, 32), torch.contiguous_format),
            "lanes": ((4, 8, 7, 7), torch.contiguous_format),
            "rows": ((2, 8, 16, 16), torch.channels_last)}
_compilers: dict[tuple[str, torch.dtype], subprocess.Popen | None] = {}


def _ready_marker(kind: str, dtype: torch.dtype) -> str:
    """The file a child writes once the backward kernels of (kind, dtype) are in the cache; its
    name changes with this file's source and the Numba and Python versions (what the cache's
    validity depends on)."""
    here = os.path.abspath(__file__)
    cache_dir = numba.config.CACHE_DIR or os.path.join(os.path.dirname(here), "__pycache__")
    with open(here, "rb") as source:
        digest = hashlib.sha256(source.read())
    digest.update(f"{numba.__version__} {sys.version} {platform.machine()}".encode())
    return os.path.join(cache_dir, f"batchnorm-{kind}-{str(dtype)[6:]}-{digest.hexdigest()[:16]}"
                                   f".ready")


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _compile_backward_elsewhere(kind: str, dtype: torch.dtype) -> None:
    """Start the child compiling the backward kernels of (kind, dtype), once per process, unless
    their marker says an earlier process did. Not in a fork child, with one core (the child
    would only slow the parent), or when sys.executable is not a Python (an embedding binary such
    as uwsgi or a frozen app may not take `-c`)."""
    key = (kind, dtype)
    if key in _compilers:
        return
    _compilers[key] = None
    if _forked or _cores() < 2 or not os.path.basename(sys.executable).startswith("python"):
        return
    marker = _ready_marker(kind, dtype)
    if os.path.exists(marker) or not _writable(os.path.dirname(marker)):
        return  # cached already, or nothing the child compiled could reach us
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if numba.config.CACHE_DIR:
        env["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    code = f"from batchnorm.kernels import cpu; cpu._compile_backward({kind!r}, {str(dtype)!r})"
    try:
        _compilers[key] = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass


def _await_backward_compile(kind: str, dtype: torch.dtype) -> None:
    child = _compilers.get((kind, dtype))
    if child is not None and child.returncode is None:
        try:
            child.wait(timeout=120)  # ~10 s here; past this, compiling here costs less
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _compile_backward(kind: str, dtype_name: str) -> None:
    """The child's work: one backward through the `kind` walk in `dtype` compiles its kernels
    (the argument types are those of every call), then the marker."""
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    shape, fmt = _SAMPLES[kind]
    x = torch.rand(shape, dtype=dtype).contiguous(memory_format=fmt)
    assert _plan(x)[0] == kind, (kind, _plan(x))
    channels = torch.ones(shape[1], dtype=dtype)
    backward(x, x, channels, channels, channels, channels, None, None, "identity", 0.0, True,
             None, None, None, True)
    marker = _ready_marker(kind, dtype)
    with open(f"{marker}.{os.getpid()}", "w"):
        pass
    os.replace(f"{marker}.{os.getpid()}", marker)


def _rows_stats(xf: np.ndarray, p: int, c: int, eps: float, st_np: np.ndarray) -> None:
    ranges = _ranges(p, p * c)
    s1 = np.zeros((len(ranges), c))
    s2 = np.zeros((len(ranges), c))
    _run("rows_stats", [(xf, c, s1[t], s2[t], lo, hi) for t, (lo, hi) in enumerate(ranges)])
    typed = st_np.dtype.type
    _kernel("rows_stats_merge")(xf, p, typed(eps), typed(1), s1, s2, st_np)


def _batch_stats(x: Tensor, z: Tensor | None, y: Tensor | None, weight: Tensor | None,
                 bias: Tensor | None, eps: float, act: str, act_param: float) -> Tensor:
    """(4, C) count, mean, m2, invstd of `x`, and y = act(x_hat*weight + bias (+ z)) into `y`
    unless it is None: the fused training forward, and the `stats` op."""
    acc = _ACC[x.dtype]
    kind, p, c, s, group = _plan(x)
    if y is not None:
        _compile_backward_elsewhere(kind, x.dtype)
    st = torch.empty((4, c), dtype=acc)
    st_np, xf = st.numpy(), _flat(x)
    yf = xf if y is None else _flat(y)
    zf = xf if z is None else _flat(_like(z, x))
    w, b = _optional(weight, acc, st_np[0]), _optional(bias, acc, st_np[0])
    code, kv = ACT_CODES[act], _epilogue_constants(xf.dtype, act_param)
    eps_t, one = st_np.dtype.type(eps), st_np.dtype.type(1)
    flags = (weight is not None, bias is not None, z is not None)
    numel = x.numel()
    if kind == "rows":
        _rows_stats(xf, p, c, eps_t, st_np)
        if y is not None:
            _run("rows_forward", [(xf, zf, yf, c, st_np[1], st_np[3], w, b, *flags, code, kv,
                                   lo, hi) for lo, hi in _ranges(p, numel)])
    elif kind == "lanes":
        _run("lanes_forward", [(xf, zf, yf, p, c, s, st_np[1], st_np[3], w, b, *flags, True,
                                y is not None, eps_t, one, code, kv, st_np, group, lo, hi)
                               for lo, hi in _ranges(c, numel, group)])
    elif y is None:
        _run("nchw_stats", [(xf, p, c, s, one, one, st_np, lo, hi) for lo, hi in _ranges(c, numel)])
    else:
        _run("nchw_train_forward", [(xf, zf, yf, p, c, s, w, b, *flags, eps_t, one, code, kv,
                                     st_np, lo, hi) for lo, hi in _ranges(c, numel)])
    return st


@njit(cache=True, nogil=True)
def _update_running_stats(running_mean, running_var, tracked, count, mean, m2, momentum):
    # running_mean/var (C,) and tracked (0 or 1,) in place; count, mean, m2 (C,) the batch
    # statistics. The rule of `functional.update_running_stats`: lerp towards mean and
    # m2/(count - 1) by momentum, or (momentum < 0) by 1/num_batches_tracked after the
    # increment. Returns False and writes nothing when a statistic is not finite.
    for c in range(mean.shape[0]):
        if not (np.isfinite(mean[c]) and np.isfinite(m2[c])):
            return False
    for i in range(tracked.shape[0]):
        tracked[i] += 1
    factor = momentum if momentum >= 0.0 else 1.0 / tracked[0]
    for c in range(mean.shape[0]):
        running_mean[c] += factor * (mean[c] - running_mean[c])
        running_var[c] += factor * (m2[c] / (count[c] - 1) - running_var[c])
    return True


_NOT_TRACKED = np.zeros(0, np.int64)


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor | None, count: Tensor, mean: Tensor,
                         m2: Tensor, momentum: float | None) -> bool | None:
    """`functional.update_running_stats`'s rule in one Numba call: whether the statistics were
    finite (and so applied), or None when the tensors are not dense 1-d CPU tensors of one
    dtype (the caller then runs the torch ops). Why: right after a large kernel the caches are
    cold, and the update's ~10 small torch ops took ~400 us there, this ~150 us."""
    stats = (running_mean, running_var, count, mean, m2)
    dtype = mean.dtype
    if dtype not in _ACC or any(t.dtype != dtype or not t.is_cpu or t.ndim != 1
                                or not t.is_contiguous() or t.requires_grad for t in stats):
        return None
    tracked = _NOT_TRACKED
    if num_batches_tracked is not None:
        if num_batches_tracked.dtype != torch.int64 or num_batches_tracked.numel() != 1:
            return None
        tracked = num_batches_tracked.detach().numpy().reshape(1)
    if not _update_running_stats(running_mean.numpy(), running_var.numpy(), tracked,
                                 count.numpy(), mean.numpy(), m2.numpy(),
                                 -1.0 if momentum is None else momentum):
        return False
    # The in-place writes went around autograd's version counters: bump them, as lerp_ would.
    written = (running_mean, running_var)
    torch.autograd.graph.increment_version(
        written if num_batches_tracked is None else written + (num_batches_tracked,))
    return True


def stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of a non-empty (N, C, *spatial) tensor; see the module
    docstring for the numerics."""
    st = _batch_stats(x, None, None, None, None, 1.0, "identity", 0.0)
    # Separate tensors: custom-op outputs may not alias each other.
    return st[0].clone(), st[1].clone(), st[2].clone()


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor | None,
                  eps: float, act: str, act_param: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics and normalization in one pass per channel block. Returns (y, count, mean, m2,
    invstd)."""
    y = _empty_like(x)
    return (y,) + _batch_stats(x, z, y, weight, bias, eps, act, act_param).unbind(0)


def forward(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
            z: Tensor | None, act: str, act_param: float) -> Tensor:
    """y = act(weight * (x - mean) * invstd + bias (+ z)) with the given statistics."""
    acc = _ACC[x.dtype]
    kind, p, c, s, group = _plan(x)
    y = _empty_like(x)
    mean_np, xf = _vector(mean, acc), _flat(x)
    args = (xf, xf if z is None else _flat(_like(z, x)), _flat(y))
    params = (mean_np, _vector(invstd, acc), _optional(weight, acc, mean_np),
              _optional(bias, acc, mean_np), weight is not None, bias is not None, z is not None)
    code, kv = ACT_CODES[act], _epilogue_constants(xf.dtype, act_param)
    numel = x.numel()
    if kind == "rows":
        _run("rows_forward", [args + (c,) + params + (code, kv) + r for r in _ranges(p, numel)])
    elif kind == "lanes":
        one, no_stats = mean_np.dtype.type(1), np.empty((4, 0), mean_np.dtype)
        _run("lanes_forward", [args + (p, c, s) + params + (False, True, one, one, code, kv,
                                                            no_stats, group) + r
                               for r in _ranges(c, numel, group)])
    else:
        _run("nchw_forward", [args + (p, c, s) + params + (code, kv) + r
                              for r in _ranges(p * c, numel)])
    return y


def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
             bias: Tensor | None, z: Tensor | None, y: Tensor | None, act: str, act_param: float,
             training: bool, count: Tensor | None, sum_dy: Tensor | None,
             sum_dy_xhat: Tensor | None, input_grad: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form backward, (dx, dweight, dbias, dz): the formulas of `native.backward`, with
    g = dy*act'(pre) recomputed from x (and z), so `y` is not read."""
    acc = _ACC[x.dtype]
    kind, p, c, s, group = _plan(x)
    _await_backward_compile(kind, x.dtype)
    dy = _like(dy, x)
    need_sums = sum_dy is None or sum_dy_xhat is None
    if need_sums:
        # Two allocations, not one split in two: custom-op outputs may not alias each other.
        sum_dy, sum_dy_xhat = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
    sums = (_vector(sum_dy, acc), _vector(sum_dy_xhat, acc))
    dx = _empty_like(x) if input_grad else None
    write_dz = z is not None and act != "identity"
    dz = _empty_like(x) if write_dz else None
    mean_np, xf = _vector(mean, acc), _flat(x)
    tensors = (_flat(dy), xf, xf if z is None else _flat(_like(z, x)))
    outputs = (xf if dx is None else _flat(dx), _flat(dz) if write_dz else xf)
    params = (mean_np, _vector(invstd, acc), _optional(weight, acc, mean_np),
              _optional(bias, acc, mean_np), weight is not None, bias is not None, z is not None,
              ACT_CODES[act], _epilogue_constants(xf.dtype, act_param), training,
              count is not None, mean_np if count is None else _vector(count, acc))
    flags = (need_sums, input_grad, write_dz)
    numel = x.numel()
    if kind == "rows":
        ranges = _ranges(p, numel)
        sg, sgx = np.zeros((len(ranges), c)), np.zeros((len(ranges), c))
        if need_sums:
            _run("rows_grad_sums", [tensors + (c,) + params[:9] + (sg[t], sgx[t], lo, hi)
                                    for t, (lo, hi) in enumerate(ranges)])
        _run("rows_grad_input", [tensors + outputs + (p, c) + params + (sg, sgx) + sums + flags
                                 + r for r in ranges])
    elif kind == "lanes":
        _run("lanes_backward", [tensors + outputs + (p, c, s) + params + sums + flags + (group,)
                                + r for r in _ranges(c, numel, group)])
    else:
        _run("nchw_backward", [tensors + outputs + (p, c, s) + params + sums + flags + r
                               for r in _ranges(c, numel)])
    if dx is None:
        dx = x.new_empty(0)
    if z is None:
        dz = x.new_empty(0)
    elif not write_dz:
        dz = dy
    return dx, sum_dy_xhat, sum_dy, dz if z is None or dz.dtype == z.dtype else dz.to(z.dtype)
