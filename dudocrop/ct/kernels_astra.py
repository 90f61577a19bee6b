"""astra-toolbox backend for flat detectors: CPU ``line_fanflat`` FP/BP and, on CUDA, FP_CUDA, BP_CUDA and
FBP_CUDA. astra has no 2-D curved detector and no CPU fan-beam FBP (REFERENCE §4); the operator falls back to
the project's own filtered backprojection for the latter.

The geometry is handed over as ``fanflat_vec`` rows built from the same source/detector vectors as the
project's kernels, so both agree on every convention by construction.
"""

from __future__ import annotations

import numpy as np

from dudocrop.ct.geometry import FanBeamGeometry


def _astra():
    try:
        import astra
    except ImportError as e:  # pragma: no cover - astra is a core dependency
        raise ImportError("backend='astra' needs astra-toolbox (pip install astra-toolbox)") from e
    return astra


def cuda_available() -> bool:
    astra = _astra()
    try:
        return bool(astra.use_cuda())
    except Exception:  # noqa: BLE001 - astra raises various errors without a GPU
        return False


def _geoms(g: FanBeamGeometry):
    if g.detector != "flat":
        raise ValueError(
            f"backend='astra' supports flat detectors only; geometry {g.name!r} has a {g.detector} detector "
            "(use backend='numba' or 'torch')"
        )
    astra = _astra()
    src, e_c, e_u = g.view_frames
    centre = src + g.sdd * e_c + (g.channel_offset * g.channel_spacing) * e_u
    # astra's detector u-vector points from pixel 0 to pixel 1; its y axis points to row 0, as ours.
    vec = np.concatenate([src, centre, g.channel_spacing * e_u], axis=1)
    proj = astra.create_proj_geom("fanflat_vec", g.n_channels, vec)
    r = g.fov_radius
    vol = astra.create_vol_geom(g.image_size, g.image_size, -r, r, -r, r)
    return astra, vol, proj


def _run(g: FanBeamGeometry, kind: str, data: np.ndarray, use_cuda: bool) -> np.ndarray:
    astra, vol, proj = _geoms(g)
    if kind == "FP":
        in_id = astra.data2d.create("-vol", vol, data)
        out_id = astra.data2d.create("-sino", proj, 0)
    else:
        in_id = astra.data2d.create("-sino", proj, data)
        out_id = astra.data2d.create("-vol", vol, 0)
    pid = None
    try:
        cfg = astra.astra_dict(f"{kind}_CUDA" if use_cuda else kind)
        if not use_cuda:
            pid = astra.create_projector("line_fanflat", proj, vol)
            cfg["ProjectorId"] = pid
        if kind == "FP":
            cfg["VolumeDataId"], cfg["ProjectionDataId"] = in_id, out_id
        else:
            cfg["ProjectionDataId"], cfg["ReconstructionDataId"] = in_id, out_id
        alg = astra.algorithm.create(cfg)
        try:
            astra.algorithm.run(alg)
        finally:
            astra.algorithm.delete(alg)
        return astra.data2d.get(out_id).astype(np.float32)
    finally:
        astra.data2d.delete([in_id, out_id])
        if pid is not None:
            astra.projector.delete(pid)


def fp(g: FanBeamGeometry, img: np.ndarray, use_cuda: bool) -> np.ndarray:
    return _run(g, "FP", img, use_cuda)


def bp(g: FanBeamGeometry, sino: np.ndarray, use_cuda: bool) -> np.ndarray:
    return _run(g, "BP", sino, use_cuda)


def fbp_cuda(g: FanBeamGeometry, sino: np.ndarray) -> np.ndarray:
    return _run(g, "FBP", sino, True)
