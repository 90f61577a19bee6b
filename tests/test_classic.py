"""LI and NMAR: exact trace interpolation, artifact reduction on a photon-starved dense disc, NMAR's prior
helps where bone crosses the trace, batching, both detector kinds, bad input."""

import os
import sys

import numpy as np
import pytest
import torch

from dudocrop.classic import interpolate_trace, kmeans_thresholds, li, nmar, nmar_prior, normalized_interpolation
from dudocrop.classic.nmar import BONE_MIN_HU, MAX_QUOTIENT, MIN_QUOTIENT, PRIOR_FLOOR_PX, prior_completion
from dudocrop.ct import FanBeamOperator, hu_to_mu, mu_to_hu
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import MU_WATER

GEOMS = ["tiny", "tiny_flat", "small"]


def _ellipse(g, cx, cy, a, b):
    xs, ys = g.pixel_centres
    xx, yy = np.meshgrid(xs, ys)
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1


def _body_hu(g) -> np.ndarray:
    """An analytic abdomen: fat ring, soft tissue, liver, a lung-like gas pocket, a vertebra and two hip bones
    (cortex 1200 HU around 300 HU marrow) below the centre, where the metal goes."""
    R = g.fov_radius
    hu = np.full(g.image_shape, -1000.0)
    hu[_ellipse(g, 0, 0, 0.8 * R, 0.55 * R)] = -100
    hu[_ellipse(g, 0, 0, 0.74 * R, 0.49 * R)] = 40
    hu[_ellipse(g, 0.25 * R, 0.15 * R, 0.2 * R, 0.15 * R)] = 60
    hu[_ellipse(g, -0.3 * R, 0.2 * R, 0.15 * R, 0.12 * R)] = -800
    for cx, cy, a, b in ((0, -0.3 * R, 0.12 * R, 0.1 * R), (-0.5 * R, -0.15 * R, 0.08 * R, 0.1 * R),
                         (0.5 * R, -0.15 * R, 0.08 * R, 0.1 * R)):
        hu[_ellipse(g, cx, cy, a, b)] = 1200
        hu[_ellipse(g, cx, cy, 0.6 * a, 0.6 * b)] = 300
    return hu.astype(np.float32)


def _case(name):
    """Monochromatic scan of the body with two dense discs (0.5 /mm, ~25x water) beside the vertebra, and a
    detector floor at 1e-3 transmission: photon starvation makes the metal rays inconsistent, hence streaks."""
    op = FanBeamOperator(name)
    g = op.geometry
    R = g.fov_radius
    hu = torch.from_numpy(_body_hu(g))[None, None]
    metal = torch.from_numpy(_ellipse(g, 0.2 * R, -0.3 * R, 0.06 * R, 0.06 * R)
                             | _ellipse(g, -0.25 * R, -0.3 * R, 0.06 * R, 0.06 * R))[None, None]
    mu = hu_to_mu(hu)
    y_ref = op.fp(mu)
    y_ma = op.fp(torch.where(metal, torch.tensor(0.5), mu)).clamp(max=-np.log(1e-3))
    return {"op": op, "metal": metal, "mu": mu, "y_ref": y_ref, "y_ma": y_ma, "x_ref": mu_to_hu(op.fbp(y_ref)),
            "x_ma": mu_to_hu(op.fbp(y_ma)), "trace": metal_trace(metal.float(), op)}


@pytest.fixture(scope="module", params=GEOMS)
def case(request):
    return _case(request.param)


def _rmse_outside(x, c):
    d = (x - c["x_ref"])[~c["metal"]]
    return float(d.pow(2).mean().sqrt())


# ---- the interpolation routine ---------------------------------------------------------------------------


def test_interpolate_trace_matches_per_view_linear_interpolation():
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(3, 1, 40, 57, generator=gen, dtype=torch.float64)
    trace = torch.rand(3, 1, 40, 57, generator=gen) < 0.35  # many runs, including ones at both detector edges
    trace[0, 0, 0] = True  # a view with no knot at all
    out = interpolate_trace(y, trace)
    assert torch.equal(out[~trace], y[~trace])
    ch = np.arange(57)
    for n in range(3):
        for v in range(40):
            t = trace[n, 0, v].numpy()
            if t.all():
                assert (out[n, 0, v] == 0).all()
                continue
            # np.interp: linear between the nearest measured channels, constant beyond the outermost ones
            want = np.interp(ch[t], ch[~t], y[n, 0, v].numpy()[~t])
            np.testing.assert_allclose(out[n, 0, v].numpy()[t], want, rtol=0, atol=1e-12)


