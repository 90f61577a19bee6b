"""Materials, phantoms and the metal generator: physical values, reproducibility, exact sizes, placement."""

import math

import numpy as np
import pytest
import torch

from dudocrop.ct import FanBeamOperator, hu_to_mu, mu_to_hu
from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.materials import (
    MATERIALS,
    SpectrumSpec,
    get_material,
    linear_attenuation,
    reference_energy_kev,
    spectrum,
)
from dudocrop.ct.metal import (
    SHAPES,
    MetalConfig,
    MetalObject,
    check_placement,
    count_sweep,
    describe,
    get_metal_config,
    rasterize_metal,
    sample_count_sweep,
    sample_metal,
    size_sweep,
)
from dudocrop.ct.phantoms import (
    body_mask,
    bone_mask,
    forbild_like,
    load_ct_small,
    random_anatomy,
    random_phantom,
    shepp_logan,
)
from dudocrop.ct.units import MU_WATER

# ---- materials and spectra ------------------------------------------------------------------------------


def test_attenuation_is_physical():
    e_ref = reference_energy_kev()
    assert 60 < e_ref < 68  # water attenuates 0.02 /mm near 64 keV (NIST XCOM: 0.0193 /mm at 70 keV)
    assert linear_attenuation("water", [e_ref])[0] == pytest.approx(MU_WATER, rel=1e-6)
    assert linear_attenuation("water", [70.0])[0] == pytest.approx(0.0193, rel=0.01)  # REFERENCE §3: 0.192 /cm
    e = [40.0, 64.0, 100.0]
    mus = {n: linear_attenuation(n, e) for n in MATERIALS}
    for n, mu in mus.items():
        if n != "gold":  # gold's K edge (80.7 keV) lies between 64 and 100 keV
            assert np.all(np.diff(mu) < 0), n
    assert mus["gold"][2] > mus["gold"][1]
    # at 64 keV: water < bone < Ti < steel < Co-Cr < Cu < amalgam < gold
    order = ["water", "cortical_bone", "titanium", "stainless_steel", "cocr", "copper", "amalgam", "gold"]
    at64 = [mus[n][1] for n in order]
    assert at64 == sorted(at64)
    # cortical bone reads ~1700-1800 HU at E_ref
    assert 1500 < mu_to_hu(linear_attenuation("bone", [e_ref])[0]) < 2000
    assert get_material("Ti").name == "titanium" and get_material("steel").density == 8.0


def test_unknown_material_lists_known_names():
    with pytest.raises(ValueError, match="unknown material 'unobtainium'.*titanium"):
        get_material("unobtainium")


def test_spectrum_binned_and_cached():
    s = spectrum(SpectrumSpec(energy_step_kev=2.0))
    assert s is spectrum(SpectrumSpec(energy_step_kev=2.0))
    assert s.fractions.sum() == pytest.approx(1.0)
    assert s.energies_kev.min() >= 15.0 and s.energies_kev.max() <= 120.0
    assert 55 < s.mean_energy_kev < 70
    coarse = spectrum(SpectrumSpec(energy_step_kev=5.0))
    assert coarse.energies_kev.size < s.energies_kev.size
    assert coarse.mean_energy_kev == pytest.approx(s.mean_energy_kev, rel=1e-3)  # photon-weighted bin energies
    with pytest.raises(ValueError, match="energy_step_kev"):
        SpectrumSpec(energy_step_kev=0.3)


# ---- analytic phantoms -----------------------------------------------------------------------------------


def test_shepp_logan_values_and_analytic_projection():
    g = get_geometry("small")
    ph = shepp_logan(g)
    img = ph.render(g)
    c = g.image_size // 2
    assert img[0, 0] == pytest.approx(-1000.0)
    # brain (+20 HU) between the ventricles at ~(0, -0.25) normalised, skull +1000 HU at the top
    assert img[c, c] == pytest.approx(20.0, abs=1e-3)
    assert img.max() == pytest.approx(1000.0, abs=1.0)
    # analytic line integrals agree with projecting the rendered image (Joseph FP) to ~1 %
    op = FanBeamOperator(g)
    fp = op.fp(hu_to_mu(torch.from_numpy(img))[None, None])[0, 0].numpy()
    ana = ph.line_integrals(g)
    assert np.abs(fp - ana).mean() / ana.mean() < 0.01
    # FBP of the exact sinogram reproduces the phantom in the brain (away from edges)
    rec = mu_to_hu(op.fbp(torch.from_numpy(ana)[None, None]))[0, 0].numpy()
    inner = (img > 0) & (img < 40)
    inner = inner & np.roll(inner, 3, 0) & np.roll(inner, -3, 0) & np.roll(inner, 3, 1) & np.roll(inner, -3, 1)
    assert np.median(np.abs(rec - img)[inner]) < 10.0


