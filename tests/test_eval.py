"""Evaluation library: Eq. 18-19 arithmetic against hand computations, metal sweeps from the simulator, report
tables (mean ± sd from known rows) and the comparison panel PNG.

The perceptual tests inject a deterministic stand-in distance (mean |x - ref| / 100 HU), not LPIPS, so the
arithmetic of Eq. 18-19 can be checked by hand.
"""

import csv
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.phantoms import random_phantom
from dudocrop.eval import (
    comparison_panel,
    count_sweep_set,
    make_sweeps,
    score_rows,
    size_sweep_set,
    summarize,
    sweep_lp,
    sweeps_pi,
    write_tables,
)
from dudocrop.eval.sweeps import SweepConfig
from dudocrop.metrics import perceptual as P
from dudocrop.viz import PAD_PX, TITLE_PX, panel_size


def mad100(a, b):
    """Stand-in distance: mean absolute difference / 100 HU per image."""
    return (a - b).abs().flatten(1).mean(1) / 100.0


REGION = P.LocalRegion(side_px=8, min_side_px=8)


def _with_error(blocks, n=32):
    """ref = 0 HU; x = ref + value on each (row slice, col slice) block."""
    ref = torch.zeros((1, 1, n, n))
    x = ref.clone()
    for (r, c), v in blocks:
        x[..., r, c] += v
    return x, ref


# ---- Eq. 18-19 ------------------------------------------------------------------------------------------


def test_local_window_is_centred_and_kept_inside_the_image():
    assert REGION.window((8, 8), (32, 32)) == (slice(4, 12), slice(4, 12))
    assert REGION.window((8.4, 7.6), (32, 32)) == (slice(4, 12), slice(4, 12))
    assert REGION.window((1, 30), (32, 32)) == (slice(0, 8), slice(24, 32))  # shifted, not cropped
    assert P.LocalRegion(side_px=64).window((3, 3), (32, 32)) == (slice(0, 32), slice(0, 32))
    with pytest.raises(ValueError, match="inside"):
        REGION.window((40, 3), (32, 32))


def test_lp_quantity_and_pi_q_match_a_hand_computation():
    b1 = (slice(6, 10), slice(6, 10))  # 16 px around object 1 at (8, 8)
    b2 = (slice(23, 25), slice(23, 25))  # 4 px around object 2 at (24, 24)
    b3 = (slice(2, 4), slice(26, 30))  # 8 px around object 3 at (3, 28) (window rows 0..7, cols 24..31)
    c1, c2, c3 = (8, 8), (24, 24), (3, 28)
    # member 1 (N_q = 1): local = 100 * 16 / 64 / 100 = 0.25, global = 1600 / 1024 / 100 = 0.015625
    x1, ref = _with_error([(b1, 100.0)])
    lp1 = P.lp_quantity(x1, ref, [c1], mad100, REGION)
    assert lp1 == pytest.approx(0.25 / 1 + 0.015625)
    # member 2 (N_q = 2): locals 0.25 and 200 * 4 / 64 / 100 = 0.125; global (1600 + 800) / 1024 / 100
    x2, _ = _with_error([(b1, 100.0), (b2, 200.0)])
    lp2 = P.lp_quantity(x2, ref, [c1, c2], mad100, REGION)
    assert lp2 == pytest.approx((0.25 + 0.125) / 2 + 0.0234375)
    # member 3 (N_q = 4, a 4th object without error at (16, 16)): locals 0.25, 0.125, 50 * 8 / 64 / 100, 0
    x3, _ = _with_error([(b1, 100.0), (b2, 200.0), (b3, 50.0)])
    lp3 = P.lp_quantity(x3, ref, [c1, c2, c3, (16, 16)], mad100, REGION)
    assert lp3 == pytest.approx((0.25 + 0.125 + 0.0625 + 0.0) / 4 + (1600 + 800 + 400) / 1024 / 100)
    # Eq. 18 second line on two slices (scale 1): slice A counts (1, 2, 4), slice B counts (1, 3)
    qa = ((lp2 - lp1) / 1 + (lp3 - lp2) / 2) / 2
    qb = (0.5 - 0.2) / 2
    assert P.pi_q([[lp1, lp2, lp3], [0.2, 0.5]], [[1, 2, 4], [1, 3]], scale=1.0) == pytest.approx((qa + qb) / 2)
    # the default scale is LPIPS x 100 (Table III's units)
    assert P.pi_q([[0.2, 0.5]], [[1, 3]]) == pytest.approx(100 * 0.15)


