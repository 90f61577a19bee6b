"""The AAPM presets against the CT-MAR challenge's own forward projector (issue 19 §1).

The reference is gecatsim's distance-driven ``DD2FanProj`` (xcist, the challenge's simulator package), called with
the geometry that the challenge's ``AAPM_datachallenge/AAPMProj.py`` (xcist/example) passes it: source at
(0, SID), detector cells at (SDD sin a_i, SID - SDD cos a_i), a_i = (i - (900-1)/2 - 1.25) da,
da = 2 atan(0.5/950), views at 2 pi v/(V-1), the image as a row-major 512 x 512 array of mu = 0.02 (1 + HU/1000),
line integrals scaled by the pixel size; all lengths in pixels. None of that goes through this project's geometry.
"""

from __future__ import annotations

import ctypes
import json
import math
import os

import numpy as np
import pytest
import torch
from gecatsim.pyfiles.CommonTools import load_C_lib
from numpy.ctypeslib import ndpointer

from dudocrop.ct.geometry import CONVENTION_VERSION, check_convention, get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.phantoms import Ellipse, EllipsePhantom, body_mask, load_ct_small
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import hu_to_mu, mu_to_hu
from dudocrop.data import aapm
from dudocrop.data.shards import read_manifest, write_manifest

# The challenge's scanner as AAPMProj.py writes it (its own numbers, not this project's presets).
SID, SDD, N_COLS, N_VIEWS, COL_OFFSET, COL_SIZE = 550.0, 950.0, 900, 1000, -1.25, 1.0
FOV = {"aapm_body": 400.0, "aapm_head": 220.16}  # AAPMProj.py: 'o' -> 400, 'h' -> 220.16 mm over 512 pixels


def challenge_fp(mu: np.ndarray, fov: float, n_views: int = N_VIEWS, n_cols: int = N_COLS,
                 col_offset: float = COL_OFFSET, col_size: float = COL_SIZE, spacing: str = "aapmproj") -> np.ndarray:
    """(V, C) line integrals of a row-major (n, n) mu image by gecatsim's DD2FanProj, set up as AAPMProj.py does.

    ``spacing='aapmproj'`` spaces the views by 2 pi/(V-1) as that script does; ``'protocol'`` by 2 pi/V as the
    challenge's simulator protocol (viewsPerRotation 1000) does."""
    n = mu.shape[0]
    pix = fov / n
    dalpha = 2.0 * np.arctan2(col_size / 2, SDD)
    alphas = (np.arange(n_cols) - (n_cols - 1) / 2 + col_offset) * dalpha
    xds = np.single(SDD * np.sin(alphas) / pix)
    yds = np.single((SID - SDD * np.cos(alphas)) / pix)
    step = 2 * np.pi / ((n_views - 1) if spacing == "aapmproj" else n_views)
    viewangles = np.single(np.arange(n_views) * step)
    sino = np.zeros([n_views, n_cols, 1], dtype=np.single)
    f = load_C_lib().DD2FanProj
    f.argtypes = [ctypes.c_int, ctypes.c_float, ctypes.c_float, ndpointer(ctypes.c_float), ndpointer(ctypes.c_float),
                  ctypes.c_float, ctypes.c_float, ndpointer(ctypes.c_float), ctypes.c_int, ndpointer(ctypes.c_float),
                  ctypes.c_int, ctypes.c_int, ndpointer(ctypes.c_float)]
    f.restype = None
    f(n_cols, 0.0, SID / pix, xds, yds, 0.0, 0.0, viewangles, n_views, sino, n, n,
      np.ascontiguousarray(mu, dtype=np.single))
    return sino[..., 0] * pix


def rel_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def fp(op: FanBeamOperator, mu: np.ndarray) -> np.ndarray:
    return op.fp(torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32))[None, None])[0, 0].numpy()


def off_centre_phantom(name: str) -> np.ndarray:
    """HU: an ellipse body shifted right and down, a bone-like insert on its right only, a low-density region and
    a dense rod on its left: no mirror or rotation symmetry."""
    r = get_geometry(name).fov_radius
    ph = EllipsePhantom("off_centre", (
        Ellipse((0.15 * r, -0.1 * r), (0.6 * r, 0.4 * r), angle=0.3, value=1000.0),
        Ellipse((0.5 * r, 0.05 * r), (0.09 * r, 0.06 * r), angle=-0.5, value=800.0),
        Ellipse((0.0, -0.2 * r), (0.15 * r, 0.08 * r), angle=0.2, value=-700.0),
        Ellipse((-0.25 * r, 0.05 * r), (0.03 * r, 0.03 * r), value=1500.0),
    ))
    return ph.render(name)


