"""OSRO (paper Eq. 10-15) on small tensors and on a real fan-beam geometry."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.trace import metal_trace
from dudocrop.pipeline.osro import OSROConfig, affine_norm, fuse, minmax_norm, norm, osro, sinogram_prior


def test_minmax_norm_matches_eq11_per_slice():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(3, 1, 8, 8, generator=g) * 5 - 2
    r = torch.rand(3, 1, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
    out = minmax_norm(d, r)
    for i in range(3):
        assert float(out[i].min()) == pytest.approx(float(r[i].min()), abs=1e-6)
        assert float(out[i].max()) == pytest.approx(float(r[i].max()), abs=1e-6)
        # an affine map preserves order and relative spacing
        z = (d[i] - d[i].min()) / (d[i].max() - d[i].min())
        zo = (out[i] - out[i].min()) / (out[i].max() - out[i].min())
        assert torch.allclose(z, zo, atol=1e-5)


def test_minmax_norm_uses_only_the_region_and_handles_constants():
    d = torch.zeros(1, 1, 4, 4)
    d[..., 0, 0] = 100.0  # an outlier outside the region
    d[..., 1:, 1:] = torch.arange(9.0).view(3, 3)
    region = torch.zeros_like(d, dtype=torch.bool)
    region[..., 1:, 1:] = True
    ref = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    out = minmax_norm(d, ref, region)
    assert float(out[region].min()) == pytest.approx(float(ref[region].min()))
    assert float(out[region].max()) == pytest.approx(float(ref[region].max()))
    const = minmax_norm(torch.full((1, 1, 4, 4), 3.0), ref)
    assert torch.isfinite(const).all() and torch.allclose(const, torch.full_like(const, 0.5))
    with pytest.raises(ValueError, match="same shape"):
        minmax_norm(d, ref[..., :2])
    with pytest.raises(ValueError, match="region"):
        minmax_norm(d, ref, torch.zeros_like(region))


@pytest.mark.parametrize("sigma", [0.0, 1.5, 4.0])
def test_affine_norm_recovers_an_affine_map_exactly_per_slice(sigma):
    """δ = a·Δ + b (+ anything outside the region) gives back δ on the region, whatever the smoothing: the fit is
    linear, and smoothing both images alike keeps the relation exact."""
    g = torch.Generator().manual_seed(3)
    d = torch.rand(3, 1, 24, 20, generator=g)
    a = torch.tensor([0.5, 1.0, 2.5]).view(3, 1, 1, 1)
    b = torch.tensor([0.1, -0.2, 0.0]).view(3, 1, 1, 1)
    region = torch.ones_like(d, dtype=torch.bool)
    region[..., :6, :5] = False
    ref = torch.where(region, a * d + b, torch.full_like(d, 50.0))  # outliers outside the region
    out = affine_norm(d, ref, region, sigma)
    assert torch.allclose(out[region], ref[region], atol=1e-4)


def test_affine_norm_ignores_what_lies_outside_the_region_and_handles_constants():
    g = torch.Generator().manual_seed(4)
    d, ref = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    region = torch.zeros_like(d, dtype=torch.bool)
    region[..., 3:13, 2:14] = True
    hot_d, hot_ref = d.clone(), ref.clone()
    hot_d[~region], hot_ref[~region] = 80.0, -30.0  # metal / air outside the region
    for sigma in (0.0, 4.0):
        assert torch.allclose(affine_norm(hot_d, hot_ref, region, sigma)[region],
                              affine_norm(d, ref, region, sigma)[region], atol=1e-5)
    const = affine_norm(torch.full_like(d, 3.0), ref, region, 4.0)
    assert torch.isfinite(const).all()
    assert torch.allclose(const[:, :, 0, 0], ref.flatten(1)[:, region[0].flatten()].mean(1)[:, None], atol=1e-5)
    with pytest.raises(ValueError, match="region"):
        affine_norm(d, ref, torch.zeros_like(region))


def test_norm_follows_the_config():
    g = torch.Generator().manual_seed(5)
    d, ref = torch.rand(1, 1, 12, 12, generator=g), torch.rand(1, 1, 12, 12, generator=g)
    assert torch.equal(norm(d, ref, None, OSROConfig()), minmax_norm(d, ref))
    assert torch.equal(norm(d, ref, None, OSROConfig(norm="affine", norm_sigma=2.0)), affine_norm(d, ref, None, 2.0))
    with pytest.raises(ValueError, match="OSROConfig.norm must be one of"):
        OSROConfig(norm="zscore")
    with pytest.raises(ValueError, match="norm_sigma"):
        OSROConfig(norm="affine", norm_sigma=-1.0)


def test_eq10_keeps_raw_data_outside_the_trace():
    y_ma, y_hat = torch.rand(2, 1, 6, 5), torch.rand(2, 1, 6, 5)
    trace = torch.rand(2, 1, 6, 5) > 0.7
    y_p = sinogram_prior(y_hat, y_ma, trace)
    assert torch.equal(y_p[~trace], y_ma[~trace]) and torch.equal(y_p[trace], y_hat[trace])
    assert torch.equal(sinogram_prior(y_hat, y_ma, trace, fidelity=False), y_hat)


def test_config_ranges_are_checked():
    with pytest.raises(ValueError, match="alpha"):
        OSROConfig(alpha=1.5)


def _disc(n, cx, cy, r):
    yy, xx = np.mgrid[:n, :n]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32)


def test_osro_with_perfect_priors_recovers_the_clean_image():
    """With oracle priors (the clean sinogram and image) every stage returns the clean image."""
    op = FanBeamOperator("tiny")
    clean = torch.from_numpy(0.5 * _disc(64, 32, 32, 26) + 0.3 * _disc(64, 40, 28, 6))[None, None]
    metal = torch.from_numpy(_disc(64, 22, 36, 2))[None, None]
    y_ref = op.fp(clean)
    trace = metal_trace(metal, op)
    y_ma = y_ref + 8.0 * trace  # metal corrupts only the trace
    x_prime_true = op.fbp(y_ref)
    res = osro(x_prime_true, y_ref, y_ma, trace, op.fbp, refine=lambda r: torch.zeros_like(r))
    assert torch.allclose(res.Y_p, y_ref)
    assert torch.allclose(res.X_p, res.X_p_prime, atol=1e-5)
    assert float((res.X_o - x_prime_true).abs().max()) < 1e-4 + 1e-4 * float(x_prime_true.abs().max())


def test_fuse_ablation_switches():
    g = torch.Generator().manual_seed(1)
    X_p, X_pp, X_rh = (torch.rand(1, 1, 8, 8, generator=g) for _ in range(3))
    _, xo = fuse(X_p, X_pp, X_rh, None, OSROConfig(residual_refine=False, fusion=False))
    assert torch.equal(xo, X_p)
    _, xo = fuse(X_p, X_pp, X_rh, None, OSROConfig(residual_refine=False, alpha=0.3, beta=0.7))
    assert torch.allclose(xo, 0.3 * X_p + 0.7 * X_pp)
    xh, _ = fuse(X_p, X_pp, X_rh, None, OSROConfig(k=1.0, normalize=False))
    assert torch.allclose(xh, X_p - X_rh)
    xh, _ = fuse(X_p, X_pp, X_rh, None, OSROConfig(k=1.0))
    assert float(xh.min()) == pytest.approx(float(X_p.min())) and float(xh.max()) == pytest.approx(float(X_p.max()))


def test_trust_map_and_spatial_trust_keep_the_image_prior_only_near_the_metal():
    """OSROConfig.trust (beyond the paper): the share of a pixel's rays on the metal trace is 1 at the metal and falls
    with distance; X̂_p is kept where that share reaches ``trust`` and replaced by X'_p in proportion below it."""
    from dudocrop.pipeline.osro import trust_map

    op = FanBeamOperator("tiny")
    n = op.geometry.image_shape[0]
    mask = torch.zeros(1, 1, n, n)
    mask[..., n // 2 - 2:n // 2 + 2, n // 2 + 10:n // 2 + 14] = 1.0  # a 4x4 px metal block right of the centre
    f = trust_map(metal_trace(mask, op), op)
    assert f.shape == mask.shape and float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    assert float(f[mask > 0].min()) > 0.9  # every ray through the metal is on the trace
    near, far = float(f[0, 0, n // 2, n // 2 + 16]), float(f[0, 0, n // 2, n // 2 - 20])
    assert near > 2 * far > 0, (near, far)
    x_p, x_prime = torch.full_like(f, 0.3), torch.full_like(f, 0.2)
    cfg = OSROConfig(k=0.0, alpha=1.0, beta=0.0, trust=0.5, normalize=False, residual_refine=False)
    x_hat, x_o = fuse(x_p, x_prime, None, None, cfg, f)
    w = (f / 0.5).clamp(max=1.0)
    torch.testing.assert_close(x_hat, w * 0.3 + (1 - w) * 0.2)
    assert torch.all(x_o[f >= 0.5] == x_p[f >= 0.5])
    torch.testing.assert_close(fuse(x_p, x_prime, None, None, OSROConfig(k=0.0, alpha=1.0, beta=0.0,
                                                                         normalize=False), f)[1], x_p)
    with pytest.raises(ValueError, match="trust"):
        fuse(x_p, x_prime, None, None, cfg)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="trust"):
            OSROConfig(trust=bad)


def test_completion_is_the_last_step_and_needs_its_function():
    """OSROConfig.completion hands Eq. 15's X_o (after the safeguard) to the measured sinogram's completion, and
    nothing else; without the function it is refused by name, and the switch must be a bool."""
    from dudocrop.pipeline.osro import complete, guarded_fuse

    x_p, x_prime = torch.full((1, 1, 4, 4), 0.3), torch.full((1, 1, 4, 4), 0.2)
    cfg = OSROConfig(k=0.0, alpha=0.5, beta=0.5, normalize=False, completion=True)
    seen = []
    _, x_o, _, _ = guarded_fuse(x_p, x_prime, None, None, cfg, completion=lambda x: seen.append(x) or x + 1)
    torch.testing.assert_close(seen[0], torch.full_like(x_p, 0.25))  # Eq. 15's X_o
    torch.testing.assert_close(x_o, torch.full_like(x_p, 1.25))
    assert complete(x_p, replace(cfg, completion=False), None) is x_p
    with pytest.raises(ValueError, match="completion"):
        guarded_fuse(x_p, x_prime, None, None, cfg)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="completion"):
            OSROConfig(completion=bad)
