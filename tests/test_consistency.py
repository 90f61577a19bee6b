"""Measured-data consistency (issue 25 §2): the score separates an image prior that erased an organ from faithful
images, and the OSRO safeguard built on it keeps X_o near NMAR's error when the image prior is wrong while costing
nothing when it is right."""

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from dudocrop.classic.li import li
from dudocrop.classic.nmar import nmar, prior_completion
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.patients import patient_phantom
from dudocrop.ct.simulate import simulate
from dudocrop.ct.units import mu_to_hu
from dudocrop.data.synthetic import metal_config_for
from dudocrop.metrics.consistency import ConsistencyCheck, consistency_score
from dudocrop.metrics.image import body_mask, psnr, rmse
from dudocrop.pipeline.osro import (
    DEFAULT_SAFEGUARD,
    DEFAULT_SAFEGUARD_COMPLETION,
    OSROConfig,
    default_safeguard,
    osro,
    osro_region,
)

SEEDS = (100, 102, 104)  # 104: NMAR itself is far from consistent there, the hardest of the probe's 8 slices


def organ_out(x_ref: torch.Tensor, metal: torch.Tensor, onto: torch.Tensor | None = None) -> torch.Tensor:
    """X_ref (or ``onto``) with X_ref's largest soft-tissue organ (a connected 30-250 HU region away from the metal)
    painted as fat: what an image prior trained on the wrong anatomy does to a kidney or a liver."""
    x = x_ref[0, 0].numpy()
    soft = (x > 30) & (x < 250) & ~ndimage.binary_dilation(metal[0, 0].numpy() > 0, iterations=3)
    lab, n = ndimage.label(ndimage.binary_opening(soft))
    k = 1 + int(np.argmax(ndimage.sum_labels(soft, lab, np.arange(1, n + 1))))
    organ = lab == k
    out = (x if onto is None else onto[0, 0].numpy()).copy()
    out[organ] = -90.0
    return torch.from_numpy(out)[None, None]


@pytest.fixture(scope="module")
def cases():
    op = FanBeamOperator("small")
    out = []
    for s in SEEDS:
        clean = patient_phantom("body", op.geometry, s, region="abdomen")
        res = simulate(clean, op, metal_config_for("body", op.geometry), "aapm_like", seed=s)
        x_nmar, y_nmar = nmar(res.Y_ma, res.metal_mask > 0, res.X_ma, op, trace=res.metal_trace,
                              return_sinogram=True)
        out.append((op, res, x_nmar, y_nmar))
    return out


def _err(x, res):
    roi = body_mask(res.X_ref)
    return float(rmse(x, res.X_ref, res.metal_mask, roi)[0])


def test_score_separates_an_erased_organ_from_faithful_images(cases):
    for op, res, x_nmar, _ in cases:
        m, tr = res.metal_mask, res.metal_trace
        x_li = li(res.Y_ma, m > 0, res.X_ma, op, trace=tr)
        wrong = organ_out(res.X_ref, m)
        smooth = torch.from_numpy(ndimage.gaussian_filter(res.X_ref[0, 0].numpy(), 0.7))[None, None]
        s = {k: float(consistency_score(x, x_nmar, res.Y_ma, tr, op, m)[0])
             for k, x in (("ref", res.X_ref), ("li", x_li), ("smooth", smooth), ("wrong", wrong),
                          ("nmar", x_nmar))}
        assert s["nmar"] == pytest.approx(1.0)
        assert max(s["ref"], s["li"], s["smooth"]) < 3.0, s  # faithful (a denoised image too)
        assert s["wrong"] > 8.0, s
        # the naive residual (the raw FP(x) − Y_ma) would not separate them: the FBP round trip dominates
        assert _err(wrong, res) > _err(x_nmar, res)


def _run(prior, y_nmar, res, op, cfg, guard=None, completion=None):
    fbp = lambda y: mu_to_hu(op.fbp(y))  # noqa: E731 - OSRO in HU / line integrals: units cancel in Eq. 10-15
    region = osro_region(res.X_ma, res.metal_mask, op.geometry)
    return osro(prior, y_nmar, res.Y_ma, res.metal_trace, fbp, None, region, cfg, guard, completion=completion)