@pytest.fixture(scope="module")
def slices():
    """name -> (HU image, challenge sinogram (2 pi/(V-1)), challenge sinogram (2 pi/V)) of the real CT slice."""
    out = {}
    for name in ("aapm_body", "aapm_head"):
        hu = load_ct_small(name, keep_spacing=False)  # pydicom's real 128^2 CT, stretched over the FOV
        mu = hu_to_mu(hu)
        out[name] = (hu, challenge_fp(mu, FOV[name]), challenge_fp(mu, FOV[name], spacing="protocol"))
    return out


@pytest.mark.parametrize("name", ["aapm_body", "aapm_head"])
def test_fp_matches_the_challenge_projector(name, slices):
    g = get_geometry(name)
    assert g.image_size * g.pixel_size == pytest.approx(FOV[name], rel=1e-6)
    op = FanBeamOperator(g)
    hu, ref, ref_protocol = slices[name]
    ours = fp(op, hu_to_mu(hu))
    assert rel_l2(ours, ref) < 0.005  # AAPMProj.py's own views (2 pi/(V-1)): measured 0.36 %
    assert rel_l2(ours, ref_protocol) < 0.001  # the simulator's 2 pi/V spacing, which the presets use: 0.04 %
    ph = off_centre_phantom(name)
    assert rel_l2(fp(op, hu_to_mu(ph)), challenge_fp(hu_to_mu(ph), FOV[name])) < 0.005


def test_the_old_mirrored_convention_fails_the_same_comparison(slices):
    """Version 1 of the convention (rotation and channel order both mirrored) is what the check above catches."""
    from dataclasses import replace

    hu, ref, _ = slices["aapm_body"]
    old = FanBeamOperator(replace(get_geometry("aapm_body"), direction=1, channel_direction=1))
    assert rel_l2(fp(old, hu_to_mu(hu)), ref) > 0.05
    # ...and it is exactly the mirror image: the old operator on the left-right flipped slice agrees again
    assert rel_l2(fp(old, hu_to_mu(hu[:, ::-1])), ref) < 0.005


@pytest.mark.parametrize("name", ["aapm_body", "aapm_head"])
def test_fbp_of_the_challenge_sinogram_reconstructs_the_slice(name, slices):
    hu, ref, _ = slices[name]
    rec = mu_to_hu(FanBeamOperator(name).fbp(torch.from_numpy(ref)[None, None])[0, 0].numpy())
    body = body_mask(hu)
    assert body.sum() > 0.2 * hu.size
    assert float(np.abs(rec - hu)[body].mean()) < 10.0  # measured 6.3 HU (body), 8.4 HU (head)