def test_lp_size_and_pi_s_match_a_hand_computation():
    ref = torch.zeros((1, 1, 32, 32))
    lps, areas = [], [4.0, 16.0, 36.0]
    for side in (2, 4, 6):  # a growing error block (side^2 px of +100 HU) around the object at (16, 16)
        x = ref.clone()
        x[..., 16 - side // 2:16 - side // 2 + side, 16 - side // 2:16 - side // 2 + side] = 100.0
        lps.append(P.lp_size(x, ref, (16, 16), mad100, REGION))
    # LP_s = local + global = side^2 / 64 + side^2 / 1024 (the block fits the 8 x 8 window)
    assert lps == pytest.approx([s * s / 64 + s * s / 1024 for s in (2, 4, 6)])
    per_px = 1 / 64 + 1 / 1024  # LP grows by this per unit of area
    assert P.pi_s([lps], [areas], scale=1.0) == pytest.approx(per_px)
    assert P.pi_s([lps, lps], [areas, [a * 2 for a in areas]], scale=1.0) == pytest.approx((per_px + per_px / 2) / 2)


def test_metal_pixels_are_excluded_and_small_regions_upsampled():
    x, ref = _with_error([((slice(6, 10), slice(6, 10)), 3000.0)])
    metal = torch.zeros_like(x, dtype=torch.bool)
    metal[..., 6:10, 6:10] = True
    assert P.lp_quantity(x, ref, [(8, 8)], mad100, REGION, metal_mask=metal) == 0.0
    assert P.lp_quantity(x, ref, [(8, 8)], mad100, REGION) > 0
    shapes = []

    def spy(a, b):
        shapes.append(tuple(a.shape))
        return mad100(a, b)

    P.lp_quantity(x, ref, [(8, 8), (20, 20)], spy, P.LocalRegion(side_px=8, min_side_px=40))
    assert shapes == [(2, 1, 40, 40), (1, 1, 40, 40)]  # both 8 px windows and the 32 px image reach 40 px


def test_sensitivity_rejects_bad_sweeps():
    with pytest.raises(ValueError, match="strictly increasing"):
        P.sensitivity([0.1, 0.2], [2, 2])
    with pytest.raises(ValueError, match="same length"):
        P.sensitivity([0.1], [1])
    with pytest.raises(ValueError, match="one entry per slice"):
        P.pi_q([[0.1, 0.2]], [])


def test_metal_objects_from_a_mask():
    m = np.zeros((20, 20), bool)
    m[2:4, 2:4] = True  # 4 px
    m[10:15, 10:13] = True  # 15 px, largest
    objs = P.metal_objects(m)
    assert [a for _, a in objs] == [15, 4]
    assert objs[0][0] == pytest.approx((12.0, 11.0)) and objs[1][0] == pytest.approx((2.5, 2.5))
    assert P.metal_objects(np.zeros((5, 5), bool)) == []


# ---- sweeps ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweeps():
    op = FanBeamOperator("tiny")
    clean = random_phantom("body", op.geometry, 3)
    return (count_sweep_set(clean, op, 3, seed=1, case_id="c"),
            size_sweep_set(clean, op, (10.0, 16.0, 25.0, 40.0), seed=1, case_id="c"))


def _only_metal_differs(sweep):
    xr, yr = sweep.stack("X_ref"), sweep.stack("Y_ref")
    y = sweep.stack("Y_ma")
    union = sweep.stack("metal_trace").bool().any(0)
    assert 0 < union.float().mean() < 1
    for k in range(1, len(sweep)):
        assert torch.equal(xr[k], xr[0]) and torch.equal(yr[k], yr[0])  # the same reference scan and noise
        assert torch.equal(y[k][~union], y[0][~union])  # metal-affected data differ only inside the traces
        assert not torch.equal(sweep.members[k].X_ma, sweep.members[k - 1].X_ma)


def test_count_sweep_adds_objects_at_fixed_positions(tiny_sweeps):
    sw, _ = tiny_sweeps
    assert sw.kind == "count" and len(sw) == 3 and sw.steps == [1.0, 2.0, 3.0]
    assert [m.count for m in sw.members] == [1, 2, 3]
    last = sw.members[-1]
    for k, m in enumerate(sw.members):
        assert m.objects == last.objects[: k + 1]  # same objects, same positions, added one at a time
        assert m.centroids_rc == last.centroids_rc[: k + 1]
        assert m.X_ma.shape == (1, 1, 64, 64) and m.Y_ma.shape[:2] == (1, 1)
    masks = sw.stack("metal_mask").bool()
    for k in range(1, len(sw)):
        assert torch.all(masks[k - 1] <= masks[k]) and masks[k].sum() > masks[k - 1].sum()
    _only_metal_differs(sw)


def test_size_sweep_grows_one_object(tiny_sweeps):
    _, sw = tiny_sweeps
    assert sw.kind == "size" and len(sw) == 4
    assert all(m.count == 1 for m in sw.members)
    assert sw.steps == pytest.approx([math.pi * (d / 2) ** 2 for d in (10.0, 16.0, 25.0, 40.0)])
    assert np.all(np.diff([m.area_px for m in sw.members]) > 0)
    assert np.all(np.diff([float(m.metal_mask.sum()) for m in sw.members]) > 0)
    assert len({m.objects[0].centre_mm for m in sw.members}) == 1
    _only_metal_differs(sw)


def test_sweep_lp_feeds_pi(tiny_sweeps):
    # stand-in distance: a perfect restoration scores 0; the uncorrected images get worse with more / larger metal
    for sw, pi in zip(tiny_sweeps, (P.pi_q, P.pi_s)):
        perfect = sweep_lp(sw, sw.stack("X_ref"), mad100, "tiny")
        raw = sweep_lp(sw, sw.stack("X_ma"), mad100, "tiny")
        assert perfect == [0.0] * len(sw)
        assert pi([perfect], [sw.steps]) == 0.0
        assert pi([raw], [sw.steps]) > 0
    with pytest.raises(ValueError, match="one restoration per member"):
        sweep_lp(tiny_sweeps[0], tiny_sweeps[0].stack("X_ma")[:2], mad100)
    # sweeps_pi = Eq. 18 / 19 over the slices from the per-member LP
    for sw, pi in zip(tiny_sweeps, (P.pi_q, P.pi_s)):
        raw = sweep_lp(sw, sw.stack("X_ma"), mad100, "tiny")
        assert sweeps_pi([sw, sw], [sw.stack("X_ma")] * 2, mad100, "tiny") == pytest.approx(pi([raw], [sw.steps]))
    with pytest.raises(ValueError, match="all be count sweeps or all size"):
        sweeps_pi(list(tiny_sweeps), [sw.stack("X_ma") for sw in tiny_sweeps], mad100)


def test_make_sweeps_is_reproducible():
    op = FanBeamOperator("tiny")
    cfg = SweepConfig(n_slices=1, n_objects=2, diameters_mm=(12.0, 20.0))
    a, b = make_sweeps(op, cfg, seed=5), make_sweeps(op, cfg, seed=5)
    assert len(a[0]) == len(a[1]) == 1 and a[0][0].case_id == "sweep-5-0"
    assert torch.equal(a[0][0].stack("X_ma"), b[0][0].stack("X_ma"))
    assert torch.equal(a[1][0].stack("X_ma"), b[1][0].stack("X_ma"))
    # LP's local region is the sweep preset's (SweepConfig.local_region), not a fixed one
    tiny_region = SweepConfig(n_slices=1, n_objects=2, diameters_mm=(12.0, 20.0), local_region="tiny")
    sw = make_sweeps(op, tiny_region, seed=5)[0][0]
    assert sw.local_region == "tiny"
    own = sweep_lp(sw, sw.stack("X_ma"), mad100)
    assert own == sweep_lp(sw, sw.stack("X_ma"), mad100, "tiny") != sweep_lp(sw, sw.stack("X_ma"), mad100, "paper")
    with pytest.raises(ValueError, match="n_objects"):
        SweepConfig(n_objects=1)
    with pytest.raises(ValueError, match="increasing"):
        SweepConfig(diameters_mm=(20.0, 10.0))


# ---- report ---------------------------------------------------------------------------------------------


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for ds in ("body", "head"):
        for m, base in (("LI", 28.0), ("DuDoCROP", 40.0)):
            for i in range(4):
                rows.append({"method": m, "dataset": ds, "case_id": f"{ds}-{i}", "psnr": base + rng.normal(0, 2),
                             "ssim": 0.8 + 0.05 * rng.random(), "lpips": None if m == "LI" else 0.01 * rng.random(),
                             "seconds": 0.5 + rng.random()})
    return rows


def test_tables_hold_mean_and_sd_of_the_rows(tmp_path):
    rows = _rows()
    pi = {("body", "DuDoCROP"): {"pi_q": 0.35, "pi_s": None}}
    paths = write_tables(rows, tmp_path, stem="t", pi=pi, notes=["PSNR/SSIM in [-1024, 3072] HU"],
                         preamble=["What the run is and is not."])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]  # no temporary files left
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["dataset"], r["method"]) for r in table] == [("body", "LI"), ("body", "DuDoCROP"), ("head", "LI"),
                                                            ("head", "DuDoCROP")]
    for r in table:
        g = [x for x in rows if x["dataset"] == r["dataset"] and x["method"] == r["method"]]
        assert int(r["n"]) == 4
        for k in ("psnr", "ssim", "seconds"):
            assert float(r[f"{k}_mean"]) == pytest.approx(statistics.mean(x[k] for x in g))
            assert float(r[f"{k}_sd"]) == pytest.approx(statistics.stdev(x[k] for x in g))
        if r["method"] == "LI":
            assert r["lpips_x100_mean"] == r["lpips_x100_sd"] == "unavailable"
        else:
            assert float(r["lpips_x100_mean"]) == pytest.approx(100 * statistics.mean(x["lpips"] for x in g))
    assert table[1]["pi_q"] == "0.35" and table[1]["pi_s"] == "unavailable" and table[0]["pi_q"] == ""
    md = paths["markdown"].read_text()
    assert md.startswith("What the run is and is not.\n\n|")  # the preamble comes first, then the table
    body_li = next(line for line in md.splitlines() if line.startswith("| body | LI |"))
    g = [x for x in rows if x["dataset"] == "body" and x["method"] == "LI"]
    p_mean, p_sd = statistics.mean(x["psnr"] for x in g), statistics.stdev(x["psnr"] for x in g)
    assert f"{p_mean:.2f} ± {p_sd:.2f}" in body_li and "unavailable" in body_li
    body_ours = next(line for line in md.splitlines() if line.startswith("| body | DuDoCROP |"))
    assert "**" in body_ours.split("|")[4]  # the best PSNR of the dataset is bold
    assert "PSNR/SSIM in [-1024, 3072] HU" in md