def test_safeguard_keeps_a_wrong_prior_near_nmar_and_costs_nothing_when_it_is_right(cases):
    cfg = OSROConfig(alpha=0.9, beta=0.1, norm="affine", residual_refine=False)  # the fusion issue 25 met
    guarded = replace(cfg, safeguard=DEFAULT_SAFEGUARD)
    ratios = []
    for op, res, x_nmar, y_nmar in cases:
        m = res.metal_mask
        guard = ConsistencyCheck.build(torch.where(m > 0, torch.zeros_like(res.X_ma), res.X_ma), res.Y_ma,
                                       res.metal_trace, op, m)
        e_nmar = _err(x_nmar, res)
        wrong = organ_out(res.X_ref, m, onto=x_nmar)  # as good as NMAR elsewhere, the organ erased
        un = _run(wrong, y_nmar, res, op, cfg)
        gd = _run(wrong, y_nmar, res, op, guarded, guard)
        assert _err(un.X_o, res) > 1.3 * e_nmar, (_err(un.X_o, res), e_nmar)
        ratios.append(_err(gd.X_o, res) / e_nmar)
        assert gd.fallback[0] > 0.5 and gd.consistency[0] <= DEFAULT_SAFEGUARD + 1e-4
        # in distribution: a faithful prior is left alone (docs/consistency.md: a smoothed prior is not, when Eq. 12's
        # affine fit mis-scales it)
        un_g = _run(res.X_ref, y_nmar, res, op, cfg)
        gd_g = _run(res.X_ref, y_nmar, res, op, guarded, guard)
        roi = body_mask(res.X_ref)
        cost = float(psnr(un_g.X_o, res.X_ref, m, roi)[0] - psnr(gd_g.X_o, res.X_ref, m, roi)[0])
        assert cost <= 0.2, cost
    # within 1.1x NMAR's error on average; seed 104 (NMAR's own residual is large there) ends at 1.11x
    assert np.mean(ratios) <= 1.1 and max(ratios) <= 1.12, ratios
    with pytest.raises(ValueError, match="safeguard"):
        OSROConfig(safeguard=0.5)
    with pytest.raises(ValueError, match="guard"):
        op, res, _, y_nmar = cases[0]
        _run(res.X_ref, y_nmar, res, op, guarded)


def _complete(x, y, metal, trace, op):  # HU in, HU out: OSRO's units here
    return prior_completion(x, y, metal, trace, op)


def test_completion_undoes_most_of_a_wrong_prior_and_the_safeguard_the_rest():
    """OSROConfig.completion: X_o only decides the metal trace of the measured sinogram, so an organ painted out of
    the image prior comes back from the measured rays (seed 100: ~1.0x NMAR's error, against > 1.3x for Eq. 15
    alone) except where the trace crosses it (seed 105: ~2.3x). With the safeguard at its completion bound the
    result stays within 1.1x NMAR's error on both, and a faithful prior loses at most 0.2 dB to the safeguard."""
    op = FanBeamOperator("small")
    cfg = OSROConfig(alpha=0.9, beta=0.1, norm="affine", residual_refine=False, completion=True)
    guarded = replace(cfg, safeguard=default_safeguard(cfg))
    assert guarded.safeguard == DEFAULT_SAFEGUARD_COMPLETION
    ratios = {}
    for s in (100, 105):
        clean = patient_phantom("body", op.geometry, s, region="abdomen")
        res = simulate(clean, op, metal_config_for("body", op.geometry), "aapm_like", seed=s)
        m, tr = res.metal_mask, res.metal_trace
        x_nmar, y_nmar = nmar(res.Y_ma, m > 0, res.X_ma, op, trace=tr, return_sinogram=True)
        guard = ConsistencyCheck.build(torch.where(m > 0, torch.zeros_like(res.X_ma), res.X_ma), res.Y_ma, tr, op, m)
        complete = functools.partial(_complete, y=res.Y_ma, metal=m > 0, trace=tr, op=op)
        wrong = organ_out(res.X_ref, m, onto=x_nmar)
        e_nmar = _err(x_nmar, res)
        ratios[s] = tuple(_err(_run(wrong, y_nmar, res, op, c, guard, complete).X_o, res) / e_nmar
                          for c in (replace(cfg, completion=False), cfg, guarded))
        un_g = _run(res.X_ref, y_nmar, res, op, cfg, guard, complete)
        gd_g = _run(res.X_ref, y_nmar, res, op, guarded, guard, complete)
        roi = body_mask(res.X_ref)
        cost = float(psnr(un_g.X_o, res.X_ref, m, roi)[0] - psnr(gd_g.X_o, res.X_ref, m, roi)[0])
        assert cost <= 0.2, (s, cost)
    eq15, done, safe = zip(*ratios.values())
    assert min(eq15) > 1.3, ratios
    assert done[0] <= 1.1 < 1.5 < done[1], ratios  # the completion alone: enough on 100, not on 105
    assert max(safe) <= 1.1, ratios
    with pytest.raises(ValueError, match="completion"):
        _run(res.X_ref, y_nmar, res, op, cfg, guard)