def _write_raw(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.ascontiguousarray(arr, dtype="<f4").tofile(path)  # AAPMProj.py's rawwrite: the array's bytes, row-major


def test_reader_slice_and_sinogram_are_consistent_under_fp(tmp_path):
    """A case written as the challenge writes it (images row-major 512 x 512, sinograms [views, channels] from
    its projector) reads back with image, sinogram and metal trace consistent under this project's FP."""
    g = get_geometry("aapm_body")
    hu = load_ct_small(g, keep_spacing=False)
    xs, ys = g.pixel_centres
    metal = ((xs[None, :] - 60.0) ** 2 + (ys[:, None] + 25.0) ** 2 < 6.0**2) | (
        (np.abs(xs[None, :] + 45.0) < 3.0) & (np.abs(ys[:, None] - 30.0) < 10.0))  # off-centre, asymmetric
    hu_ma = np.where(metal, 3000.0, hu).astype(np.float32)
    layout = aapm.AAPMLayout()
    files = {"target_img": hu, "baseline_img": hu_ma, "mask_img": metal.astype(np.float32),
             "target_sino": challenge_fp(hu_to_mu(hu), FOV["aapm_body"]),
             "baseline_sino": challenge_fp(hu_to_mu(hu_ma), FOV["aapm_body"])}
    for key, arr in files.items():
        _write_raw(str(tmp_path / getattr(layout, key).format(case="c1")), arr)
    rec = aapm.read_case(str(tmp_path), "c1")
    assert rec["geometry"] == "aapm_body"
    op = FanBeamOperator(rec["geometry"])
    assert rel_l2(fp(op, hu_to_mu(rec["X_ref"])), rec["Y_ref"]) < 0.005
    assert rel_l2(fp(op, hu_to_mu(rec["X_ma"])), rec["Y_ma"]) < 0.005
    # the metal trace lands on the channels the challenge's projector sees the metal on
    theirs = challenge_fp(rec["metal_mask"], FOV["aapm_body"]) > 1e-3
    ours = metal_trace(torch.from_numpy(rec["metal_mask"])[None, None], op)[0, 0].numpy()
    assert (theirs & ours).sum() / (theirs | ours).sum() > 0.9
    # centroids are world mm with x to the right and y up, as the projector's axes
    assert sorted(c[0] for c in rec["metal_centroids_mm"]) == pytest.approx([-45.0, 60.0], abs=0.5)


# ---- convention versions in shard manifests and model files ---------------------------------------------------


def _manifest(tmp_path, name: str, drop_version: bool) -> str:
    write_manifest(str(tmp_path), [], get_geometry(name).to_dict(), {"test": True})
    p = tmp_path / "manifest.json"
    if drop_version:  # as written before the convention was versioned
        m = json.loads(p.read_text())
        del m["geometry_convention"]
        p.write_text(json.dumps(m))
    return str(tmp_path)


@pytest.mark.parametrize("name", ["aapm_body", "aapm_head"])
def test_shards_of_the_old_convention_are_refused_by_name(tmp_path, name):
    assert read_manifest(_manifest(tmp_path / "new", name, False))["geometry_convention"] == CONVENTION_VERSION
    old = _manifest(tmp_path / "old", name, True)
    with pytest.raises(ValueError, match=rf"manifest\.json.*{name}.*convention 1.*rebuild"):
        read_manifest(old)
    from dudocrop.sde.train import geometry_for_data

    with pytest.raises(ValueError, match="rebuild"):
        geometry_for_data(old)


@pytest.mark.parametrize("name", ["syndeeplesion", "tiny_flat", "tiny", "small"])
def test_unchanged_presets_keep_reading_old_manifests(tmp_path, name):
    assert read_manifest(_manifest(tmp_path, name, True))["geometry"]["name"] == name


def test_models_of_the_old_convention_are_refused_by_name(tmp_path):
    from dudocrop.pipeline.model import PIPELINE_FILE, DuDoCROP, save_pipeline_meta

    for f in ("sde_image.pt", "sde_sinogram.pt"):
        (tmp_path / f).write_bytes(b"")  # the check comes before any weights are read
    path = save_pipeline_meta(str(tmp_path), "aapm_body")
    meta = json.loads((tmp_path / PIPELINE_FILE).read_text())
    assert meta["geometry_convention"] == CONVENTION_VERSION
    check_convention(meta["geometry"], meta["geometry_convention"], path)  # the current version passes
    del meta["geometry_convention"]
    (tmp_path / PIPELINE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"pipeline\.json.*aapm_body.*rebuild"):
        DuDoCROP.load(str(tmp_path))
    for bad in (0, CONVENTION_VERSION + 1, "2", True):
        with pytest.raises(ValueError, match="geometry_convention"):
            check_convention("aapm_body", bad, path)


def test_challenge_angles_are_what_the_presets_use():
    """The constants above are the presets' (a typo in either would show here before the projector tests)."""
    g = get_geometry("aapm_body")
    assert (g.sid, g.sdd, g.n_channels, g.n_views, g.channel_offset) == (SID, SDD, N_COLS, N_VIEWS, COL_OFFSET)
    assert g.delta_gamma == pytest.approx(2 * math.atan(0.5 / 950))
    src, _, e_u = g.view_frames
    assert src[0] == pytest.approx([0.0, SID]) and e_u[0] == pytest.approx([1.0, 0.0])  # channels run towards +x
    assert src[1, 0] < 0  # DD2FanProj turns the source from the top towards -x