def test_forbild_like_renders_details():
    img = forbild_like("small").render("small")
    assert img.max() > 700 and (img < -900).any()
    assert ((img > 40) & (img < 60)).mean() > 0.2  # brain +50 HU is the bulk


# ---- random anatomy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["thorax", "abdomen", "pelvis"])
def test_body_phantom_anatomy(region):
    g = get_geometry("small")
    img = random_phantom("body", g, seed=4, region=region)
    assert img.shape == g.image_shape and img.dtype == np.float32
    body = body_mask(img)
    assert body.mean() > 0.3
    inside = img[body]
    assert ((inside > -150) & (inside < -60)).mean() > 0.03  # subcutaneous fat
    assert ((inside > 20) & (inside < 80)).mean() > 0.2  # soft tissue / organs
    assert inside.max() > 800  # cortical bone
    assert bone_mask(img).sum() > 20
    if region == "thorax":
        assert (inside < -600).mean() > 0.1  # lungs
    # the FOV corner is air: the body stays inside the reconstructable disc
    assert img[0, 0] == pytest.approx(-1000.0)


def test_head_phantom_skull_and_brain():
    img = random_phantom("head", "aapm_head", seed=2)
    assert 1300 < img.max() <= 2000 + 50  # skull 1500-2000 HU (texture adds a little)
    brain = img[(img > 0) & (img < 60)]
    assert brain.size > 0.2 * img.size
    assert 20 < np.median(brain) < 45


def test_random_phantom_reproducible_and_geometry_independent():
    a = random_phantom("body", "small", seed=11)
    b = random_phantom("body", "small", seed=11)
    c = random_phantom("body", "small", seed=12)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 10
    anat = random_anatomy("body", np.random.default_rng(11))
    np.testing.assert_array_equal(anat.render("small"), a)
    # the same anatomy in mm on two grids: same physical extent
    tiny = anat.render("tiny")
    frac_small = (a > -500).mean()
    frac_tiny = (tiny > -500).mean()
    assert frac_tiny == pytest.approx(frac_small, abs=0.03)
    with pytest.raises(ValueError, match="kind"):
        random_phantom("leg", "small", seed=0)
    with pytest.raises(ValueError, match="rng"):
        random_anatomy("body", -1)


def test_anatomy_shrinks_to_fit_small_fov():
    img = random_phantom("body", "syndeeplesion", seed=0)  # 154 mm FOV: the body is scaled down to fit
    g = get_geometry("syndeeplesion")
    xs, ys = g.pixel_centres
    r = np.hypot(xs[None, :], ys[:, None])
    assert (img[r > g.scan_radius] < -990).all()


def test_load_ct_small():
    native = load_ct_small()
    assert native.shape == (128, 128)
    assert native.min() >= -1100 and native.max() > 1000  # HU after RescaleIntercept -1024
    small = load_ct_small("small")
    assert small.shape == (128, 128) and small[0, 0] == pytest.approx(-1000.0)
    # 85 mm of anatomy in the 400 mm FOV: ~85/400 of the width
    cols = np.flatnonzero((small > -900).any(0))
    assert 0.15 < (cols[-1] - cols[0] + 1) / 128 < 0.3
    filled = load_ct_small("small", keep_spacing=False)
    assert (filled > -900).mean() > 0.3


# ---- metal -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("diameter", [3.0, 10.0, 25.0])
def test_equivalent_diameter_within_one_pixel(shape, diameter):
    g = get_geometry("aapm_body")
    o = MetalObject(shape, "titanium", (12.3, -40.7), diameter, angle=0.6, aspect=2.5, seed=3)
    maps = rasterize_metal([o], g)
    area = float(maps.total.sum()) * g.pixel_size**2
    assert abs(area - math.pi * (diameter / 2) ** 2) <= g.pixel_size**2
    assert set(maps.coverage) == {"titanium"}