def test_score_rows_use_the_metric_conventions(tiny_sweeps):
    from dudocrop.metrics import psnr, ssim

    sw = tiny_sweeps[0]
    x, ref, metal = sw.stack("X_ma"), sw.stack("X_ref"), sw.stack("metal_mask")
    rows = score_rows("uncorrected", "tiny", ["a", "b", "c"], x, ref, metal, seconds=[0.1, 0.2, 0.3])
    assert [r["case_id"] for r in rows] == ["a", "b", "c"] and all(r["lpips"] is None for r in rows)
    assert [r["psnr"] for r in rows] == pytest.approx(psnr(x, ref, metal).tolist())
    assert [r["ssim"] for r in rows] == pytest.approx(ssim(x, ref, metal).tolist())
    lp = score_rows("uncorrected", "tiny", [0, 1, 2], x, ref, metal, 1.0, lpips=lambda a, b, m: mad100(a, b))
    assert [r["lpips"] for r in lp] == pytest.approx(mad100(x, ref).tolist())
    assert summarize(rows)[0].n == 3
    # LPIPS scores the pixels PSNR / SSIM score: an error outside the roi (and in the metal) counts in neither

    def masked_mad(a, b, m):
        return mad100(torch.where(m.bool(), b, a), b)

    roi = torch.zeros_like(ref, dtype=torch.bool)
    roi[..., 16:48, 16:48] = True
    off_roi = torch.where(roi, ref, ref + 300.0)
    scored = score_rows("m", "d", [0, 1, 2], off_roi, ref, metal, lpips=masked_mad, roi=roi)
    assert all(r["lpips"] == 0.0 and math.isinf(r["psnr"]) for r in scored)
    in_roi = torch.where(roi, ref + 300.0, ref)
    assert all(r["lpips"] > 0 for r in score_rows("m", "d", [0, 1, 2], in_roi, ref, metal, lpips=masked_mad,
                                                  roi=roi))
    with pytest.raises(ValueError, match="case_ids"):
        score_rows("m", "d", ["a"], x, ref)


