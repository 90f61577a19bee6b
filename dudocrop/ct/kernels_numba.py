"""CPU kernels (numba, multi-threaded): Joseph ray-driven forward projection, its exact adjoint, and
the distance-weighted pixel-driven backprojection of fan-beam FBP.

Every ray is given by a source point and a unit direction computed once in ``geometry.py``, so one
kernel serves curved and flat detectors alike. Joseph's method steps along the ray's major axis one
pixel column (or row) at a time and interpolates linearly across the minor axis; the sum is scaled by
the path length per step, ``pixel / |cos|``. The backprojection is the transpose of exactly those
weights, so ``<FP x, y> = <x, BP y>`` holds to rounding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True, inline="always")
def _ray_setup(sx, sy, dx, dy, n, pixel):
    """(horizontal-major?, scale) for a ray; the scale is the path length per step."""
    horiz = abs(dx) >= abs(dy)
    scale = pixel / abs(dx) if horiz else pixel / abs(dy)
    return horiz, scale


@njit(cache=True, fastmath=True, inline="always")
def _atan(t):
    """atan for |t| < 1 without libm (vectorisable): one half-angle reduction
    atan(t) = 2 atan(t / (1 + sqrt(1 + t^2))) then the odd Taylor series to t^15; the error is below
    1e-9 rad for |t| <= 0.6, far under a channel (1e-3 rad) for any clinical fan."""
    u = t / (1.0 + math.sqrt(1.0 + t * t))
    u2 = u * u
    p = -1.0 / 15.0
    p = 1.0 / 13.0 + u2 * p
    p = -1.0 / 11.0 + u2 * p
    p = 1.0 / 9.0 + u2 * p
    p = -1.0 / 7.0 + u2 * p
    p = 1.0 / 5.0 + u2 * p
    p = -1.0 / 3.0 + u2 * p
    return 2.0 * u * (1.0 + u2 * p)


def nonzero_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """(row_lo, row_hi, col_lo, col_hi), half-open, of the nonzero pixels (an empty box for an all-zero image)."""
    rows = np.flatnonzero(img.any(axis=1))
    if rows.size == 0:
        return 0, 0, 0, 0
    cols = np.flatnonzero(img.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


@njit(cache=True, fastmath=True, parallel=True)
def fp_joseph(img, src, dirs, pixel, out, box):
    """img (H, W) -> out (V, C); src (V, 2), dirs (V, C, 2) in world mm. ``box`` = :func:`nonzero_box` (img):
    rays step only through its columns (rows) and interpolate only inside its rows (columns); pixels outside are
    zero, so the sum is unchanged and sparse maps (metal, its displaced tissue) cost a fraction of a full FP."""
    n = img.shape[0]
    half = (n - 1) * 0.5
    n_views, n_ch = out.shape
    i_lo, i_hi, j_lo, j_hi = box[0], box[1], box[2], box[3]
    for v in prange(n_views):
        sx = src[v, 0]
        sy = src[v, 1]
        for c in range(n_ch):
            dx = dirs[v, c, 0]
            dy = dirs[v, c, 1]
            horiz, scale = _ray_setup(sx, sy, dx, dy, n, pixel)
            acc = 0.0
            if horiz:
                # row coordinate r(j) = half - (sy + (x_j - sx) dy/dx) / pixel, linear in column j
                slope = -(dy / dx)
                r0 = half - (sy + ((0 - half) * pixel - sx) * dy / dx) / pixel
                for j in range(j_lo, j_hi):
                    r = r0 + slope * j
                    if r <= i_lo - 1.0 or r >= i_hi:
                        continue
                    i0 = int(math.floor(r))
                    w = r - i0
                    if i0 >= 0:
                        acc += (1.0 - w) * img[i0, j]
                    if i0 + 1 < n:
                        acc += w * img[i0 + 1, j]
            else:
                # column coordinate c(i) = (sx + (y_i - sy) dx/dy) / pixel + half, y_i = (half - i) pixel
                slope = -(dx / dy)
                c0 = (sx + (half * pixel - sy) * dx / dy) / pixel + half
                for i in range(i_lo, i_hi):
                    cc = c0 + slope * i
                    if cc <= j_lo - 1.0 or cc >= j_hi:
                        continue
                    j0 = int(math.floor(cc))
                    w = cc - j0
                    if j0 >= 0:
                        acc += (1.0 - w) * img[i, j0]
                    if j0 + 1 < n:
                        acc += w * img[i, j0 + 1]
            out[v, c] = acc * scale


@njit(cache=True, fastmath=True, parallel=True)
def bp_joseph(sino, src, dirs, pixel, out, n_threads):
    """Exact adjoint of :func:`fp_joseph`: sino (V, C) -> out (H, W) (overwritten)."""
    n = out.shape[0]
    half = (n - 1) * 0.5
    n_views, n_ch = sino.shape
    acc_imgs = np.zeros((n_threads, n, n), dtype=out.dtype)
    for t in prange(n_threads):
        img = acc_imgs[t]
        for v in range(t, n_views, n_threads):
            sx = src[v, 0]
            sy = src[v, 1]
            for c in range(n_ch):
                dx = dirs[v, c, 0]
                dy = dirs[v, c, 1]
                horiz, scale = _ray_setup(sx, sy, dx, dy, n, pixel)
                val = sino[v, c] * scale
                if val == 0.0:
                    continue
                if horiz:
                    slope = -(dy / dx)
                    r0 = half - (sy + ((0 - half) * pixel - sx) * dy / dx) / pixel
                    for j in range(n):
                        r = r0 + slope * j
                        if r <= -1.0 or r >= n:
                            continue
                        i0 = int(math.floor(r))
                        w = r - i0
                        if i0 >= 0:
                            img[i0, j] += (1.0 - w) * val
                        if i0 + 1 < n:
                            img[i0 + 1, j] += w * val
                else:
                    slope = -(dx / dy)
                    c0 = (sx + (half * pixel - sy) * dx / dy) / pixel + half
                    for i in range(n):
                        cc = c0 + slope * i
                        if cc <= -1.0 or cc >= n:
                            continue
                        j0 = int(math.floor(cc))
                        w = cc - j0
                        if j0 >= 0:
                            img[i, j0] += (1.0 - w) * val
                        if j0 + 1 < n:
                            img[i, j0 + 1] += w * val
    for i in prange(n):
        for j in range(n):
            s = 0.0
            for t in range(n_threads):
                s += acc_imgs[t, i, j]
            out[i, j] = s


@njit(cache=True, fastmath=True, parallel=True)
def bp_fbp(q, src, e_c, e_u, pixel, curved, step, first, sid, sdd, dbeta, out):
    """Pixel-driven, distance-weighted fan-beam backprojection of filtered data ``q`` (V, C).

    For a pixel P and view v: r = P - S_v, l = r.e_c, s = r.e_u. Curved: the channel coordinate is
    gamma = atan2(s, l) and the weight 1/|r|^2 = 1/(l^2 + s^2) (e_c, e_u orthonormal); flat: u = SDD s / l and
    the weight (SID / l)^2. ``first`` is the coordinate of channel 0 and ``step`` the channel pitch in that
    coordinate. Along an image row l and s are linear in the column, so the inner loop runs over the row for one
    view at a time: no per-pixel dot products, contiguous accumulation, and one filtered view row in cache.
    """
    n = out.shape[0]
    half = (n - 1) * 0.5
    n_views, n_ch = q.shape
    inv_step = 1.0 / step
    kmax = n_ch - 1.0
    for i in prange(n):
        y = (half - i) * pixel
        row = np.zeros(n)
        for v in range(n_views):
            rx0 = -half * pixel - src[v, 0]
            ry = y - src[v, 1]
            lc0 = rx0 * e_c[v, 0] + ry * e_c[v, 1]
            lu0 = rx0 * e_u[v, 0] + ry * e_u[v, 1]
            dlc = pixel * e_c[v, 0]
            dlu = pixel * e_u[v, 0]
            qv = q[v]
            if curved:
                for j in range(n):
                    lc = lc0 + j * dlc  # > 0: the source lies outside the image
                    lu = lu0 + j * dlu
                    k = (_atan(lu / lc) - first) * inv_step
                    if k >= 0.0 and k <= kmax:
                        k0 = int(k)
                        w = k - k0
                        k1 = min(k0 + 1, n_ch - 1)
                        row[j] += ((1.0 - w) * qv[k0] + w * qv[k1]) / (lc * lc + lu * lu)
            else:
                for j in range(n):
                    lc = lc0 + j * dlc
                    lu = lu0 + j * dlu
                    k = (sdd * lu / lc - first) * inv_step
                    if k >= 0.0 and k <= kmax:
                        k0 = int(k)
                        w = k - k0
                        k1 = min(k0 + 1, n_ch - 1)
                        row[j] += ((1.0 - w) * qv[k0] + w * qv[k1]) * (sid / lc) ** 2
        for j in range(n):
            out[i, j] = row[j] * dbeta


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
