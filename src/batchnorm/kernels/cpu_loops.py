"""The Numba loops of the CPU kernels: every per-element formula and walk, and no torch.

`cpu` is the host side (tensors to arrays, the walk and thread split, the custom-op interface);
this module imports only numpy and Numba, so that the process that compiles the backward kernels
on a fresh install (`cpu._compile_backward_elsewhere`) starts without importing torch (2-3 s
here, which was the first step's critical path).

Numerics: statistics accumulate in float64 from d = x - shift, the shift being the channel's
first element, so m2 = sum(d^2) - sum(d)^2/M does not cancel when |mean| >> std. Every partial of a
channel uses the same shift, so plain addition is the exact merge of partials (Chan's merge
reduces to it). The normalize and dx passes compute in x's dtype with per-channel coefficients
formed in float64, from x - mean (exact where x is near the mean; see `_affine`).

Kernels compile lazily with `cache=True`, one specialization per kernel and dtype (activation,
residual and affine are runtime arguments); when the package directory is read-only the cache goes
to a user directory (`_choose_cache_dir`).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import BinaryIO

import numpy as np

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
# every element is stored. v + 0 is v, except that -0.0 becomes +0.0 (torch.relu keeps -0.0;
# the two compare equal).

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


def _part(coefficient, start, length):
    """coefficient[start:start + length] of a per-element coefficient array; a scalar itself."""


@overload(_part)
def _part_impl(coefficient, start, length):
    if isinstance(coefficient, types.Array):
        return lambda coefficient, start, length: coefficient[start:start + length]
    return lambda coefficient, start, length: coefficient


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


@njit(**_INLINE)
def _normalize_rows(x, z, y, start, stride, rows, w, a, m, b, has_z, code, k):
    """`_normalize` over `rows` rows of w lanes at start + r*stride, a, m, b (w,) arrays or
    scalars: four rows per loop, chunk by chunk (the chunks stay in L1 for the activation). Four
    streams in flight at once read and write memory at ~1.4x the speed of one row after another
    (measured: a lanes normalize over 64x256x14x14 from memory, 0.77 against 1.10 ms). The last
    rows % 4 rows take the same loop with rows repeated (same values written twice), each row
    activated once."""
    last = start + (rows - 1) * stride
    for r in range(0, rows, 4):
        distinct = min(4, rows - r)
        for j0 in range(0, w, _CHUNK):
            n = min(w - j0, _CHUNK)
            o0 = start + r * stride + j0
            o1 = min(o0 + stride, last + j0)
            o2 = min(o0 + 2 * stride, last + j0)
            o3 = min(o0 + 3 * stride, last + j0)
            x0, x1, x2, x3 = x[o0:o0 + n], x[o1:o1 + n], x[o2:o2 + n], x[o3:o3 + n]
            y0, y1, y2, y3 = y[o0:o0 + n], y[o1:o1 + n], y[o2:o2 + n], y[o3:o3 + n]
            aa, mm, bb = _part(a, j0, n), _part(m, j0, n), _part(b, j0, n)
            for j in range(n):
                y0[j] = _at(aa, j) * (x0[j] - _at(mm, j)) + _at(bb, j)
                y1[j] = _at(aa, j) * (x1[j] - _at(mm, j)) + _at(bb, j)
                y2[j] = _at(aa, j) * (x2[j] - _at(mm, j)) + _at(bb, j)
                y3[j] = _at(aa, j) * (x3[j] - _at(mm, j)) + _at(bb, j)
            for i in range(distinct):
                o = o0 + i * stride
                if has_z:
                    _add(y[o:o + n], z[o:o + n])
                _activate(y[o:o + n], code, k)


@njit(**_INLINE)
def _add(y, z):
    """y += z over a slice."""
    for j in range(y.shape[0]):
        y[j] += z[j]


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
def _pass_grad(dy, v, k, code, identity):
    """dy*act'(v) for identity (dy) and the rectifiers (`_rectifier_grad`)."""
    return dy if identity else _rectifier_grad(dy, v, k, code)


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


