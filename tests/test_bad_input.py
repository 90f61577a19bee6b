"""Issue 20 (Medium): bad input is refused early, by name, and costs nothing already done.

Each test builds the broken input the review used (a slice with metal in air, a NaN voxel, an MR series, a
truncated DICOM, ...) and checks that it is refused up front with an error naming the argument, file or slice,
or, where the input is a batch or a folder, that the good parts still go through.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.phantoms import body_mask as body_mask_2d
from dudocrop.ct.phantoms import random_phantom
from dudocrop.data.schema import validate_record
from dudocrop.pipeline.model import DuDoCROP, PipelineConfig
from dudocrop.pipeline.osro import MIN_REGION_PIXELS, region_problems
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.train import SDEModel

GEOM = "tiny"
G = get_geometry(GEOM)


class _NeverCalled(torch.nn.Module):
    """A U-Net that fails the test if sampling starts: refusals must come before any of it."""

    def forward(self, *a, **kw):
        raise AssertionError("sampling started on input that should have been refused")


def _pipeline() -> DuDoCROP:
    slots = [SDEModel(_NeverCalled(), IRSDE(), d, False, None) for d in ("image", "sinogram", "residual")]
    return DuDoCROP(GEOM, *slots, None, PipelineConfig(steps=2))


def _slices():
    """A body phantom and three masks: an implant inside the body, metal in the air beside it, and a mask that
    covers the whole body."""
    x = random_phantom("body", GEOM, 1)
    body = body_mask_2d(x)
    rows, cols = np.nonzero(body)
    r, c = int(rows.mean()), int(cols.mean())
    inside = np.zeros(G.image_shape, np.float32)
    inside[r - 1:r + 2, c - 1:c + 2] = 1
    air = np.zeros(G.image_shape, np.float32)
    fov = np.hypot(*np.meshgrid(G.pixel_centres[0], G.pixel_centres[1], indexing="xy")) < G.fov_radius - 10
    ar, ac = np.argwhere(~body & fov & ~np.roll(body, 3, 0) & ~np.roll(body, -3, 0)
                         & ~np.roll(body, 3, 1) & ~np.roll(body, -3, 1))[0]
    air[ar:ar + 2, ac:ac + 2] = 1
    covering = body.astype(np.float32)
    x_air = np.where(air > 0, 3000.0, x).astype(np.float32)
    x_in = np.where(inside > 0, 3000.0, x).astype(np.float32)
    return x_in, inside, x_air, air, covering


def test_region_problems_refuse_metal_in_air_and_a_mask_covering_the_body():
    x_in, inside, x_air, air, covering = _slices()
    x = torch.from_numpy(np.stack([x_in, x_air, x_in]))[:, None]
    m = torch.from_numpy(np.stack([inside, air, covering]))[:, None]
    ok, in_air, covers = region_problems(x, m, G)
    assert ok is None
    assert "outside the patient's body" in in_air
    assert f"fewer than {MIN_REGION_PIXELS}" in covers and "covers the body" in covers


def test_prepare_refuses_bad_slices_before_sampling_and_names_them():
    x_in, inside, x_air, air, covering = _slices()
    pipe = _pipeline()
    x = torch.from_numpy(np.stack([x_in, x_air]))[:, None]
    m = torch.from_numpy(np.stack([inside, air]))[:, None]
    with pytest.raises(ValueError, match=r"slice 1: .*metal in air"):
        pipe(x, metal_mask=m)
    with pytest.raises(ValueError, match=r"slice 0: .*covers the body"):
        pipe(torch.from_numpy(x_in)[None, None], metal_mask=torch.from_numpy(covering)[None, None])
    # the good slice alone passes the checks (and reaches the sampler, which this stub refuses)
    with pytest.raises(AssertionError, match="sampling started"):
        pipe(torch.from_numpy(x_in)[None, None], metal_mask=torch.from_numpy(inside)[None, None])


def test_validate_record_refuses_metal_in_air_and_a_covering_mask():
    x_in, inside, x_air, air, covering = _slices()
    base = {"case_id": "p0/000", "patient_id": "p0", "source": "clinical", "anatomy": "body", "split": "train",
            "Y_ma": np.zeros(G.sino_shape, np.float32), "metal_trace": np.zeros(G.sino_shape, np.float32)}
    validate_record({**base, "X_ma": x_in, "metal_mask": inside}, G)
    with pytest.raises(ValueError, match=r"record p0/000: .*metal in air"):
        validate_record({**base, "X_ma": x_air, "metal_mask": air}, G)
    with pytest.raises(ValueError, match=r"record p0/000: .*covers the body"):
        validate_record({**base, "X_ma": x_in, "metal_mask": covering}, G)


def test_empty_batches_half_precision_and_numpy_masks_are_validated():
    x_in, inside, *_ = _slices()
    pipe = _pipeline()
    with pytest.raises(ValueError, match=r"x_ma_hu must hold at least one slice"):
        pipe(torch.zeros(0, 1, *G.image_shape))
    with pytest.raises(ValueError, match=r"x_ma_hu must have dtype float32 or float64, got float16"):
        pipe(torch.from_numpy(x_in)[None, None].half())
    y = torch.zeros(1, 1, *G.sino_shape, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"y_ma must have dtype float32 or float64, got float16"):
        pipe(torch.from_numpy(x_in)[None, None], y)
    # a numpy mask (bool or float) is taken like a tensor one: the checks pass and sampling is reached
    for m in (inside[None, None], inside[None, None] > 0):
        with pytest.raises(AssertionError, match="sampling started"):
            pipe(torch.from_numpy(x_in)[None, None], metal_mask=m)
    x, _, mask, trace = pipe.prepare(torch.from_numpy(x_in)[None, None], metal_mask=inside[None, None] > 0)
    assert mask.dtype == torch.float32 and torch.equal(mask[0, 0], torch.from_numpy(inside)) and trace.any()
    with pytest.raises(ValueError, match=r"metal_mask must have 4 dimensions"):
        pipe(torch.from_numpy(x_in)[None, None], metal_mask=inside)
