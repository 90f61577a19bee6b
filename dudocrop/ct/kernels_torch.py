"""Device-agnostic torch kernels (the CUDA path; also runs on CPU, where it cross-checks the numba
kernels): the same Joseph projector, its exact adjoint, and the FBP backprojection, vectorised over
chunks of views so memory stays bounded at any image size.
"""

from __future__ import annotations

import torch

#: elements per temporary tensor; ~ 64 MB of float32 per temporary.
_CHUNK_ELEMS = 1 << 24


def _joseph_indices(src: torch.Tensor, dirs: torch.Tensor, n: int, pixel: float):
    """For rays (R,) return flat pixel indices (R, n, 2) and weights (R, n, 2) of Joseph's method,
    already multiplied by the path length per step; out-of-image taps get weight 0."""
    half = (n - 1) * 0.5
    sx, sy = src[:, 0:1], src[:, 1:2]
    dx, dy = dirs[:, 0:1], dirs[:, 1:2]
    horiz = dx.abs() >= dy.abs()
    k = torch.arange(n, device=src.device, dtype=src.dtype)[None, :]
    ddx = torch.where(dx == 0, torch.full_like(dx, 1e-30), dx)
    ddy = torch.where(dy == 0, torch.full_like(dy, 1e-30), dy)
    # horizontal-major: column k, fractional row; vertical-major: row k, fractional column
    sec_h = half - (sy + ((k - half) * pixel - sx) * dy / ddx) / pixel
    sec_v = (sx + ((half - k) * pixel - sy) * dx / ddy) / pixel + half
    sec = torch.where(horiz, sec_h, sec_v)
    lo = torch.floor(sec)
    w1 = sec - lo
    lo = lo.long()
    kk = k.long().expand_as(lo)
    scale = torch.where(horiz, pixel / dx.abs(), pixel / dy.abs())
    idx = []
    wts = []
    for off, w in ((0, 1.0 - w1), (1, w1)):
        s = lo + off
        ok = (s >= 0) & (s < n)
        s = s.clamp(0, n - 1)
        flat = torch.where(horiz, s * n + kk, kk * n + s)
        idx.append(flat)
        wts.append(torch.where(ok, w, torch.zeros_like(w)) * scale)
    return torch.stack(idx, -1), torch.stack(wts, -1)


def _view_chunks(n_views: int, per_view: int, batch: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_view * max(batch, 1)))
    for v0 in range(0, n_views, step):
        yield slice(v0, min(n_views, v0 + step))


def fp_joseph(img: torch.Tensor, src: torch.Tensor, dirs: torch.Tensor, pixel: float) -> torch.Tensor:
    """img (N, H, W) -> (N, V, C)."""
    nb, n, _ = img.shape
    n_views, n_ch, _ = dirs.shape
    flat = img.reshape(nb, n * n)
    out = img.new_empty(nb, n_views, n_ch)
    for sl in _view_chunks(n_views, n_ch * n * 2, nb):
        nv = sl.stop - sl.start
        s = src[sl, None, :].expand(nv, n_ch, 2).reshape(-1, 2)
        d = dirs[sl].reshape(-1, 2)
        idx, w = _joseph_indices(s, d, n, pixel)
        vals = flat[:, idx.reshape(-1)].reshape(nb, *idx.shape)
        out[:, sl] = (vals * w).sum((-1, -2)).reshape(nb, nv, n_ch)
    return out


def bp_joseph(sino: torch.Tensor, src: torch.Tensor, dirs: torch.Tensor, pixel: float, n: int) -> torch.Tensor:
    """Exact adjoint of :func:`fp_joseph`: (N, V, C) -> (N, H, W)."""
    nb, n_views, n_ch = sino.shape
    out = sino.new_zeros(nb, n * n)
    for sl in _view_chunks(n_views, n_ch * n * 2, nb):
        nv = sl.stop - sl.start
        s = src[sl, None, :].expand(nv, n_ch, 2).reshape(-1, 2)
        d = dirs[sl].reshape(-1, 2)
        idx, w = _joseph_indices(s, d, n, pixel)
        vals = sino[:, sl].reshape(nb, -1, 1, 1) * w
        out.index_add_(1, idx.reshape(-1), vals.reshape(nb, -1))
    return out.reshape(nb, n, n)


def bp_fbp(q: torch.Tensor, src: torch.Tensor, e_c: torch.Tensor, e_u: torch.Tensor, pixel: float,
           n: int, curved: bool, step: float, first: float, sid: float, sdd: float,
           dbeta: float) -> torch.Tensor:
    """Distance-weighted pixel-driven FBP backprojection: filtered (N, V, C) -> (N, H, W)."""
    nb, n_views, n_ch = q.shape
    half = (n - 1) * 0.5
    k = (torch.arange(n, device=q.device, dtype=src.dtype) - half) * pixel
    ys, xs = torch.meshgrid(-k, k, indexing="ij")
    px, py = xs.reshape(1, -1), ys.reshape(1, -1)
    out = q.new_zeros(nb, n * n)
    for sl in _view_chunks(n_views, n * n, nb):
        rx = px - src[sl, 0:1]
        ry = py - src[sl, 1:2]
        lc = rx * e_c[sl, 0:1] + ry * e_c[sl, 1:2]
        lu = rx * e_u[sl, 0:1] + ry * e_u[sl, 1:2]
        if curved:
            coord = torch.atan2(lu, lc)
            wgt = 1.0 / (rx * rx + ry * ry)
        else:
            coord = sdd * lu / lc
            wgt = (sid / lc) ** 2
        kf = (coord - first) / step
        ok = (kf >= 0) & (kf <= n_ch - 1)
        k0 = kf.floor().clamp(0, n_ch - 1)
        w1 = (kf - k0).to(q.dtype)
        k0 = k0.long()
        k1 = (k0 + 1).clamp(max=n_ch - 1)
        qv = q[:, sl]
        g0 = torch.gather(qv, 2, k0.unsqueeze(0).expand(nb, -1, -1))
        g1 = torch.gather(qv, 2, k1.unsqueeze(0).expand(nb, -1, -1))
        val = (1 - w1) * g0 + w1 * g1
        out += (val * torch.where(ok, wgt, torch.zeros_like(wgt)).to(q.dtype)).sum(1)
    return (out * dbeta).reshape(nb, n, n)
