"""The DuDoCROP object (Algorithm 2): wiring, units and the Table V rows, checked with oracle denoisers.

An oracle noise model knows the clean target F_0 of its batch and returns the true ε_t (Eq. 6), so each IR-SDE
prior is exact; what remains is the pipeline itself (normalisation, Eq. 10-15, FBP, metal reinsertion), which must
then beat LI by a wide margin. Untrained tiny networks check shapes, devices and the priors returned on request.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from dudocrop.classic.li import li
from dudocrop.clip.model import DuDoCLIP
from dudocrop.ct.metal import MetalObject
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.phantoms import random_phantom
from dudocrop.ct.simulate import simulate
from dudocrop.metrics.image import psnr
from dudocrop.pipeline.ablation import TABLE_V, ablation_outputs
from dudocrop.pipeline.model import DuDoCROP, PipelineConfig, residual_from_unit
from dudocrop.pipeline.osro import OSROConfig
from dudocrop.sde.config import get_unet_config
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.train import SDEModel
from dudocrop.sde.unet import build_unet

GEOM = "tiny"


@pytest.fixture(scope="module")
def case():
    op = FanBeamOperator(GEOM)
    clean = torch.stack([torch.from_numpy(random_phantom("body", GEOM, s))[None] for s in (1, 2)])
    metal = [MetalObject(shape="disc", centre_mm=(40.0, -30.0), diameter_mm=18.0, material="titanium"),
             MetalObject(shape="disc", centre_mm=(-50.0, 20.0), diameter_mm=14.0, material="stainless_steel")]
    res = simulate(clean, op, metal=metal, settings="noiseless", seed=0)
    return SimpleNamespace(op=op, sim=res)


class Oracle(torch.nn.Module):
    """ε̂ = the true noise for a known F_0 (Eq. 6): a perfect IR-SDE denoiser for one batch."""

    def __init__(self, sde: IRSDE):
        super().__init__()
        self.sde, self.x0 = sde, None

    def forward(self, x_t, mu, t, content=None, control=None):
        return self.sde.noise_from_x0(x_t, self.x0, mu, t.long())


def _slot(domain, unet, use_embeddings=False):
    return SDEModel(unet, IRSDE(), domain, use_embeddings, None)


def _oracle_pipeline(case, **cfg):
    models = {d: _slot(d, None) for d in ("image", "sinogram", "residual")}
    for m in models.values():
        m.unet = Oracle(m.sde)
    pipe = DuDoCROP(GEOM, models["image"], models["sinogram"], models["residual"], None, PipelineConfig(**cfg))
    sim = case.sim
    models["image"].unet.x0 = pipe.norm.image(sim.X_ref)
    models["sinogram"].unet.x0 = pipe.norm.sino(sim.Y_ref)
    return pipe, models


def test_oracle_priors_make_dudocrop_far_better_than_li(case):
    """Exact sinogram prior; an image prior that keeps 30 % of the streaks (ε2 imperfect); a residual oracle that
    knows X_r^ref = X_p − X_ref (Algorithm 1). Then: Eq. 10 + FBP restore the reference, Eq. 13-14 remove most
    of the image prior's error, the fusion (Eq. 15) beats both priors' image rows, and all beat LI clearly."""
    pipe, models = _oracle_pipeline(case, steps=10)
    sim = case.sim
    flawed = sim.X_ref + 0.3 * (sim.X_ma - sim.X_ref) * (sim.metal_mask == 0)
    models["image"].unet.x0 = pipe.norm.image(flawed)
    x, y, mask, trace = pipe.prepare(sim.X_ma, sim.Y_ma, sim.metal_mask, sim.metal_trace)
    x_prior, y_prior = pipe.priors(x, y, mask, trace)
    first = pipe.combine(x, y, mask, trace, x_prior, y_prior, OSROConfig(residual_refine=False), "dual")[1]
    models["residual"].unet.x0 = residual_from_unit(first.X_p - pipe.norm.image(sim.X_ref))
    outs = ablation_outputs(pipe, x, y, mask, trace, x_prior, y_prior, OSROConfig(k=1.0, alpha=0.5, beta=0.5))
    # the min-max row and the row without the completion are the pipeline's own here
    assert set(outs) == {r.name for r in TABLE_V if r.norm is None and r.name != "dudocrop_eq15"}
    ref, metal = sim.X_ref, sim.metal_mask
    score = {name: psnr(v, ref, metal).mean().item() for name, v in outs.items()}
    score["LI"] = psnr(li(sim.Y_ma, metal, sim.X_ma, case.op, trace=sim.metal_trace), ref, metal).mean().item()
    print("oracle PSNR:", {k: round(v, 1) for k, v in score.items()})
    assert score["sino_fidelity"] > score["LI"] + 10  # exact trace + fidelity: only FBP remains
    assert score["refine_norm"] > score["image_norm"] + 6  # Eq. 13-14 with a perfect ε3
    assert score["dudocrop"] > score["LI"] + 5
    assert score["dudocrop"] >= score["refine_norm"] - 0.5
    assert score["dudocrop_completion"] > score["LI"] + 5  # X_o as the prior of the measured sinogram's completion
    m = metal > 0
    assert torch.equal(outs["dudocrop"][m], sim.X_ma[m])  # metal reinserted exactly from X_ma


def test_fusion_reuses_cached_priors(case):
    pipe, _ = _oracle_pipeline(case, steps=5)
    sim = case.sim
    out = pipe(sim.X_ma, sim.Y_ma, metal_mask=sim.metal_mask, trace=sim.metal_trace, return_priors=True,
               osro_config=OSROConfig(residual_refine=False))
    again = pipe.refuse(out.priors, sim.X_ma, sim.metal_mask, OSROConfig(residual_refine=False))
    torch.testing.assert_close(again, out.X_o)
    other = pipe.refuse(out.priors, sim.X_ma, sim.metal_mask, OSROConfig(alpha=0.2, beta=0.8, residual_refine=False))
    assert not torch.allclose(other, out.X_o)
    # the completion (beyond the paper) from the same priors, as the pipeline computes it
    done = OSROConfig(residual_refine=False, completion=True)
    full = pipe(sim.X_ma, sim.Y_ma, metal_mask=sim.metal_mask, trace=sim.metal_trace, osro_config=done)
    again = pipe.refuse(out.priors, sim.X_ma, sim.metal_mask, done, y_ma=sim.Y_ma, trace=sim.metal_trace)
    torch.testing.assert_close(again, full.X_o)
    assert not torch.allclose(again, out.X_o)
    with pytest.raises(ValueError, match="completion needs y_ma"):
        pipe.refuse(out.priors, sim.X_ma, sim.metal_mask, done)


def test_untrained_tiny_models_with_clip_guidance_run_end_to_end(case):
    torch.manual_seed(0)
    clip = DuDoCLIP.from_config("tiny")
    cfg = get_unet_config("tiny", context_dim=clip.embed_dim)
    slots = [_slot(d, build_unet(cfg), use_embeddings=d != "residual") for d in ("image", "sinogram")]
    res = _slot("residual", build_unet(get_unet_config("tiny", use_embeddings=False)))
    pipe = DuDoCROP(GEOM, *slots, res, clip, PipelineConfig(steps=2))
    sim = case.sim
    out = pipe(sim.X_ma, return_priors=True)  # no sinogram: Y_ma = FP(X_ma) (Algorithm 2), mask by threshold
    assert out.X_o.shape == sim.X_ma.shape and torch.isfinite(out.X_o).all()
    p = out.priors
    for t in (p.Y_p, p.X_p_prime, p.X_p, p.X_r_in, p.X_r_hat, p.X_p_hat, p.X_o):
        assert torch.isfinite(t).all()
    assert out.image_prior.shape == sim.X_ma.shape and out.sinogram_prior.shape == sim.Y_ma.shape


def test_guided_models_need_clip_and_inputs_are_checked(case):
    unet = build_unet("tiny")
    with pytest.raises(ValueError, match="clip="):
        DuDoCROP(GEOM, _slot("image", unet, True), _slot("sinogram", unet, True))
    with pytest.raises(ValueError, match="domain 'sinogram'"):
        DuDoCROP(GEOM, _slot("sinogram", unet), _slot("sinogram", unet))
    pipe, _ = _oracle_pipeline(case)
    with pytest.raises(ValueError, match="x_ma_hu"):
        pipe(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="y_ma"):
        pipe(case.sim.X_ma, torch.zeros(2, 1, 10, 10))
    with pytest.raises(ValueError, match="domains"):
        PipelineConfig(domains="triple")


def test_fusion_cache_scores_like_refuse_and_picks_the_better_prior(case, tmp_path):
    """FusionCache re-fuses exactly as DuDoCROP.refuse does, survives a save / load, and on a grid picks the
    factors that favour the exact sinogram prior over an image prior that keeps half of the streaks."""
    from dudocrop.eval.fusion import FusionCache

    pipe, models = _oracle_pipeline(case, steps=5)
    sim = case.sim
    models["image"].unet.x0 = pipe.norm.image(sim.X_ref + 0.5 * (sim.X_ma - sim.X_ref) * (sim.metal_mask == 0))
    models["residual"].unet.x0 = residual_from_unit(torch.zeros_like(sim.X_ref))  # ε3 ≈ 0: k does nothing
    cache = FusionCache.build(pipe, sim.X_ma, sim.Y_ma, sim.metal_mask, sim.metal_trace, sim.X_ref, ["a", "b"])
    cfg = OSROConfig(k=0.3, alpha=0.6, beta=0.4)
    out = pipe(sim.X_ma, sim.Y_ma, metal_mask=sim.metal_mask, trace=sim.metal_trace, return_priors=True)
    torch.testing.assert_close(cache.output_hu(cfg), pipe.refuse(out.priors, sim.X_ma, sim.metal_mask, cfg))
    cache.save(str(tmp_path / "priors.pt"))
    again = FusionCache.load(str(tmp_path / "priors.pt"))
    assert again.score(cfg) == cache.score(cfg)
    grid = [{"k": 0.5, "alpha": a, "beta": b} for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)]
    best, scores = cache.best(OSROConfig(), grid)
    assert (best.alpha, best.beta) == (0.0, 1.0)
    assert scores["psnr"] > cache.score(OSROConfig(alpha=0.5, beta=0.5))["psnr"] + 3


def test_fusion_cache_with_the_safeguard_fuses_as_the_pipeline(case, tmp_path):
    """With OSROConfig.safeguard the cache scores X_o as DuDoCROP.refuse runs it (the consistency residuals it
    re-uses per k re-combine exactly for other α, β), so tune_fusion can tune with the safeguard on; a cache saved
    without the measurement still loads and refuses the safeguard by name."""
    from dataclasses import fields

    from dudocrop.eval.fusion import FusionCache

    pipe, models = _oracle_pipeline(case, steps=5)
    sim = case.sim
    # an image prior with an inconsistent blob painted into the body: the measured rays contradict it
    wrong = sim.X_ref.clone()
    wrong[:, :, 24:40, 24:40] -= 300.0
    models["image"].unet.x0 = pipe.norm.image(wrong)
    models["residual"].unet.x0 = residual_from_unit(torch.zeros_like(sim.X_ref))
    cache = FusionCache.build(pipe, sim.X_ma, sim.Y_ma, sim.metal_mask, sim.metal_trace, sim.X_ref, ["a", "b"])
    out = pipe(sim.X_ma, sim.Y_ma, metal_mask=sim.metal_mask, trace=sim.metal_trace, return_priors=True)
    fell_back = []
    for a, b in ((0.9, 0.1), (0.6, 0.4), (1.0, 0.0)):  # one k: the second and third re-use the first's residuals
        cfg = OSROConfig(k=0.3, alpha=a, beta=b, safeguard=1.2)
        want = pipe.refuse(out.priors, sim.X_ma, sim.metal_mask, cfg, sim.Y_ma, sim.metal_trace)
        torch.testing.assert_close(cache.output_hu(cfg), want, rtol=1e-4, atol=1e-2)
        fell_back.append(cache.score(cfg)["fallback"])
        assert cache.score(cfg)["psnr"] > cache.score(replace(cfg, safeguard=None))["psnr"]
    assert min(fell_back) > 0.1, fell_back  # the safeguard acted on this prior
    for cfg in (OSROConfig(k=0.3, alpha=0.9, beta=0.1, trust=0.2),  # spatial trust, alone and under the safeguard
                OSROConfig(k=0.3, alpha=0.9, beta=0.1, trust=0.2, safeguard=1.2),
                OSROConfig(k=0.3, alpha=0.9, beta=0.1, completion=True),  # the completion, alone and guarded
                OSROConfig(k=0.3, alpha=0.6, beta=0.4, completion=True, safeguard=1.2)):
        want = pipe.refuse(out.priors, sim.X_ma, sim.metal_mask, cfg, sim.Y_ma, sim.metal_trace)
        torch.testing.assert_close(cache.output_hu(cfg), want, rtol=1e-4, atol=1e-2)
    old = {f.name: getattr(cache, f.name) for f in fields(cache) if f.init and f.name not in ("y_ma", "trace",
                                                                                             "geometries")}
    torch.save({**old, "norm": vars(cache.norm)}, str(tmp_path / "old.pt"))
    again = FusionCache.load(str(tmp_path / "old.pt"))
    assert again.score(OSROConfig())["psnr"] == cache.score(OSROConfig())["psnr"]
    with pytest.raises(ValueError, match="safeguard needs the measurement"):
        again.score(OSROConfig(safeguard=1.5))
    with pytest.raises(ValueError, match="completion needs the measurement"):
        again.score(OSROConfig(completion=True))


class _Zero(torch.nn.Module):
    """F̂_0 − μ = 0 under parametrization 'x0': a prior that returns its μ exactly."""

    def forward(self, x_t, mu, t, content=None, control=None):
        return torch.zeros_like(x_t)


def test_image_model_trained_from_nmar_starts_from_the_nmar_image(case):
    """An image IR-SDE trained with image_mu='nmar' gets NMAR's image (metal put back) as μ at inference too, not
    X_ma; one trained from X_ma gets X_ma."""
    from dudocrop.classic.nmar import nmar
    from dudocrop.sde.config import SDEConfig

    sim, op = case.sim, case.op
    x0_sde = IRSDE(SDEConfig(parametrization="x0"))
    image = SDEModel(_Zero(), x0_sde, "image", False, None, image_mu="nmar")
    pipe = DuDoCROP(GEOM, image, SDEModel(_Zero(), x0_sde, "sinogram", False, None), None, None,
                    PipelineConfig(steps=2))
    x, y, mask, trace = pipe.prepare(sim.X_ma, sim.Y_ma, sim.metal_mask, sim.metal_trace)
    x_prior, _ = pipe.priors(x, y, mask, trace)
    want = pipe.norm.image(nmar(y, mask > 0.5, x, op, trace=trace))
    assert torch.allclose(x_prior, want, atol=1e-5)
    assert not torch.allclose(x_prior, pipe.norm.image(x), atol=1e-2)
    image.image_mu = "ma"
    assert torch.allclose(pipe.priors(x, y, mask, trace)[0], pipe.norm.image(x), atol=1e-5)


def test_affine_norm_keeps_an_exact_image_prior_that_min_max_spoils(case):
    """Eq. 12 carries X'_p's scale into the image prior. With an exact image prior and an LI-completed sinogram
    prior (so X'_p = FBP(Y_p) keeps LI's secondary streaks), the paper's min-max Norm (Eq. 11) takes the range from
    X'_p's streak extremes and spoils the prior far below X'_p; the affine fit (OSROConfig.norm = 'affine') keeps
    far more of it (not all: see the osro module). The ablation's min-max row is the same models under Eq. 11."""
    from dudocrop.classic.li import interpolate_trace

    pipe, models = _oracle_pipeline(case, steps=5)
    sim = case.sim
    models["sinogram"].unet.x0 = pipe.norm.sino(interpolate_trace(sim.Y_ma, sim.metal_trace > 0))
    x, y, mask, trace = pipe.prepare(sim.X_ma, sim.Y_ma, sim.metal_mask, sim.metal_trace)
    x_prior, y_prior = pipe.priors(x, y, mask, trace)
    score = {"prior": psnr(pipe.to_hu(x_prior, x, mask), sim.X_ref, mask).mean().item()}
    for name in ("minmax", "affine"):
        res = pipe.combine(x, y, mask, trace, x_prior, y_prior, OSROConfig(norm=name, residual_refine=False))[1]
        for k in ("X_p", "X_p_prime"):
            score[k, name] = psnr(pipe.to_hu(getattr(res, k), x, mask), sim.X_ref, mask).mean().item()
    print("Eq. 12 on an exact image prior:", {k: round(v, 1) for k, v in score.items()})
    assert score["X_p", "minmax"] < score["X_p_prime", "minmax"] - 10
    assert score["X_p", "affine"] > score["X_p", "minmax"] + 10
    models["residual"].unet.x0 = torch.full_like(x_prior, 0.5)
    affine = OSROConfig(norm="affine", k=0.3, alpha=0.4, beta=0.6)
    outs = ablation_outputs(pipe, x, y, mask, trace, x_prior, y_prior, affine)
    assert set(outs) == {r.name for r in TABLE_V} - {"dudocrop_eq15"}  # the pipeline's own without the completion
    done = ablation_outputs(pipe, x, y, mask, trace, x_prior, y_prior, replace(affine, completion=True))
    assert set(done) == {r.name for r in TABLE_V} - {"dudocrop_completion"}
    assert torch.allclose(done["dudocrop"], outs["dudocrop_completion"])
    assert torch.allclose(done["dudocrop_eq15"], outs["dudocrop"])
    assert torch.allclose(done["refine_norm"], outs["refine_norm"])  # Table V's rows stay the paper's
    want = pipe.combine(x, y, mask, trace, x_prior, y_prior, OSROConfig(norm="minmax", k=0.3, alpha=0.4, beta=0.6))
    assert torch.allclose(outs["dudocrop_minmax"], want[0], atol=1e-3)