def test_interpolate_trace_reproduces_a_linear_ramp():
    ch = torch.arange(64, dtype=torch.float32)
    y = (2.0 + 0.25 * ch).expand(1, 1, 5, 64).clone()
    trace = torch.zeros(1, 1, 5, 64, dtype=torch.bool)
    trace[..., 10:30] = True
    trace[..., 40:41] = True
    assert torch.allclose(interpolate_trace(y, trace), y, atol=1e-5)


# ---- LI ------------------------------------------------------------------------------------------------------


def test_li_changes_only_the_trace_and_reinserts_metal(case):
    op, tr = case["op"], case["trace"]
    x, y_li = li(case["y_ma"], case["metal"], case["x_ma"], op, return_sinogram=True)
    assert x.shape == case["x_ma"].shape and y_li.shape == case["y_ma"].shape
    assert torch.equal(y_li[~tr], case["y_ma"][~tr])
    assert torch.equal(y_li, interpolate_trace(case["y_ma"], tr))
    assert torch.equal(x[case["metal"]], case["x_ma"][case["metal"]])
    # away from the metal the image is the FBP of the interpolated sinogram, in HU
    assert torch.allclose(x[~case["metal"]], mu_to_hu(op.fbp(y_li))[~case["metal"]])


def test_li_and_nmar_reduce_the_error_outside_the_metal(case):
    e_ma = _rmse_outside(case["x_ma"], case)
    e_li = _rmse_outside(li(case["y_ma"], case["metal"], case["x_ma"], case["op"]), case)
    e_nmar = _rmse_outside(nmar(case["y_ma"], case["metal"], case["x_ma"], case["op"]), case)
    assert e_li < 0.5 * e_ma
    assert e_nmar < 0.5 * e_ma


def test_nmar_completes_the_trace_better_than_li_across_bone(case):
    _, y_li = li(case["y_ma"], case["metal"], case["x_ma"], case["op"], return_sinogram=True)
    _, y_nm = nmar(case["y_ma"], case["metal"], case["x_ma"], case["op"], return_sinogram=True)
    tr = case["trace"]
    assert torch.equal(y_nm[~tr], case["y_ma"][~tr])
    err_li = float((y_li - case["y_ref"])[tr].abs().mean())
    err_nm = float((y_nm - case["y_ref"])[tr].abs().mean())
    assert err_nm < 0.85 * err_li


def test_normalized_interpolation_with_the_true_image_as_prior_is_exact(case):
    # outside the trace the measurement is Y_ref = FP(mu) exactly (the fixture's detector floor left out), so with mu
    # (metal region included) as the prior the quotient is 1 on every ray and the completion returns Y_ref in the
    # trace; NMAR's own segmented prior does not
    tr, y_ref = case["trace"], case["y_ref"]
    y_in = torch.where(tr, case["y_ma"], y_ref)
    y = normalized_interpolation(y_in, tr, case["mu"], case["op"])
    assert torch.equal(y[~tr], y_in[~tr])
    err = float((y - y_ref)[tr].abs().max())
    _, y_nm = nmar(case["y_ma"], case["metal"], case["x_ma"], case["op"], return_sinogram=True)
    assert err < 1e-3 * float(y_ref[tr].abs().max())
    assert err < 0.01 * float((y_nm - y_ref)[tr].abs().max())


def test_li_and_nmar_are_batched():
    c = _case("tiny")
    op = c["op"]
    flip = lambda t: t.flip(-1)  # noqa: E731 - a second, different slice: the mirrored body and metal
    y2 = torch.cat([c["y_ma"], op.fp(hu_to_mu(flip(c["x_ref"])).clamp(min=0))])
    m2 = torch.cat([c["metal"], flip(c["metal"])])
    x2 = torch.cat([c["x_ma"], flip(c["x_ma"])])
    for method in (li, nmar):
        both = method(y2, m2, x2, op)
        for i in range(2):
            one = method(y2[i:i + 1], m2[i:i + 1], x2[i:i + 1], op)
            assert torch.allclose(both[i:i + 1], one, atol=1e-3)


