"""Patient-like synthetic slices (issue 25 §1): reproducible, inside the scanner, with the structure and contrast
variety the smooth ellipse phantoms lack, and usable by the synthetic source."""

import numpy as np
import pytest
from scipy import ndimage

from dudocrop.config import get_run_preset
from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.patients import patient_phantom, phantom
from dudocrop.ct.phantoms import body_mask, random_phantom
from dudocrop.data.build import SourceOptions
from dudocrop.data.synthetic import simulate_slice

SMALL = get_geometry("small")


def _details(hu: np.ndarray) -> int:
    """Small structures inside the body: connected regions that stand out of their 5-pixel neighbourhood by more
    than 40 HU (vessels, bowel walls and gas, calcifications), bones and the body edge excluded."""
    inner = ndimage.binary_erosion(body_mask(hu), iterations=3) & (hu < 300)
    detail = np.abs(hu - ndimage.median_filter(hu, size=5)) > 40
    return int(ndimage.label(detail & inner)[1])


def test_reproducible_distinct_and_inside_the_scanner():
    a = patient_phantom("body", SMALL, 5)
    assert a.dtype == np.float32 and a.shape == SMALL.image_shape
    assert np.array_equal(a, patient_phantom("body", SMALL, 5))
    assert not np.array_equal(a, patient_phantom("body", SMALL, 6))
    xs, ys = SMALL.pixel_centres
    r = np.hypot(*np.meshgrid(xs, ys))
    room = min(SMALL.fov_radius, SMALL.scan_radius)
    for kind, seed in (("body", 1), ("body", 2), ("head", 3)):
        body = body_mask(patient_phantom(kind, SMALL, seed))
        assert body.sum() > 500 and r[body].max() < room, (kind, seed)
    with pytest.raises(ValueError, match="phantom style"):
        phantom("smooth", "body", SMALL, 0)
    with pytest.raises(ValueError, match="kind"):
        patient_phantom("leg", SMALL, 0)


def test_more_structure_and_contrast_variety_than_the_ellipse_phantoms():
    seeds = range(8)
    pat = [patient_phantom("body", SMALL, s, region="abdomen") for s in seeds]
    ell = [random_phantom("body", SMALL, s, region="abdomen") for s in seeds]
    n_pat, n_ell = np.mean([_details(x) for x in pat]), np.mean([_details(x) for x in ell])
    assert n_pat > 2.5 * n_ell, (n_pat, n_ell)
    # contrast phases: the upper quartile of soft tissue (20-400 HU inside the body) varies by > 20 HU from slice to
    # slice (unenhanced to portal venous organs) and sits above the ellipse phantoms' unenhanced organs, whose
    # quartile varies by < 15 HU
    def organ_p75(x):
        inner = ndimage.binary_erosion(body_mask(x), iterations=3)
        return float(np.percentile(x[inner & (x > 20) & (x < 400)], 75))
    p, e = [organ_p75(x) for x in pat], [organ_p75(x) for x in ell]
    assert max(p) - min(p) > 20 and max(e) - min(e) < 15 and max(p) > max(e) + 30, (p, e)


def test_synthetic_source_and_presets_use_patient_slices():
    op = FanBeamOperator(SMALL)
    rec = simulate_slice("body", op, 3, style="patient")
    assert rec["metal_count"] >= 1 and rec["X_ref"].shape == SMALL.image_shape
    assert not np.array_equal(rec["X_ref"], simulate_slice("body", op, 3)["X_ref"])  # the style changes the slice
    with pytest.raises(ValueError, match="style"):
        simulate_slice("body", op, 3, style="smooth")
    with pytest.raises(ValueError, match="phantom"):
        SourceOptions(source="synthetic", geometry="small", phantom="smooth")
    assert get_run_preset("small").phantom == "patient" and get_run_preset("tiny").phantom == "ellipse"
    from ray_jobs import prepare_data, train_all

    prep = train_all.stage_argv(get_run_preset("small"), "/out", None)["prepare"]
    assert prepare_data.options_from_args(prepare_data.parse_args(prep)).phantom == "patient"
    assert "--phantom" not in train_all.stage_argv(get_run_preset("tiny"), "/out", None)["prepare"]