def test_coverage_fractional_at_edges():
    g = get_geometry("small")
    o = MetalObject("disc", "steel", (3.1, 2.2), 15.0)
    maps = rasterize_metal([o], g)
    cov = maps.total
    edge = (cov > 0) & (cov < 1)
    assert edge.sum() >= 8  # a partial-volume ring
    assert (cov == 1).sum() > 0
    np.testing.assert_array_equal(maps.mask, cov > 0.5)
    # overlapping objects never hold more than one pixel of metal
    two = rasterize_metal([o, MetalObject("disc", "Ti", (6.0, 2.2), 15.0)], g)
    assert two.total.max() <= 1.0 + 1e-6
    assert np.allclose(two.coverage["titanium"] + two.coverage["stainless_steel"], two.total, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_sample_count_exact_and_inside_body(n):
    g = get_geometry("small")
    hu = random_phantom("body", g, seed=1, region="abdomen")
    objs = sample_metal(MetalConfig(count=n, diameter_mm=(3.0, 12.0)), hu, g, rng=5)
    assert len(objs) == n
    body = body_mask(hu)
    for o in objs:
        cov = rasterize_metal([o], g).total
        assert body[cov > 0].all()
    d = describe(objs)
    assert d["metal_count"] == n and len(d["metal_materials"]) == n
    for o, c in zip(objs, d["metal_centroids_mm"]):  # the area centroid, checked against the raster
        cov = rasterize_metal([o], g).total
        xs, ys = g.pixel_centres
        cx = float((cov * xs[None, :]).sum() / cov.sum())
        cy = float((cov * ys[:, None]).sum() / cov.sum())
        assert abs(cx - c[0]) < 0.5 * g.pixel_size and abs(cy - c[1]) < 0.5 * g.pixel_size


def test_placement_in_bone_and_soft_tissue():
    g = get_geometry("aapm_body")
    hu = random_phantom("body", g, seed=3, region="pelvis")
    bone = bone_mask(hu)
    xs, ys = g.pixel_centres
    objs = sample_metal(MetalConfig(count=3, diameter_mm=(3.0, 6.0), placement="bone"), hu, g, rng=0)
    for o in objs:
        i, j = int(np.argmin(np.abs(ys - o.centre_mm[1]))), int(np.argmin(np.abs(xs - o.centre_mm[0])))
        assert bone[i, j]
    soft = sample_metal(MetalConfig(count=3, diameter_mm=(3.0, 8.0), placement="soft_tissue"), hu, g, rng=0)
    cov = rasterize_metal(soft, g).total
    assert not bone[cov > 0].any()
    # explicit centres are kept
    pinned = sample_metal(MetalConfig(centres_mm=((10.0, 5.0), (-20.0, 0.0))), hu, g, rng=0)
    assert [o.centre_mm for o in pinned] == [(10.0, 5.0), (-20.0, 0.0)]


def _where(o: MetalObject, body: np.ndarray, g) -> str:
    """'air' if the object's raster lies wholly outside ``body``, 'skin' if it crosses it, else 'body'."""
    cov = rasterize_metal([o], g, 2).total > 0
    return "air" if not body[cov].any() else "skin" if (~body[cov]).any() else "body"


def test_placement_in_the_air_and_on_the_skin():
    """Issue 19: metal outside the patient (leads, clips) keeps margin_mm from the skin and stays in the
    reconstructable disc; metal on the skin straddles the body outline."""
    from scipy import ndimage

    g = get_geometry("small")
    hu = random_phantom("body", g, seed=1, region="abdomen")
    body = body_mask(hu)
    dist = ndimage.distance_transform_edt(~body) * g.pixel_size  # mm from the body
    xs, ys = g.pixel_centres
    rad = np.hypot(xs[None, :], ys[:, None])
    cfg = MetalConfig(count=3, diameter_mm=(4.0, 10.0), placement="air", margin_mm=5.0)
    air = sample_metal(cfg, hu, g, rng=0)
    for o in air:
        cov = rasterize_metal([o], g).total > 0
        assert _where(o, body, g) == "air"
        assert dist[cov].min() >= cfg.margin_mm - g.pixel_size  # the raster's pixels, within a pixel
        assert rad[cov].max() <= min(g.fov_radius, g.scan_radius)
    check_placement(air, hu, g, "air")
    skin = sample_metal(MetalConfig(count=3, diameter_mm=(4.0, 10.0), placement="skin"), hu, g, rng=0)
    assert [_where(o, body, g) for o in skin] == ["skin"] * 3
    check_placement(skin, hu, g, "skin")
    with pytest.raises(ValueError, match="touches the body"):
        check_placement(skin[:1], hu, g, "air")
    with pytest.raises(ValueError, match="does not cross the skin"):
        check_placement(air[:1], hu, g, "skin")
    with pytest.raises(ValueError, match="leaves the body"):
        check_placement(skin[:1], hu, g, "body")


def test_air_and_skin_fractions_are_the_share_of_objects_placed_there():
    g = get_geometry("small")
    hu = random_phantom("body", g, seed=2, region="pelvis")
    body = body_mask(hu)
    cfg = MetalConfig(count=4, diameter_mm=(3.0, 6.0), air_fraction=0.3, skin_fraction=0.2, min_gap_mm=1.0)
    kinds = [_where(o, body, g) for seed in range(25) for o in sample_metal(cfg, hu, g, rng=seed)]
    n = len(kinds)
    assert n == 100
    # binomial(100, p): within 3.5 standard deviations
    for kind, p in (("air", 0.3), ("skin", 0.2), ("body", 0.5)):
        assert abs(kinds.count(kind) - n * p) <= 3.5 * math.sqrt(n * p * (1 - p)), (kind, kinds.count(kind))
    everything = MetalConfig(count=3, diameter_mm=(3.0, 6.0), air_fraction=1.0)
    assert {_where(o, body, g) for o in sample_metal(everything, hu, g, rng=0)} == {"air"}
    # the synthetic source's body preset sees them; implants anchored in bone never leave it
    assert get_metal_config("aapm_like").air_fraction > 0 and get_metal_config("aapm_like").skin_fraction > 0
    assert get_metal_config("spine").air_fraction == 0 == get_metal_config("hip").skin_fraction
    for bad in (dict(air_fraction=1.5), dict(skin_fraction=-0.1), dict(air_fraction=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MetalConfig(**bad)
    with pytest.raises(ValueError, match="air_fraction \\+ skin_fraction"):
        MetalConfig(air_fraction=0.6, skin_fraction=0.6)


def test_sample_metal_reproducible():
    hu = random_phantom("body", "small", seed=1)
    a = sample_metal("aapm_like", hu, "small", rng=9)
    b = sample_metal("aapm_like", hu, "small", rng=9)
    c = sample_metal("aapm_like", hu, "small", rng=10)
    assert a == b and a != c


def test_sweeps():
    hu = random_phantom("body", "small", seed=1, region="abdomen")
    sweep = sample_count_sweep(MetalConfig(diameter_mm=(3.0, 8.0)), hu, "small", n_max=4, rng=2)
    assert [len(s) for s in sweep] == [1, 2, 3, 4]
    assert all(s[:-1] == sweep[-1][: len(s) - 1] for s in sweep)  # nested: the same slice gains objects
    base = sweep[0][0]
    sizes = size_sweep(base, [2.0, 4.0, 8.0], hu, "small")
    areas = [rasterize_metal(s, "small").total.sum() for s in sizes]
    assert areas == sorted(areas) and len(sizes) == 3
    assert all(s[0].centre_mm == base.centre_mm and s[0].material == base.material for s in sizes)
    with pytest.raises(ValueError, match="leaves the body"):
        size_sweep(MetalObject("disc", "Ti", (0.0, 0.0), 5.0), [5.0, 500.0], hu, "small")


def test_metal_bad_input():
    with pytest.raises(ValueError, match="shape"):
        MetalObject("star", "Ti", (0.0, 0.0), 5.0)
    with pytest.raises(ValueError, match="unknown material"):
        MetalObject("disc", "kryptonite", (0.0, 0.0), 5.0)
    with pytest.raises(ValueError, match="diameter_mm"):
        MetalObject("disc", "Ti", (0.0, 0.0), 0.0)
    with pytest.raises(ValueError, match="diameter_mm"):
        MetalObject("disc", "Ti", (0.0, 0.0), float("nan"))
    with pytest.raises(ValueError, match="centre_mm"):
        MetalObject("disc", "Ti", (0.0, float("inf")), 5.0)
    with pytest.raises(ValueError, match="aspect"):
        MetalObject("rod", "Ti", (0.0, 0.0), 5.0, aspect=0.5)
    with pytest.raises(ValueError, match="count"):
        MetalConfig(count=0)
    with pytest.raises(ValueError, match="count"):
        MetalConfig(count=(3, 1))
    with pytest.raises(ValueError, match="placement"):
        MetalConfig(placement="lung")
    with pytest.raises(ValueError, match="objects"):
        count_sweep([])
    with pytest.raises(ValueError, match="diameters_mm"):
        size_sweep(MetalObject("disc", "Ti", (0.0, 0.0), 5.0), [])
    hu = random_phantom("body", "small", seed=1)
    with pytest.raises(ValueError, match="clean_hu"):
        sample_metal("aapm_like", hu[:-1], "small")
    bad = hu.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="clean_hu"):
        sample_metal("aapm_like", bad, "small")
    with pytest.raises(ValueError, match="config"):  # bone placement in a slice without bone
        sample_metal(MetalConfig(placement="bone", max_tries=20), np.zeros((128, 128), np.float32), "small")
    with pytest.raises(ValueError, match="unknown metal config"):
        sample_metal("titanium_everywhere", hu, "small")