def test_summary_edge_cases():
    one = [{"method": "LI", "dataset": "d", "case_id": 0, "psnr": 30.0, "ssim": 0.9, "lpips": None, "seconds": 1.0}]
    s = summarize(one)[0]
    assert s.n == 1 and s.psnr.mean == 30.0 and s.psnr.sd is None and s.lpips is None
    mixed = one + [dict(one[0], case_id=1, lpips=0.02)]
    with pytest.raises(ValueError, match="mix LPIPS"):
        summarize(mixed)
    with pytest.raises(ValueError, match="repeats"):
        summarize(one + one)
    with pytest.raises(ValueError, match=r"rows\[0\] lacks"):
        summarize([{"method": "LI"}])
    with pytest.raises(ValueError, match="ssim"):
        summarize([dict(one[0], ssim=float("nan"))])


def test_comparison_panel_has_one_column_per_method_and_red_metal(tmp_path):
    n = 64
    yy, xx = np.mgrid[:n, :n]
    ref = np.where((xx - 32) ** 2 / 26**2 + (yy - 32) ** 2 / 20**2 <= 1, 40.0, -1000.0).astype(np.float32)
    metal = np.zeros((n, n), bool)
    metal[30:34, 20:24] = True
    rng = np.random.default_rng(0)
    outs = {m: ref + rng.normal(0, s, ref.shape).astype(np.float32) for m, s in (("LI", 60), ("NMAR", 30),
                                                                                  ("DuDoCROP", 10))}
    p = comparison_panel(tmp_path / "fig9.png", outs, ref, metal, lpips=lambda x, r, m: mad100(x, r))
    with Image.open(p) as im:
        img = np.asarray(im.convert("RGB"))
    assert img.shape[:2] == panel_size(3, (n, n), with_reference=True, annotate=True)
    s = 256 // n  # 64 px tiles are zoomed to 256 px
    y0 = PAD_PX + TITLE_PX
    for c in range(3):
        x0 = PAD_PX + c * (n * s + PAD_PX)
        tile = img[y0:y0 + n * s, x0:x0 + n * s]
        red = (tile[..., 0] == 255) & (tile[..., 1] == 0) & (tile[..., 2] == 0)
        assert red.sum() == metal.sum() * s * s  # metal in red in every column, nowhere else
    p2 = comparison_panel(tmp_path / "fig13.png", outs, ref, metal,
                          scores={m: {"psnr": 30.0, "ssim": 0.9, "lpips": None} for m in outs}, scale=1)
    with Image.open(p2) as im:
        assert im.size[::-1] == panel_size(3, (n, n), True, True, 1)
    with pytest.raises(ValueError, match="scores"):
        comparison_panel(tmp_path / "x.png", outs, ref, metal, scores={"LI": {"psnr": 1.0, "ssim": 1.0}})
