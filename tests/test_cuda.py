"""The CUDA path: the same numbers on a GPU as on the CPU, and training there learns. Skipped without CUDA (CI has
none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.

The cases here need no X-ray spectrum (spekpy): metal is a monochromatic attenuator whose line integrals saturate
(photon starvation), which streaks FBP(Y_ma) like real metal and is all the checks below need.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_pipeline import Oracle
from test_sde import _embeddings, _psnr, _toy

from dudocrop.classic.li import li
from dudocrop.clip.model import DuDoCLIP
from dudocrop.ct.metal import MetalObject, metal_mask
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.phantoms import random_phantom
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import hu_to_mu, mu_to_hu
from dudocrop.metrics.image import psnr
from dudocrop.pipeline.model import DuDoCROP, PipelineConfig
from dudocrop.pipeline.osro import OSROConfig
from dudocrop.sde.config import get_unet_config
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.train import SDEModel, sde_train_step
from dudocrop.sde.unet import build_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def _starved_case(geometry: str, n: int = 2) -> SimpleNamespace:
    """X_ref from the body phantom; metal discs (μ of 3000 HU) whose own line integrals saturate at 2 (photon
    starvation): X_ma = FBP(Y_ma) carries metal streaks, and Y_ma = Y_ref off the metal trace."""
    op = FanBeamOperator(geometry, "numba")
    g = op.geometry
    x_ref = torch.stack([torch.from_numpy(random_phantom("body", g, s))[None] for s in range(n)])
    objects = [MetalObject(shape="disc", centre_mm=(0.25 * g.fov_radius, -0.15 * g.fov_radius),
                           diameter_mm=0.12 * g.fov_radius, material="titanium"),
               MetalObject(shape="disc", centre_mm=(-0.3 * g.fov_radius, 0.1 * g.fov_radius),
                           diameter_mm=0.09 * g.fov_radius, material="titanium")]
    mask = torch.from_numpy(metal_mask(objects, g) > 0.5).float()[None, None].expand(n, -1, -1, -1).contiguous()
    mu_ref = hu_to_mu(x_ref).clamp(min=0)
    y_ref = op.fp(mu_ref)
    y_ma = y_ref + op.fp(mask * (hu_to_mu(torch.full_like(x_ref, 3000.0)) - mu_ref)).clamp(max=2.0)
    x_ma = torch.where(mask > 0, torch.full_like(x_ref, 3000.0), mu_to_hu(op.fbp(y_ma)))
    return SimpleNamespace(op=op, X_ref=x_ref, Y_ref=y_ref, X_ma=x_ma, Y_ma=y_ma, mask=mask,
                           trace=metal_trace(mask, op))


@pytest.mark.parametrize("geometry", ["tiny", "aapm_body"])
def test_cuda_operators_match_numba_and_are_adjoint(geometry):
    cpu, gpu = FanBeamOperator(geometry, "numba"), FanBeamOperator(geometry, "torch")
    x = torch.rand(2, 1, *cpu.geometry.image_shape, generator=torch.Generator().manual_seed(1))
    y = cpu.fp(x)
    for f_cpu, f_gpu, arg in ((cpu.fp, gpu.fp, x), (cpu.bp, gpu.bp, y), (cpu.fbp, gpu.fbp, y)):
        out = f_gpu(arg.to(CUDA))
        assert out.device.type == "cuda"
        assert _rel(out, f_cpu(arg)) < 1e-4
    xg, yg = x.to(CUDA).double(), torch.rand_like(y).to(CUDA).double()
    lhs = float((gpu.fp(xg) * yg).sum())
    rhs = float((xg * gpu.bp(yg)).sum())
    assert abs(lhs - rhs) / abs(rhs) < 1e-6


@pytest.mark.parametrize("precision, tol", [("fp32", 5e-3), ("bf16", 5e-2)])
def test_cuda_unet_matches_the_cpu(precision, tol):
    """Same weights, same inputs: float32 (TF32 convolutions) and bf16 autocast stay close to the CPU's float32."""
    from dudocrop.sde.unet import with_precision

    torch.manual_seed(0)
    net = build_unet("tiny")
    gen = torch.Generator().manual_seed(2)
    x, mu = torch.rand(2, 1, 48, 40, generator=gen), torch.rand(2, 1, 48, 40, generator=gen)
    c, e = torch.randn(2, 512, generator=gen), torch.randn(2, 512, generator=gen)
    t = torch.tensor([3.0, 70.0])
    with torch.no_grad():
        ref = net(x, mu, t, content=c, control=e)
        gpu = with_precision(net.to(CUDA), precision)
        out = gpu(x.to(CUDA), mu.to(CUDA), t.to(CUDA), content=c.to(CUDA), control=e.to(CUDA))
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert _rel(out, ref) < tol