def test_trace_argument_and_dilation():
    c = _case("tiny")
    op = c["op"]
    wide = metal_trace(c["metal"].float(), op, dilate=2)
    a = li(c["y_ma"], c["metal"], c["x_ma"], op, dilate=2, return_sinogram=True)[1]
    b = li(c["y_ma"], c["metal"], c["x_ma"], op, trace=wide, return_sinogram=True)[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, li(c["y_ma"], c["metal"], c["x_ma"], op, return_sinogram=True)[1])
    # without X_ma the metal pixels keep the interpolated reconstruction
    x = li(c["y_ma"], c["metal"], None, op)
    assert float(x[c["metal"]].mean()) < 500


# ---- NMAR internals -----------------------------------------------------------------------------------------


def _lloyd_reference(v: np.ndarray) -> np.ndarray:
    c = np.array([-1000.0, 0.0, 1000.0])
    for _ in range(500):
        lab = np.abs(v[:, None] - c[None]).argmin(1)
        new = np.array([v[lab == k].mean() if (lab == k).any() else c[k] for k in range(3)])
        if np.array_equal(new, c):
            break
        c = new
    return np.array([(c[0] + c[1]) / 2, max((c[1] + c[2]) / 2, BONE_MIN_HU)])


def test_kmeans_thresholds_match_lloyd():
    g = FanBeamOperator("small").geometry
    rng = np.random.default_rng(0)
    x = np.stack([_body_hu(g) + rng.normal(0, 30, g.image_shape), np.where(_body_hu(g) > 100, 40, _body_hu(g))])
    t = kmeans_thresholds(torch.from_numpy(x)[:, None]).numpy()
    for i in range(2):
        np.testing.assert_allclose(t[i], _lloyd_reference(x[i].ravel()), atol=1e-6)
    assert t[1, 1] > x[1].max()  # no bone: the (empty) bone class keeps its start, nothing is classed bone
    # faint "bone" (350 / 600 HU): the k-means boundary (0 + 392) / 2 = 196 HU is raised to +200 HU
    faint = np.concatenate([np.full(504, -1000.0), np.full(400, 0.0), np.full(100, 350.0), np.full(20, 600.0)])
    faint = faint.reshape(1, 1, 32, 32)
    t = kmeans_thresholds(torch.from_numpy(faint))
    assert float(t[0, 0]) == pytest.approx(-500.0) and float(t[0, 1]) == BONE_MIN_HU


def test_nmar_prior_is_air_water_or_bone():
    g = FanBeamOperator("small").geometry
    hu = torch.from_numpy(_body_hu(g))[None, None]
    metal = torch.from_numpy(_ellipse(g, 0.2 * g.fov_radius, -0.3 * g.fov_radius, 8, 8))[None, None]
    x = torch.where(metal, torch.tensor(3000.0), hu)  # the LI image's metal must not enter the prior as bone
    prior = nmar_prior(x, metal)
    t_bone = float(kmeans_thresholds(torch.where(metal, torch.tensor(0.0), x))[0, 1])
    vals = prior[(prior != 0) & (prior != MU_WATER)]
    assert float(vals.min()) >= float(hu_to_mu(torch.tensor(t_bone))) - 1e-6
    assert torch.all(prior[metal] == MU_WATER)
    assert torch.all(prior[hu < -900] == 0)
    assert float(mu_to_hu(prior[hu == 1200]).mean()) > 600  # the cortical bone is kept (smoothed)
    liver = torch.from_numpy(_ellipse(g, 0.25 * g.fov_radius, 0.15 * g.fov_radius, 20, 15))[None, None]
    assert torch.all(prior[liver] == MU_WATER)  # soft tissue becomes water