@njit(**_INLINE)
def _input_grad_rows(dy, x, z, dx, dz, buf, start, stride, rows, w, a, m, b, p, q, has_z, code,
                     k, write_dx, write_dz):
    """`_input_grad` over `rows` rows of w lanes at start + r*stride, the coefficients (w,)
    arrays or scalars; for identity four rows per loop, as `_normalize_rows` (the rectifiers too
    measured ~10% faster that way, but doubled the kernel's first compile)."""
    r = 0
    if write_dx and code == IDENTITY:
        while r + 4 <= rows:
            for j0 in range(0, w, _CHUNK):
                n = min(w - j0, _CHUNK)
                o0 = start + r * stride + j0
                o1, o2, o3 = o0 + stride, o0 + 2 * stride, o0 + 3 * stride
                x0, x1, x2, x3 = x[o0:o0 + n], x[o1:o1 + n], x[o2:o2 + n], x[o3:o3 + n]
                d0, d1, d2, d3 = dy[o0:o0 + n], dy[o1:o1 + n], dy[o2:o2 + n], dy[o3:o3 + n]
                g0, g1, g2, g3 = dx[o0:o0 + n], dx[o1:o1 + n], dx[o2:o2 + n], dx[o3:o3 + n]
                aa, mm = _part(a, j0, n), _part(m, j0, n)
                pp, qq = _part(p, j0, n), _part(q, j0, n)
                for j in range(n):
                    av, mv, pv, qv = _at(aa, j), _at(mm, j), _at(pp, j), _at(qq, j)
                    g0[j] = av * d0[j] + pv * (x0[j] - mv) + qv
                    g1[j] = av * d1[j] + pv * (x1[j] - mv) + qv
                    g2[j] = av * d2[j] + pv * (x2[j] - mv) + qv
                    g3[j] = av * d3[j] + pv * (x3[j] - mv) + qv
            r += 4
    piece = w if code == IDENTITY or _rectified(code, has_z) else _CHUNK  # buf in L1
    for r in range(r, rows):
        for j0 in range(0, w, piece):
            n = min(w - j0, piece)
            o = start + r * stride + j0
            _input_grad(dy[o:o + n], x[o:o + n], z[o:o + n], dx[o:o + n], dz[o:o + n], buf,
                        _part(a, j0, n), _part(m, j0, n), _part(b, j0, n), _part(p, j0, n),
                        _part(q, j0, n), has_z, code, k, write_dx, write_dz)


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
    m2 = sum(d^2) - sum(d)^2/M, M = n*s. Four rows per loop: four streams in flight read memory
    ~1.35x faster than one row after another (the rows lie C*S apart)."""
    shift = np.float64(x[ch * s])
    s1 = 0.0
    s2 = 0.0
    stride = c * s
    i = 0
    while i + 4 <= n:
        o0 = (i * c + ch) * s
        o1, o2, o3 = o0 + stride, o0 + 2 * stride, o0 + 3 * stride
        x0, x1, x2, x3 = x[o0:o0 + s], x[o1:o1 + s], x[o2:o2 + s], x[o3:o3 + s]
        for j in range(s):
            d0, d1, d2, d3 = x0[j] - shift, x1[j] - shift, x2[j] - shift, x3[j] - shift
            s1 += (d0 + d1) + (d2 + d3)
            s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        i += 4
    for i in range(i, n):
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
        _normalize_rows(x, z, y, ch * s, c * s, n, s, ab[0], st[1, ch], ab[1], has_z, code, k)


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
            i = 0
            if code == IDENTITY or _rectified(code, has_z):
                # Four rows per loop, as `_nchw_stats`.
                identity = code == IDENTITY
                while i + 4 <= n:
                    o0 = (i * c + ch) * s
                    o1, o2, o3 = o0 + c * s, o0 + 2 * c * s, o0 + 3 * c * s
                    x0, x1, x2, x3 = x[o0:o0 + s], x[o1:o1 + s], x[o2:o2 + s], x[o3:o3 + s]
                    d0, d1, d2, d3 = dy[o0:o0 + s], dy[o1:o1 + s], dy[o2:o2 + s], dy[o3:o3 + s]
                    for j in range(s):
                        e0, e1 = np.float64(x0[j]) - mu, np.float64(x1[j]) - mu
                        e2, e3 = np.float64(x2[j]) - mu, np.float64(x3[j]) - mu
                        g0 = _pass_grad(d0[j], coef[0] * (x0[j] - coef[2]) + coef[1], k, code,
                                        identity)
                        g1 = _pass_grad(d1[j], coef[0] * (x1[j] - coef[2]) + coef[1], k, code,
                                        identity)
                        g2 = _pass_grad(d2[j], coef[0] * (x2[j] - coef[2]) + coef[1], k, code,
                                        identity)
                        g3 = _pass_grad(d3[j], coef[0] * (x3[j] - coef[2]) + coef[1], k, code,
                                        identity)
                        sg += (g0 + g1) + (g2 + g3)
                        sgx += (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3)
                    i += 4
            for i in range(i, n):
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
            _input_grad_rows(dy, x, z, dx, dz, buf, ch * s, c * s, n, s, coef[0], coef[2],
                             coef[1], coef[3], coef[4], has_z, code, k, write_dx, write_dz)


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
            _normalize_rows(x, z, y, l0, width, p_rows, w, a, mu, b, has_z, code, k)


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
            _input_grad_rows(dy, x, z, dx, dz, buf, l0, width, p_rows, w, a[:w], mu[:w], b[:w],
                             pp[:w], qq[:w], has_z, code, k, write_dx, write_dz)


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


# ---- the kernels by name (`kernel`) ----------------------------------------------------------

_SOURCES = {f.__name__[1:-len("_kernel")]: f for f in (
    _nchw_stats_kernel, _nchw_train_forward_kernel, _nchw_forward_kernel, _nchw_backward_kernel,
    _lanes_forward_kernel, _lanes_backward_kernel, _rows_stats_kernel, _rows_stats_merge_kernel,
    _rows_forward_kernel, _rows_grad_sums_kernel, _rows_grad_input_kernel)}
_compiled: dict = {}


def kernel(name: str):
    """The compiled kernel `name` (a key of _SOURCES), made on first use."""
    compiled = _compiled.get(name)
    if compiled is None:
        compiled = _compiled[name] = njit(**_FLAGS)(_SOURCES[name])
    return compiled


def compile_signatures(stream: BinaryIO, marker: str) -> None:
    """The compiling child's work (`cpu._compile_backward_elsewhere`): compile, into the on-disk
    cache, the kernels and argument types pickled in `stream` as [(name, (numba type, ...))],
    then create the file `marker`."""
    for name, signature in pickle.load(stream):
        kernel(name).compile(signature)
    with open(f"{marker}.{os.getpid()}", "w"):
        pass
    os.replace(f"{marker}.{os.getpid()}", marker)
