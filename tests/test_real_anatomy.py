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


def test_evaluate_real_command_writes_its_table_rows_and_panels(tmp_path):
    """ray_jobs/evaluate_real.py end to end on a tiny untrained model folder (1 metal draw per slice, 1 sampler
    step): every method gets a row per case, the table and one panel per real slice are written, NMAR beats the
    uncorrected image on every case and is its own consistency reference, and the safeguard and the completion pull
    the untrained model's output toward the measured rays (lower error than without them)."""
    import json

    from ray_jobs import evaluate_real
    from tests.serve_fixtures import tiny_model_folder

    models = tiny_model_folder(str(tmp_path / "models"), steps=1)
    out = tmp_path / "real"
    summary = evaluate_real.run(evaluate_real.parse_args(["--models", models, "--out", str(out), "--draws", "1",
                                                          "--steps", "1", "--safeguard", "1.5"]))
    # the folder's pipeline does not complete the sinogram: its "without completion" row is the DuDoCROP row itself
    labels = [v for k, v in evaluate_real.METHODS.items() if k != "dudocrop_eq15"]
    assert sorted(summary) == sorted(labels)
    rows = json.loads((out / "rows.json").read_text())
    by = {(r["case_id"], r["method"]): r for r in rows}
    assert sorted({c for c, _ in by}) == ["abdomen/0", "head/0"] and len(rows) == 2 * len(labels)
    for case in ("abdomen/0", "head/0"):
        assert by[case, "NMAR"]["rmse"] < by[case, "Uncorrected"]["rmse"] / 3, case
        assert by[case, "NMAR"]["consistency"] == pytest.approx(1.0)
    assert summary["DuDoCROP + safeguard"]["rmse"] < summary["DuDoCROP"]["rmse"]
    # the completion keeps every measured ray off the trace: far nearer NMAR than the untrained model's own image
    assert summary["DuDoCROP + completion"]["rmse"] < summary["DuDoCROP"]["rmse"] / 2
    assert summary["DuDoCROP + completion"]["consistency"] < summary["DuDoCROP"]["consistency"]
    table = (out / "real_anatomy.md").read_text()
    assert all(f"| {m} |" in table for m in labels) and "RMSE above NMAR's on" in table
    for sl in ("abdomen", "head"):
        png = (out / f"panel_{sl}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
