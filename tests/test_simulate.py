"""The polychromatic metal artifact simulator: BHC accuracy, streaks, paper Eq. 1, seeds, batching, bad input."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from dudocrop.ct import FanBeamOperator, hu_to_mu, mu_to_hu
from dudocrop.ct.materials import mass_attenuation
from dudocrop.ct.metal import MetalConfig, MetalObject
from dudocrop.ct.phantoms import body_mask, random_phantom
from dudocrop.ct.simulate import (
    NOISELESS,
    SimulationSettings,
    _spectral,
    apply_water_bhc,
    get_settings,
    simulate,
    water_bhc,
)
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import MU_WATER


@pytest.fixture(scope="module")
def op():
    return FanBeamOperator("small")


@pytest.fixture(scope="module")
def abdomen():
    return random_phantom("body", "small", seed=3, region="abdomen")


@pytest.fixture(scope="module")
def ti_rod():
    # a 10 mm titanium rod crossing the slice (a disc in-plane), beside the spine
    return MetalObject("disc", "titanium", (45.0, -20.0), 10.0)


def test_water_bhc_maps_polychromatic_water_to_monochromatic():
    st = get_settings("aapm_like")
    sd = _spectral(st.spectrum, st.energy_integrating, st.bone_material)
    L = torch.linspace(0.0, 400.0, 801, dtype=torch.float64)
    p_poly = -torch.log(torch.exp(-L[:, None] * torch.as_tensor(sd.water)) @ torch.as_tensor(sd.w1))
    assert (MU_WATER * L - p_poly)[-1] > 0.3  # beam hardening: the raw line integral falls short
    p = apply_water_bhc(p_poly, st)
    assert torch.allclose(p, MU_WATER * L, rtol=1e-3, atol=1e-4)
    # beyond the fitted range the correction continues along its tangent (monotone for metal paths)
    big = torch.linspace(5.0, 40.0, 50, dtype=torch.float64)
    assert (torch.diff(apply_water_bhc(big, st)) > 0).all()
    coef, _ = water_bhc(st)
    assert coef is water_bhc(st)[0]  # cached per settings
    assert torch.equal(apply_water_bhc(p_poly, replace(st, bhc=False)), p_poly)


def test_no_metal_noiseless_matches_monochromatic_fbp(op, abdomen):
    """Without metal and noise, X_ma equals FBP(FP(mu)) of the clean slice inside the body: the water BHC
    removes the water beam hardening; what remains is bone beam hardening."""
    res = simulate(abdomen, op, None, "noiseless", seed=0)
    mono = mu_to_hu(op.fbp(op.fp(hu_to_mu(torch.from_numpy(abdomen))[None, None])))[0, 0]
    body = torch.from_numpy(body_mask(abdomen))
    mae = (res.X_ma[0, 0] - mono)[body].abs().mean().item()
    assert mae < 5.0, mae
    assert torch.equal(res.X_ma, res.X_ref) and torch.equal(res.Y_ma, res.Y_ref)
    assert not res.metal_trace.any() and res.metal_mask.sum() == 0
    # the same physics without the correction shows water beam hardening (cupping, dark HU)
    raw = simulate(abdomen, op, None, replace(NOISELESS, bhc=False), seed=0)
    mae_raw = (raw.X_ma[0, 0] - mono)[body].abs().mean().item()
    assert mae_raw > 4 * mae and mae_raw > 15.0, (mae, mae_raw)


def test_titanium_rod_streaks_and_eq1(op, abdomen, ti_rod):
    res = simulate(abdomen, op, [ti_rod], "aapm_like", seed=1)
    g = op.geometry
    assert res.X_ma.shape == (1, 1, *g.image_shape) and res.Y_ma.shape == (1, 1, *g.sino_shape)
    assert res.X_ma.dtype == torch.float32 and res.metal_trace.dtype == torch.bool
    mask = res.metal_mask[0, 0] > 0
    assert abs(mask.sum().item() * g.pixel_size**2 - np.pi * 25) < 2 * g.pixel_size**2
    body = torch.from_numpy(body_mask(abdomen))
    outside = body & ~mask
    rmse = (res.X_ma - res.X_ref)[0, 0][outside].pow(2).mean().sqrt().item()
    assert rmse > 20.0, rmse  # streaks
    assert res.X_ma[0, 0][mask].mean() > 2000  # the metal itself reads far above bone
    # paper Eq. 1: outside the metal trace the metal-affected sinogram is the reference sinogram (in the mean: the
    # two scans are independent realisations by default; with shared noise exactly)
    tr = res.metal_trace[0, 0]
    assert (res.Y_ma[0, 0] - res.Y_ref[0, 0])[~tr].mean().abs() < 1e-3
    shared = simulate(abdomen, op, [ti_rod], replace(get_settings("aapm_like"), shared_noise=True), seed=1)
    assert torch.equal(shared.Y_ma[0, 0][~tr], shared.Y_ref[0, 0][~tr])
    assert (res.Y_ma[0, 0][tr] > res.Y_ref[0, 0][tr]).float().mean() > 0.9
    # the trace holds every ray through the binary mask (and the partial-volume rays beside it)
    assert (metal_trace(res.metal_mask, op) <= res.metal_trace).all()
    assert 0.01 < tr.float().mean() < 0.2


def test_seeds_reproducible_and_distinct(op, abdomen, ti_rod):
    a = simulate(abdomen, op, [ti_rod], "aapm_like", seed=7)
    b = simulate(abdomen, op, [ti_rod], "aapm_like", seed=7)
    c = simulate(abdomen, op, [ti_rod], "aapm_like", seed=8)
    for k in ("X_ma", "X_ref", "Y_ma", "Y_ref"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    diff = (a.Y_ref - c.Y_ref).abs()
    assert diff.mean() > 1e-4  # another noise realisation
    # noise is zero-mean: the two realisations agree on average
    assert (a.X_ref - c.X_ref).mean().abs() < 2.0


def test_metal_and_reference_scans_have_independent_noise(op, abdomen, ti_rod):
    """Two scans never share their noise (AAPM CT-MAR simulates them separately): off the metal trace Y_ma - Y_ref,
    and without metal X_ma - X_ref, have the variance of the difference of two independent reference scans.
    ``shared_noise`` keeps the old recipe, where both differences vanish."""
    st = get_settings("aapm_like")
    assert not st.shared_noise
    shared_st = replace(st, shared_noise=True)
    a = simulate(abdomen, op, [ti_rod], st, seed=11)
    b = simulate(abdomen, op, [ti_rod], st, seed=12)  # another, independent reference scan
    off = ~a.metal_trace[0, 0]
    two_scans = (a.Y_ref - b.Y_ref)[0, 0][off].var()
    ratio = ((a.Y_ma - a.Y_ref)[0, 0][off].var() / two_scans).item()
    assert 0.9 < ratio < 1.1, ratio
    s = simulate(abdomen, op, [ti_rod], shared_st, seed=11)
    assert (s.Y_ma - s.Y_ref)[0, 0][off].abs().max() == 0
    assert torch.equal(s.Y_ref, a.Y_ref)  # the reference scan's noise stream is the same in both modes

    # image domain, no metal: X_ma - X_ref is the difference of two scans inside the body, not zero
    body = torch.from_numpy(body_mask(abdomen))
    c = simulate(abdomen, op, None, st, seed=11)
    d = simulate(abdomen, op, None, st, seed=12)
    ratio = ((c.X_ma - c.X_ref)[0, 0][body].var() / (c.X_ref - d.X_ref)[0, 0][body].var()).item()
    assert 0.85 < ratio < 1.15, ratio
    e = simulate(abdomen, op, None, shared_st, seed=11)
    assert torch.equal(e.X_ma, e.X_ref)
    with pytest.raises(ValueError, match="shared_noise"):
        SimulationSettings(shared_noise="yes")


def test_config_sampling_and_batching(op, abdomen):
    head = random_phantom("head", "small", seed=1)
    clean = torch.from_numpy(np.stack([abdomen, head]))[:, None]
    cfg = MetalConfig(count=2, diameter_mm=(3.0, 6.0), materials=("titanium", "amalgam"))
    res = simulate(clean, op, cfg, "syndeeplesion_like", seed=5)
    assert len(res) == 2 and [len(o) for o in res.objects] == [2, 2]
    # slice 1 of the batch is what slice 1 would give alone: seeds are per slice, not per batch
    again = simulate(clean, op, cfg, "syndeeplesion_like", seed=5)
    assert again.objects == res.objects and torch.equal(again.Y_ma, res.Y_ma)
    solo = simulate(clean[:1], op, cfg, "syndeeplesion_like", seed=5)
    assert solo.objects[0] == res.objects[0] and torch.equal(solo.Y_ma[0], res.Y_ma[0])
    for i in range(2):
        tr = res.metal_trace[i, 0]
        assert tr.any() and (res.Y_ma[i, 0] - res.Y_ref[i, 0])[~tr].mean().abs() < 1e-3
    rec = res.record(1)
    assert rec["metal_count"] == 2 and rec["X_ma"].shape == op.geometry.image_shape
    assert set(rec["metal_materials"]) <= {"titanium", "amalgam"}


def test_more_and_denser_metal_means_more_artifact(op, abdomen):
    """The perceptual-indicator sweeps need monotone severity: bigger, denser metal -> larger error."""
    def err(objs):
        r = simulate(abdomen, op, objs, "noiseless", seed=0)
        out = torch.from_numpy(body_mask(abdomen)) & (r.metal_mask[0, 0] == 0)
        return (r.X_ma - r.X_ref)[0, 0][out].pow(2).mean().sqrt().item()

    small = err([MetalObject("disc", "titanium", (45.0, -20.0), 4.0)])
    big = err([MetalObject("disc", "titanium", (45.0, -20.0), 12.0)])
    steel = err([MetalObject("disc", "stainless_steel", (45.0, -20.0), 12.0)])
    assert small < big < steel, (small, big, steel)


def test_bad_input(op, abdomen, ti_rod):
    with pytest.raises(ValueError, match="clean_hu"):
        simulate(abdomen[:-1], op, None, "noiseless")
    with pytest.raises(ValueError, match="clean_hu"):
        simulate(torch.zeros(2, 2, 128, 128), op, None, "noiseless")
    bad = abdomen.copy()
    bad[5, 5] = np.nan
    with pytest.raises(ValueError, match="clean_hu"):
        simulate(bad, op, None, "noiseless")
    with pytest.raises(ValueError, match="clean_hu"):
        simulate(abdomen.astype(np.int16), op, None, "noiseless")
    with pytest.raises(ValueError, match="unknown simulation settings"):
        simulate(abdomen, op, None, "ultra_low_dose")
    with pytest.raises(ValueError, match="metal"):
        simulate(abdomen, op, 42, "noiseless")
    with pytest.raises(ValueError, match="metal"):
        simulate(np.stack([abdomen] * 2)[:, None], op, [[ti_rod], [ti_rod], [ti_rod]], "noiseless")
    with pytest.raises(ValueError, match="seed"):
        simulate(abdomen, op, None, "noiseless", seed=-1)
    with pytest.raises(ValueError, match="op"):
        simulate(abdomen, "no_such_scanner", None, "noiseless")
    with pytest.raises(ValueError, match="photons_per_ray"):
        SimulationSettings(photons_per_ray=0)
    with pytest.raises(ValueError, match="unknown material"):
        SimulationSettings(bone_material="chalk")
    with pytest.raises(ValueError, match="count"):
        simulate(abdomen, op, MetalConfig(count=0), "noiseless")


def test_reference_energy_consistency():
    """The decomposition energy makes the monochromatic projection exactly FP(hu_to_mu(x)) for water."""
    from dudocrop.ct.materials import reference_energy_kev

    e = reference_energy_kev()
    assert mass_attenuation("water", [e])[0] == pytest.approx(MU_WATER, rel=1e-6)


@pytest.mark.slow
def test_full_size_aapm_body():
    op = FanBeamOperator("aapm_body")
    hu = random_phantom("body", "aapm_body", seed=0, region="abdomen")
    res = simulate(hu, op, "aapm_like", "aapm_like", seed=0)
    tr = res.metal_trace[0, 0]
    assert (res.Y_ma[0, 0] - res.Y_ref[0, 0])[~tr].mean().abs() < 1e-3
    assert res.X_ma.shape == (1, 1, 512, 512)