# ---- bad input -----------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    c = _case("tiny")
    op = c["op"]
    y, m, x = c["y_ma"], c["metal"], c["x_ma"]
    other = FanBeamOperator("tiny_flat")
    with pytest.raises(ValueError, match="Y_ma"):
        li(y[..., :-1], m, x, op)
    with pytest.raises(ValueError, match="Y_ma"):
        li(torch.where(c["trace"], torch.tensor(float("nan")), y), m, x, op)
    with pytest.raises(ValueError, match="metal_mask"):
        li(y, torch.zeros(1, 1, 32, 32, dtype=torch.bool), x, op)
    with pytest.raises(ValueError, match="metal_mask"):
        nmar(y, torch.cat([m, m]), x, op)  # batch mismatch
    with pytest.raises(ValueError, match="metal_mask"):
        li(y, m.float() * 2, x, op)
    with pytest.raises(ValueError, match="X_ma"):
        nmar(y, m, x[..., :-1, :], op)
    with pytest.raises(ValueError, match="X_ma"):
        li(y, m, torch.full_like(x, float("nan")), op)
    with pytest.raises(ValueError, match="trace"):
        li(y, m, x, op, trace=c["trace"].float())
    with pytest.raises(ValueError, match="Y_ma"):
        li(y, m, x, other)  # geometry mismatch: a tiny sinogram for the tiny_flat operator
    with pytest.raises(ValueError, match="dilate"):
        li(y, m, x, op, trace=c["trace"], dilate=1)
    with pytest.raises(ValueError, match="op"):
        li(y, m, x, 3)
    with pytest.raises(ValueError, match="trace"):
        interpolate_trace(y, c["trace"][..., :-1])


def test_nmar_beats_li_beats_uncorrected_on_20_simulated_body_slices():
    """Issue 2's bar on polychromatic simulations (random body phantoms, the AAPM-like metal preset with
    diameters of at least two pixels, every object in the body, noise): mean RMSE outside the dilated metal
    NMAR < LI < uncorrected, and NMAR's sinogram error inside the trace below LI's."""
    from dataclasses import replace

    from dudocrop.ct.metal import get_metal_config
    from dudocrop.ct.phantoms import body_mask, random_phantom
    from dudocrop.ct.simulate import simulate

    op = FanBeamOperator("tiny")
    g = op.geometry
    cfg = get_metal_config("aapm_like")
    lo, hi = cfg.diameter_mm
    # metal in the body (the preset's air / skin objects are the hard cases' test below)
    cfg = replace(cfg, diameter_mm=(max(lo, 2 * g.pixel_size), max(hi, 4 * g.pixel_size)), air_fraction=0.0,
                  skin_fraction=0.0)
    hu = np.stack([random_phantom("body", g, seed=1000 + i) for i in range(20)])[:, None]
    sim = simulate(hu, op, cfg, "aapm_like", seed=5)
    metal = sim.metal_mask > 0.5
    dilated = torch.nn.functional.max_pool2d(metal.float(), 5, 1, 2) > 0
    keep = torch.from_numpy(np.stack([body_mask(h[0]) for h in hu]))[:, None] & ~dilated
    x_li, y_li = li(sim.Y_ma, sim.metal_mask, sim.X_ma, op, trace=sim.metal_trace, return_sinogram=True)
    x_nm, y_nm = nmar(sim.Y_ma, sim.metal_mask, sim.X_ma, op, trace=sim.metal_trace, return_sinogram=True)

    def rmse(x):
        return np.mean([float((x[i] - sim.X_ref[i])[keep[i]].pow(2).mean().sqrt()) for i in range(len(hu))])

    e_ma, e_li, e_nm = rmse(sim.X_ma), rmse(x_li), rmse(x_nm)
    assert e_nm < e_li < e_ma, (e_nm, e_li, e_ma)
    tr = sim.metal_trace
    assert float((y_nm - sim.Y_ref)[tr].abs().mean()) < float((y_li - sim.Y_ref)[tr].abs().mean())


# ---- issue 19: NMAR must not explode where its prior cannot explain the measurement ------------------------