def test_precision_and_compile_settings_are_checked_and_bf16_stays_close(case):
    """bf16 autocast (PipelineConfig.precision) changes the U-Nets' arithmetic, not the sampler's: the output is
    float32 and near the float32 run with the same noise."""
    with pytest.raises(ValueError, match="PipelineConfig.precision must be one of"):
        PipelineConfig(precision="fp16")
    torch.manual_seed(0)
    cfg = get_unet_config("tiny", use_embeddings=False)
    slots = [_slot(d, build_unet(cfg)) for d in ("image", "sinogram")]
    sim = case.sim
    outs = {}
    for precision in ("fp32", "bf16"):
        pipe = DuDoCROP(GEOM, *slots, None, None, PipelineConfig(steps=3, precision=precision))
        outs[precision] = pipe(sim.X_ma, sim.Y_ma, metal_mask=sim.metal_mask, trace=sim.metal_trace).X_o
    assert outs["bf16"].dtype == torch.float32
    diff = psnr(outs["bf16"], outs["fp32"], sim.metal_mask).min().item()
    assert 30 < diff < float("inf"), diff


def test_nmar_runs_once_when_both_models_start_from_it(case, monkeypatch):
    """With image_mu = sinogram_mu = 'nmar' (the small preset) the priors take both μ from one NMAR, equal to
    what each domain's own μ function gives."""
    import dudocrop.pipeline.model as pm
    from dudocrop.sde.config import SDEConfig
    from dudocrop.sde.train import image_mu, sinogram_mu

    sim = case.sim
    x0_sde = IRSDE(SDEConfig(parametrization="x0"))
    image = SDEModel(_Zero(), x0_sde, "image", False, None, image_mu="nmar")
    sino = SDEModel(_Zero(), x0_sde, "sinogram", False, None, sinogram_mu="nmar")
    pipe = DuDoCROP(GEOM, image, sino, None, None, PipelineConfig(steps=2))
    x, y, mask, trace = pipe.prepare(sim.X_ma, sim.Y_ma, sim.metal_mask, sim.metal_trace)
    calls = []
    real = pm.nmar
    monkeypatch.setattr(pm, "nmar", lambda *a, **k: calls.append(1) or real(*a, **k))
    x_prior, y_prior = pipe.priors(x, y, mask, trace)
    assert len(calls) == 1
    want_x = image_mu(x, y, mask, trace, "nmar", pipe.op)
    want_y = sinogram_mu(y, trace, "nmar", x_ma=x, metal_mask=mask, op=pipe.op)
    assert torch.allclose(x_prior, pipe.norm.image(want_x), atol=1e-5)
    assert torch.allclose(y_prior, pipe.norm.sino(want_y), atol=1e-5)


@pytest.mark.slow
def test_compiled_unets_give_the_eager_result(case):
    """PipelineConfig.compile (torch.compile of the U-Nets; ≈2-3 min to compile on 2 CPU cores) changes how the
    networks run, not what they compute."""
    torch.manual_seed(0)
    slots = [_slot(d, build_unet(get_unet_config("tiny", use_embeddings=False))) for d in ("image", "sinogram")]
    sim = case.sim
    outs = {}
    for compile in (False, True):
        pipe = DuDoCROP(GEOM, *slots, None, None, PipelineConfig(steps=2, compile=compile))
        outs[compile] = pipe(sim.X_ma, sim.Y_ma, metal_mask=sim.metal_mask, trace=sim.metal_trace).X_o
    assert torch.allclose(outs[True], outs[False], atol=0.05), float((outs[True] - outs[False]).abs().max())
