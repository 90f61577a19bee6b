"""The real-anatomy evaluation set (issue 25 §3): pydicom-data's CT slices in HU on a preset grid, with metal
simulated by the project's simulator, as schema records."""

import numpy as np
import pytest

pytest.importorskip("data_store", reason="pydicom-data (dev extra) is not installed")

from dudocrop.ct.geometry import get_geometry  # noqa: E402
from dudocrop.ct.phantoms import body_mask  # noqa: E402
from dudocrop.data.real_anatomy import read_real_slice, real_anatomy_cases  # noqa: E402
from dudocrop.data.schema import validate_record  # noqa: E402

SMALL = get_geometry("small")


def test_slices_are_real_ct_in_hu_inside_the_scanner():
    xs, ys = SMALL.pixel_centres
    r = np.hypot(*np.meshgrid(xs, ys))
    for name, lo_mm, hi_mm in (("abdomen", 250, 450), ("head", 100, 250)):
        hu = read_real_slice(name, SMALL)
        body = body_mask(hu)
        # physical size kept: the body's width in mm is an abdomen's / a head's
        width = body.any(0).sum() * SMALL.pixel_size
        assert lo_mm < width < hi_mm, (name, width)
        assert np.median(hu[~body]) == pytest.approx(-1000.0, abs=30)  # air (and the table) outside
        soft = np.median(hu[body & (hu > -200) & (hu < 200)])
        assert -100 < soft < 100, (name, soft)  # water-like tissue
        assert r[body].max() < min(SMALL.fov_radius, SMALL.scan_radius)
    with pytest.raises(ValueError, match="real-anatomy slice"):
        read_real_slice("knee", SMALL)


def test_cases_are_schema_records_with_simulated_metal():
    cases = real_anatomy_cases(SMALL, n_draws=1)
    assert [c["case_id"] for c in cases] == ["abdomen/0", "head/0"]
    for c in cases:
        validate_record(dict(c, patient_id=c["case_id"], source="synthetic", split="test"), SMALL)
        assert c["metal_count"] >= 1 and c["metal_trace"].any()