@pytest.fixture(scope="module")
def hard():
    """The hard cases of ``bench/nmar_hard_cases.py`` on the small grid, simulated (aapm_like, noise) and
    corrected by LI and NMAR."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from nmar_hard_cases import evaluate, hard_cases

    op = FanBeamOperator("small")
    return {name: (hu, objs, evaluate(op, hu, objs)) for name, (hu, objs) in hard_cases(op.geometry).items()}


def test_hard_cases_are_what_they_claim(hard):
    from dudocrop.ct.metal import check_placement
    from dudocrop.ct.phantoms import body_mask

    g = FanBeamOperator("small").geometry
    for name, placement in (("air", "air"), ("skin", "skin"), ("bone", "bone"), ("fov_edge", "body")):
        hu, objs, _ = hard[name]
        check_placement(objs, hu, g, placement)
    body = body_mask(hard["fov_edge"][0])
    assert body[:, 0].any() and body[:, -1].any()  # the body reaches both sides of the FOV
    hu, objs, _ = hard["reported"]  # the reported slice: four implants, the last one outside the body
    assert len(objs) == 4
    check_placement(objs[:3], hu, g, "body")
    check_placement(objs[3:], hu, g, "air")


@pytest.mark.parametrize("name", ["air", "skin", "bone", "fov_edge", "reported"])
def test_nmar_on_hard_cases_stays_within_li_and_physical(hard, name):
    """Issue 19 §2: NMAR's RMSE outside the metal at most 1.1x LI's, every completed line integral in
    [0, max Y_ma], the measurement kept off the trace. (Before the guard: air 231x LI, skin 292x, the reported
    slice 32x, with completed line integrals down to -938.)"""
    _, _, r = hard[name]
    sim = r["sim"]
    assert r["nmar_rmse"] <= 1.1 * r["li_rmse"], (name, r["nmar_rmse"], r["li_rmse"])
    y, tr = r["nmar_y"], sim.metal_trace
    assert float(y[tr].min()) >= 0.0 and float(y[tr].max()) <= float(sim.Y_ma.max()), name
    assert torch.equal(y[~tr], sim.Y_ma[~tr])


@pytest.mark.parametrize("name", ["air", "skin", "fov_edge", "reported"])
def test_prior_completion_with_a_prior_image_stays_physical_on_hard_cases(hard, name):
    """OSROConfig.completion's step (classic.nmar.prior_completion) on the hard cases, with NMAR's own image as the
    prior (metal pixels included: they are refilled from their surroundings, air for metal in the air): no
    explosion (NMAR's guard did 231x LI here before issue 19): error within 1.25x NMAR's, the completion within
    [0, max Y_ma] and the measurement kept off the trace; with the reference as the prior it beats NMAR."""
    _, _, r = hard[name]
    sim, op = r["sim"], FanBeamOperator("small")
    metal, tr = sim.metal_mask > 0.5, sim.metal_trace

    def err(x):
        return float((x - sim.X_ref)[~metal].pow(2).mean().sqrt())

    again, y = prior_completion(r["nmar_x"], sim.Y_ma, metal, tr, op, return_sinogram=True)
    assert torch.isfinite(again).all() and err(again) <= 1.25 * r["nmar_rmse"], (err(again), r["nmar_rmse"])
    assert float(y[tr].min()) >= 0.0 and float(y[tr].max()) <= float(sim.Y_ma.max())
    assert torch.equal(y[~tr], sim.Y_ma[~tr])
    exact = prior_completion(sim.X_ref, sim.Y_ma, metal, tr, op)
    assert err(exact) < 0.95 * r["nmar_rmse"], (err(exact), r["nmar_rmse"])


def test_nmar_on_the_aapm_like_preset_with_air_and_skin_metal():
    """The synthetic source's metal preset places some objects in the air and on the skin: over 20 simulated
    body slices NMAR's mean RMSE stays within 1.1x LI's and no completed line integral leaves [0, max Y_ma]
    (the unguarded normalisation gave a mean of 1386 HU against LI's 66 on these slices)."""
    from dataclasses import replace

    from dudocrop.ct.metal import get_metal_config
    from dudocrop.ct.phantoms import random_phantom
    from dudocrop.ct.simulate import simulate

    op = FanBeamOperator("tiny")
    g = op.geometry
    cfg = get_metal_config("aapm_like")
    assert cfg.air_fraction > 0 and cfg.skin_fraction > 0
    lo, hi = cfg.diameter_mm
    cfg = replace(cfg, diameter_mm=(max(lo, 2 * g.pixel_size), max(hi, 4 * g.pixel_size)))
    hu = np.stack([random_phantom("body", g, seed=1000 + i) for i in range(20)])[:, None]
    sim = simulate(hu, op, cfg, "aapm_like", seed=5)
    metal = sim.metal_mask > 0.5
    x_li = li(sim.Y_ma, sim.metal_mask, sim.X_ma, op, trace=sim.metal_trace)
    x_nm, y_nm = nmar(sim.Y_ma, sim.metal_mask, sim.X_ma, op, trace=sim.metal_trace, return_sinogram=True)

    def rmse(x):
        return np.mean([float((x[i] - sim.X_ref[i])[~metal[i]].pow(2).mean().sqrt()) for i in range(len(hu))])

    assert rmse(x_nm) <= 1.1 * rmse(x_li), (rmse(x_nm), rmse(x_li))
    top = sim.Y_ma.amax(dim=(1, 2, 3), keepdim=True).expand_as(y_nm)
    tr = sim.metal_trace
    assert float(y_nm[tr].min()) >= 0 and bool((y_nm[tr] <= top[tr]).all())


def test_normalized_interpolation_falls_back_to_li_where_the_prior_is_uninformative(case):
    """Knots whose prior projects to less than PRIOR_FLOOR_PX pixels of water, or whose quotient leaves
    [MIN_QUOTIENT, MAX_QUOTIENT], make the completion LI's; the completion is clipped to [0, max y]."""
    op, tr, y = case["op"], case["trace"], case["y_ma"]
    y_noisy = y - 0.01  # air rays measure slightly negative line integrals (noise, scatter correction)
    y_li_noisy = interpolate_trace(y_noisy, tr)
    hi = float(y_noisy.max())
    # a prior of nothing (all air): every knot is uninformative, the completion is LI (clipped at 0)
    out = normalized_interpolation(y_noisy, tr, torch.zeros_like(case["mu"]), op)
    assert torch.equal(out[~tr], y_noisy[~tr])
    assert torch.allclose(out[tr], y_li_noisy[tr].clamp(0, hi), atol=1e-6)
    # the true image as the prior and its own projection as the measurement (quotient 1), both scaled down
    # until the prior projects to less than the floor: LI; scaled to just above the floor on the knots: exact
    floor = PRIOR_FLOOR_PX * MU_WATER * op.geometry.pixel_size
    y_ref, p_max = case["y_ref"], float(case["y_ref"].max())
    knots = ~tr & (tr.roll(1, -1) | tr.roll(-1, -1))  # the measured channels next to the trace
    p_knot = float(y_ref[knots].min())
    assert p_knot > 0  # the fixture's trace runs lie inside the body
    for scale, want_li in ((0.9 * floor / p_max, True), (1.1 * floor / p_knot, False)):
        out = normalized_interpolation(y_ref * scale, tr, case["mu"] * scale, op)
        if want_li:
            assert torch.allclose(out[tr], interpolate_trace(y_ref * scale, tr)[tr], atol=1e-7), scale
        else:
            assert float((out - y_ref * scale)[tr].abs().max()) < 1e-3 * p_max * scale, scale
    # the true image as the prior, scaled so that the quotient 1 / scale leaves the band: LI; stays in it: exact
    for scale, want_li in ((0.95 / MAX_QUOTIENT, True), (1.05 / MIN_QUOTIENT, True), (1.05 / MAX_QUOTIENT, False),
                           (0.95 / MIN_QUOTIENT, False)):
        out = normalized_interpolation(case["y_ref"], tr, case["mu"] * scale, op)
        if want_li:
            ref_li = interpolate_trace(case["y_ref"], tr)
            assert torch.allclose(out[tr], ref_li[tr], atol=1e-5), scale
        else:
            assert float((out - case["y_ref"])[tr].abs().max()) < 1e-3 * float(case["y_ref"].max())


def test_nmar_prior_makes_metal_in_the_air_air():
    """Metal that LI sees as air (outside the patient) enters the prior as air, metal inside it as water."""
    g = FanBeamOperator("small").geometry
    R = g.fov_radius
    hu = torch.from_numpy(_body_hu(g))[None, None]
    inside = torch.from_numpy(_ellipse(g, 0.2 * R, -0.3 * R, 8, 8))[None, None]
    outside = torch.from_numpy(_ellipse(g, 0.0, 0.75 * R, 8, 8))[None, None]  # above the body (b = 0.55 R)
    assert bool((hu[outside] == -1000).all())
    prior = nmar_prior(hu, inside | outside)
    assert torch.all(prior[outside] == 0)
    assert torch.all(prior[inside] == MU_WATER)
