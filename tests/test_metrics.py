"""PSNR / SSIM / RMSE in HU: analytic values, skimage agreement, windows, masks, body mask, batching, bad input."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from dudocrop.metrics import (
    CT_RANGE_HU,
    DISPLAY_WINDOW_HU,
    body_mask,
    image_metrics,
    psnr,
    rmse,
    ssim,
)
from dudocrop.metrics.image import SSIM_K1, SSIM_WINDOW


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None] if np.ndim(a) == 2 else torch.as_tensor(a)


def _ellipse(n, cx, cy, a, b):
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1


def _textured(n=96, seed=0) -> np.ndarray:
    """A body-like slice: air, a soft-tissue ellipse with smooth texture, a bone disc, a lung-like hole."""
    rng = np.random.default_rng(seed)
    hu = np.full((n, n), -1000.0)
    body = _ellipse(n, n / 2, n / 2, 0.42 * n, 0.3 * n)
    from scipy.ndimage import gaussian_filter

    hu[body] = 40 + 60 * gaussian_filter(rng.normal(size=(n, n)), 2)[body]
    hu[_ellipse(n, 0.5 * n, 0.62 * n, 0.08 * n, 0.08 * n)] = 900
    hu[_ellipse(n, 0.3 * n, 0.45 * n, 0.08 * n, 0.1 * n)] = -850
    return hu.astype(np.float32)


def test_identical_images():
    x = _t(_textured())
    assert math.isinf(float(psnr(x, x)[0])) and float(psnr(x, x)[0]) > 0
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(rmse(x, x)[0]) == 0.0


@pytest.mark.parametrize("offset", [5.0, 20.0, -20.0])
def test_constant_offset_has_analytic_values(offset):
    ref = _textured()
    x = ref + offset  # all values stay inside the full CT range (air -1000 - 20 > -1024): nothing is clipped
    assert float(rmse(_t(x), _t(ref))[0]) == pytest.approx(abs(offset), rel=1e-5)
    w = CT_RANGE_HU[1] - CT_RANGE_HU[0]
    assert float(psnr(_t(x), _t(ref))[0]) == pytest.approx(20 * math.log10(w / abs(offset)), abs=1e-3)
    # uniform images a and a + d: variances and covariance vanish, SSIM is the luminance term
    # (2 a' b' + C1) / (a'^2 + b'^2 + C1) with a', b' the window-normalised values
    a = 40.0
    ua, ub = (a - CT_RANGE_HU[0]) / w, (a + offset - CT_RANGE_HU[0]) / w
    c1 = SSIM_K1**2
    want = (2 * ua * ub + c1) / (ua * ua + ub * ub + c1)
    flat = np.full((32, 32), a, dtype=np.float32)
    assert float(ssim(_t(flat + offset), _t(flat))[0]) == pytest.approx(want, abs=1e-10)


def test_window_sets_the_data_range():
    ref = np.zeros((32, 32), dtype=np.float32)
    x = ref + 10.0
    lo, hi = DISPLAY_WINDOW_HU
    assert float(psnr(_t(x), _t(ref), window=DISPLAY_WINDOW_HU)[0]) == pytest.approx(20 * math.log10((hi - lo) / 10))
    # values beyond the window are clipped before comparison: 5000 vs 3000 HU is no error in [-175, 275]
    assert math.isinf(float(psnr(_t(ref + 5000), _t(ref + 3000), window=DISPLAY_WINDOW_HU)[0]))
    assert float(rmse(_t(ref + 5000), _t(ref + 3000), window=DISPLAY_WINDOW_HU)[0]) == 0.0
    assert float(rmse(_t(ref + 5000), _t(ref + 3000))[0]) == pytest.approx(2000.0)


@pytest.mark.parametrize("window", [CT_RANGE_HU, DISPLAY_WINDOW_HU])
def test_ssim_matches_skimage(window):
    ref = _textured()
    x = ref + np.random.default_rng(1).normal(0, 40, ref.shape).astype(np.float32)
    lo, hi = window
    norm = lambda a: (np.clip(a.astype(np.float64), lo, hi) - lo) / (hi - lo)  # noqa: E731
    want = structural_similarity(norm(x), norm(ref), data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    got = float(ssim(_t(x), _t(ref), window=window)[0])
    assert abs(got - want) < 1e-3
    assert 0.3 < got < 0.99  # a real comparison, not a degenerate one


def test_metal_pixels_are_excluded():
    ref = _textured()
    metal = _ellipse(ref.shape[0], 60, 50, 4, 4)
    x = ref + np.random.default_rng(2).normal(0, 20, ref.shape).astype(np.float32)
    x_metal = np.where(metal, 3000.0, x).astype(np.float32)  # reinserted metal: huge "error" on its pixels
    m = torch.from_numpy(metal)[None, None]
    for f in (psnr, rmse, ssim):
        assert float(f(_t(x_metal), _t(ref), m)[0]) == pytest.approx(float(f(_t(x), _t(ref), m)[0]), rel=1e-12)
        assert float(f(_t(x_metal), _t(ref), m)[0]) != pytest.approx(float(f(_t(x_metal), _t(ref))[0]), rel=1e-3)
    # the RMSE equals the plain RMSE over the kept pixels
    want = float(np.sqrt(np.mean((x - ref)[~metal].astype(np.float64) ** 2)))
    assert float(rmse(_t(x_metal), _t(ref), m)[0]) == pytest.approx(want, rel=1e-6)


def test_roi_restricts_the_evaluation():
    ref = _textured()
    n = ref.shape[0]
    roi = body_mask(_t(ref))
    x = ref.copy()
    x[:4, :] += 500  # an error in the air above the body, far (> 5 px) from it
    assert math.isinf(float(psnr(_t(x), _t(ref), roi=roi)[0]))
    assert float(ssim(_t(x), _t(ref), roi=roi)[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim(_t(x), _t(ref))[0]) < 0.99
    assert float(rmse(_t(x), _t(ref), roi=roi)[0]) == 0.0
    assert float(rmse(_t(x), _t(ref))[0]) == pytest.approx(math.sqrt(4 * n * 500.0**2 / n**2), rel=1e-5)


def test_body_mask_finds_the_ellipse():
    n = 96
    body = _ellipse(n, 48, 46, 38, 26)
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[body] = 30.0
    hu[_ellipse(n, 35, 46, 8, 10)] = -850  # lung: a hole to fill
    hu[_ellipse(n, 60, 46, 5, 5)] = 1000
    hu[88:92, 10:86] = 200  # the table, not touching the body
    hu[3, 3] = 50  # a speck
    m = body_mask(_t(hu))
    assert m.dtype == torch.bool and m.shape == (1, 1, n, n)
    assert torch.equal(m[0, 0], torch.from_numpy(body))


def test_metrics_are_batched():
    refs = np.stack([_textured(seed=s) for s in range(3)])[:, None]
    xs = refs + np.random.default_rng(3).normal(0, 30, refs.shape).astype(np.float32)
    metal = np.zeros(refs.shape, dtype=bool)
    metal[1, 0, 40:44, 40:44] = True
    out = image_metrics(torch.from_numpy(xs), torch.from_numpy(refs), torch.from_numpy(metal))
    for k, f in (("psnr", psnr), ("ssim", ssim), ("rmse", rmse)):
        assert out[k].shape == (3,) and out[k].dtype == torch.float64
        for i in range(3):
            one = f(torch.from_numpy(xs[i:i + 1]), torch.from_numpy(refs[i:i + 1]), torch.from_numpy(metal[i:i + 1]))
            assert float(out[k][i]) == pytest.approx(float(one[0]), rel=1e-12)
    masks = body_mask(torch.from_numpy(refs))
    assert masks.shape == (3, 1, 96, 96)


def test_bad_input_names_the_argument():
    x = _t(_textured())
    with pytest.raises(ValueError, match="ref"):
        psnr(x, x[..., :-1])
    with pytest.raises(ValueError, match="x"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="x"):
        rmse(torch.full_like(x, float("nan")), x)
    with pytest.raises(ValueError, match="ref"):
        rmse(x, torch.full_like(x, float("inf")))
    with pytest.raises(ValueError, match="metal_mask"):
        psnr(x, x, torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="roi"):
        ssim(x, x, roi=torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="window"):
        psnr(x, x, window=(275, -175))
    with pytest.raises(ValueError, match="window"):
        ssim(x, x, window=None)
    with pytest.raises(ValueError, match="metal_mask / roi"):
        rmse(x, x, torch.ones_like(x, dtype=torch.bool))
    with pytest.raises(ValueError, match="x_hu"):
        body_mask(x[0])
    with pytest.raises(ValueError, match=str(SSIM_WINDOW)):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
