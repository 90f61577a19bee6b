"""The synthetic source: a random phantom with simulated metal, reproducible from its seed, honest descriptors."""

import numpy as np
import pytest

from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.metal import MetalObject
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.data.aapm import metal_descriptors
from dudocrop.data.schema import ARRAY_FIELDS, validate_record
from dudocrop.data.synthetic import metal_config_for, resolved, simulate_slice

TINY = get_geometry("tiny")


@pytest.fixture(scope="module")
def op():
    return FanBeamOperator(TINY)


@pytest.fixture(scope="module")
def records(op):
    return {(a, s): simulate_slice(a, op, s) for a in ("body", "head") for s in (0, 1, 7, 8)}


def test_same_seed_gives_the_identical_record(op, records):
    again = simulate_slice("body", op, 7)
    ref = records["body", 7]
    assert set(again) == set(ref)
    for k in ref:
        if k in ARRAY_FIELDS:
            assert again[k].dtype == np.float32 and np.array_equal(again[k], ref[k]), k
        else:
            assert again[k] == ref[k], k
    other = records["body", 8]
    assert not np.array_equal(other["X_ref"], ref["X_ref"])  # the seed does change the slice


def test_recorded_metal_matches_the_masks_connected_components(records):
    px = TINY.pixel_size
    for (anatomy, seed), rec in records.items():
        seen = metal_descriptors(rec["metal_mask"], TINY)
        assert rec["metal_count"] >= 1
        assert seen["metal_count"] == rec["metal_count"], (anatomy, seed)
        truth = np.asarray(rec["metal_centroids_mm"])
        found = np.asarray(seen["metal_centroids_mm"])
        dist = np.linalg.norm(truth[:, None] - found[None], axis=-1)
        match = dist.argmin(axis=1)
        assert sorted(match.tolist()) == list(range(rec["metal_count"])), (anatomy, seed)  # one-to-one
        # the mask is the object's area sampled on the grid: centroid and diameter agree to within a pixel
        assert dist.min(axis=1).max() < px, (anatomy, seed)
        d_found = np.asarray(seen["metal_diameters_mm"])[match]
        assert np.abs(np.asarray(rec["metal_diameters_mm"]) - d_found).max() <= px, (anatomy, seed)
        allowed = set(metal_config_for(anatomy, TINY).materials)
        assert set(rec["metal_materials"]) <= allowed and len(rec["metal_materials"]) == rec["metal_count"]


def test_metal_changes_the_scan_only_on_the_trace(records):
    for (anatomy, seed), rec in records.items():
        rec = dict(rec, case_id=f"{anatomy}/{seed}", patient_id=anatomy, source="synthetic", split="train")
        validate_record(rec, TINY)
        trace = rec["metal_trace"] > 0
        assert trace.any()
        # paper Eq. 1: outside the trace the metal scan is the reference scan up to its own (independent) noise;
        # on it, metal attenuates more
        assert abs((rec["Y_ma"] - rec["Y_ref"])[~trace].mean()) < 1e-3
        assert (rec["Y_ma"][trace] - rec["Y_ref"][trace]).mean() > 0.5
        outside = rec["metal_mask"] < 0.5
        rmse = np.sqrt(np.mean((rec["X_ma"][outside] - rec["X_ref"][outside]) ** 2))
        assert rmse > 20.0, (anatomy, seed, rmse)  # streaks, not just the metal itself
        assert rec["X_ma"][~outside].mean() > rec["X_ref"][~outside].mean() + 500.0


def test_resolved_rejects_touching_objects():
    a = MetalObject("disc", "titanium", (0.0, 0.0), 20.0)
    assert resolved((a,), TINY, 8)
    assert resolved((a, MetalObject("disc", "titanium", (60.0, 0.0), 20.0)), TINY, 8)
    assert not resolved((a, MetalObject("disc", "titanium", (15.0, 0.0), 20.0)), TINY, 8)  # they merge
    assert not resolved((MetalObject("disc", "titanium", (3.125, 3.125), 3.0),), TINY, 8)  # too small to show


def test_bad_anatomy_is_named(op):
    with pytest.raises(ValueError, match="anatomy"):
        simulate_slice("leg", op, 0)