@pytest.mark.parametrize("norm", ["minmax", "affine"])
def test_cuda_oracle_pipeline_equals_the_cpu_and_beats_li(norm):
    """With oracle denoisers every prior is exact whatever the noise draws, so X_o must not depend on the device:
    the GPU's OSRO (Eq. 10-15), FBP, normalisation and metal reinsertion give the CPU's image; with the affine
    Norm it is far above LI."""
    case = _starved_case("tiny")
    outs = {}
    for device in ("cpu", CUDA):
        models = {d: SDEModel(None, IRSDE(), d, False, None) for d in ("image", "sinogram", "residual")}
        for m in models.values():
            m.unet = Oracle(m.sde)
        cfg = PipelineConfig(steps=10, osro=OSROConfig(norm=norm))
        pipe = DuDoCROP("tiny", models["image"], models["sinogram"], models["residual"], None, cfg, device=device)
        models["image"].unet.x0 = pipe.norm.image(case.X_ref).to(device)
        models["sinogram"].unet.x0 = pipe.norm.sino(case.Y_ref).to(device)
        # a small structured residual: a constant one would leave Eq. 13's Norm only rounding noise to stretch
        models["residual"].unet.x0 = (0.5 + 0.1 * (pipe.norm.image(case.X_ref) - 0.25)).to(device)
        outs[device] = pipe(case.X_ma, case.Y_ma, metal_mask=case.mask, trace=case.trace).X_o
    assert outs[CUDA].device.type == "cuda"
    assert _rel(outs[CUDA], outs["cpu"]) < 1e-4
    if norm == "affine":
        p_cuda = psnr(outs[CUDA].cpu(), case.X_ref, case.mask).mean()
        p_li = psnr(li(case.Y_ma, case.mask, case.X_ma, case.op), case.X_ref, case.mask).mean()
        assert p_cuda > p_li + 5.0, (float(p_cuda), float(p_li))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_untrained_guided_pipeline_runs_on_cuda(precision):
    case = _starved_case("tiny", n=1)
    torch.manual_seed(0)
    clip = DuDoCLIP.from_config("tiny")
    cfg = get_unet_config("tiny", context_dim=clip.embed_dim)
    slots = [SDEModel(build_unet(cfg), IRSDE(), d, True, None) for d in ("image", "sinogram")]
    res = SDEModel(build_unet(get_unet_config("tiny", use_embeddings=False)), IRSDE(), "residual", False, None)
    pipe = DuDoCROP("tiny", *slots, res, clip, PipelineConfig(steps=3, precision=precision), device=CUDA)
    out = pipe(case.X_ma, return_priors=True)
    for t in (out.X_o, out.priors.X_p, out.priors.X_r_hat, out.priors.X_o, out.image_prior, out.sinogram_prior):
        assert t.device.type == "cuda" and t.dtype == torch.float32 and bool(torch.isfinite(t).all())


def test_training_on_cuda_learns_the_toy_restoration():
    """``sde_train_step`` on CUDA (bf16 autocast, as the Ray Train stages run it): the loss falls by half and the
    restored toy images beat the degraded input by 2 dB, sampled on the GPU in fp32 and in bf16."""
    torch.manual_seed(0)
    net = build_unet("tiny").to(CUDA)
    sde = IRSDE()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    cuda_gen = torch.Generator(device=CUDA).manual_seed(0)
    losses = []
    for _ in range(300):
        x0, mu, deg = _toy(8, gen)
        content, control = _embeddings(mu, deg)
        batch = {"x0": x0, "mu": mu, "content": content, "control": control}
        losses.append(sde_train_step(net, sde, opt, batch, generator=cuda_gen))
    assert sum(losses[-30:]) / 30 < 0.5 * sum(losses[:30]) / 30
    x0, mu, deg = _toy(16, torch.Generator().manual_seed(123))
    content, control = (e.to(CUDA) for e in _embeddings(mu, deg))
    model = SDEModel(net, sde, "image", True, None)
    for precision in ("fp32", "bf16"):
        out = model.restore(mu.to(CUDA), content, control, steps=20, precision=precision,
                            generator=torch.Generator(device=CUDA).manual_seed(1))
        assert _psnr(out.cpu(), x0) > _psnr(mu, x0) + 2.0, precision


def test_compiled_unets_match_eager_on_cuda():
    """PipelineConfig.compile (torch.compile, CUDA graphs) computes what the eager U-Nets compute."""
    case = _starved_case("tiny", n=1)
    torch.manual_seed(0)
    slots = [SDEModel(build_unet(get_unet_config("tiny", use_embeddings=False)), IRSDE(), d, False, None)
             for d in ("image", "sinogram", "residual")]
    outs = {}
    for compile in (False, True):
        pipe = DuDoCROP("tiny", *slots, None, PipelineConfig(steps=3, precision="bf16", compile=compile), device=CUDA)
        outs[compile] = pipe(case.X_ma, case.Y_ma, metal_mask=case.mask, trace=case.trace).X_o
    assert psnr(outs[True].cpu(), outs[False].cpu(), case.mask).min() > 40
