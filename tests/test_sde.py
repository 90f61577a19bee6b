"""IR-SDE (paper Eq. 4-9) and the conditional U-Net (Fig. 3b): schedule, marginal, optimal reverse state, loss,
samplers (full, strided, tiled), learning on a toy task, embeddings, sizes and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from dudocrop.sde import IRSDE, ConditionalUNet, SDEConfig, build_unet, count_parameters, get_unet_config

SDE = IRSDE()


def _oracle(sde: IRSDE, x0: torch.Tensor):
    """A 'network' that returns the true noise ε_t of x_t (it knows F_0)."""

    def model(x_t, mu, t, content=None, control=None):
        return sde.noise_from_x0(x_t, x0, mu, t)

    return model


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1)).mean())


# ---- schedule and Eq. 6 ------------------------------------------------------------------------------------------
def test_schedule_end_points_and_paper_numbers():
    assert SDE.T == 100 and math.isclose(SDE.lam, 50 / 255)
    assert math.isclose(math.exp(-float(SDE.theta_bar[-1])), 0.005, rel_tol=1e-9)  # exp(-θ̄_T) = eps
    assert abs(SDE.dt - 0.104) < 1e-3  # REFERENCE §1
    assert float(SDE.theta_bar[0]) == 0.0 and bool((SDE.theta_bar.diff() > 0).all())
    assert math.isclose(float(SDE.sigma_bar[-1]), SDE.lam * math.sqrt(1 - 0.005**2), rel_tol=1e-9)


def test_marginal_matches_monte_carlo_of_eq4():
    """Eq. 6 against Euler-Maruyama paths of dF = θ_t(μ − F)dt + sqrt(2λ²θ_t) dω (Eq. 4), built only from θ_t, dt."""
    gen = torch.Generator().manual_seed(0)
    paths, sub = 20000, 20
    x0 = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)[:, None]
    mu = torch.tensor([0.6, 0.2, 0.9], dtype=torch.float64)[:, None]
    x = x0.expand(-1, paths).clone()
    h = SDE.dt / sub
    checked = 0
    for t in range(1, SDE.T + 1):
        theta = float(SDE.thetas[t])
        for _ in range(sub):
            x = x + theta * (mu - x) * h + math.sqrt(2 * SDE.lam**2 * theta * h) * torch.randn(
                x.shape, generator=gen, dtype=torch.float64)
        if t in (5, 20, 50, 100):
            m = SDE.mean(x0, mu, t)[:, 0]
            v = SDE.std(t, x0)[:, 0] ** 2
            se = (v / paths).sqrt()
            assert torch.all((x.mean(1) - m).abs() < 5 * se + 1e-4), (t, x.mean(1), m)
            assert torch.allclose(x.var(1), v, rtol=0.05), (t, x.var(1), v)
            checked += 1
    assert checked == 4


# ---- Eq. 8 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,s", [(1, 0), (2, 1), (37, 36), (100, 99), (100, 90), (50, 10), (10, 0)])
def test_eq8_is_the_gaussian_posterior_mean(t, s):
    """Eq. 8 (and its variance) against q(F_s | F_t, F_0) ∝ q(F_t | F_s) q(F_s | F_0), integrated on a grid."""
    x0, mu, xt = 0.3, 0.7, 0.45
    one = torch.ones(1, dtype=torch.float64)
    got_mean = float(SDE.optimal_prev(xt * one, x0 * one, mu * one, t, s))
    got_std = float(SDE.posterior_std(t, one, s))
    if s == 0:  # q(F_0 | F_t, F_0) is the point mass at F_0
        assert math.isclose(got_mean, x0, abs_tol=1e-12) and got_std == 0.0
        return
    tb_t, tb_s = float(SDE.theta_bar[t]), float(SDE.theta_bar[s])
    lam2 = SDE.lam**2
    grid = torch.linspace(-2, 3, 400001, dtype=torch.float64)

    def log_normal(x, m, v):
        return -0.5 * (x - m) ** 2 / v - 0.5 * math.log(2 * math.pi * v)

    # OU transition over (s, t] and the marginal at s, straight from Eq. 4 with piecewise-constant θ.
    log_p = log_normal(xt, mu + (grid - mu) * math.exp(-(tb_t - tb_s)), lam2 * (1 - math.exp(-2 * (tb_t - tb_s))))
    log_p = log_p + log_normal(grid, mu + (x0 - mu) * math.exp(-tb_s), lam2 * (1 - math.exp(-2 * tb_s)))
    w = torch.softmax(log_p, 0)
    mean = float((w * grid).sum())
    std = float((w * (grid - mean) ** 2).sum().sqrt())
    assert math.isclose(got_mean, mean, abs_tol=1e-7), (got_mean, mean)
    assert math.isclose(got_std, std, rel_tol=1e-4), (got_std, std)


# ---- samplers with the true noise --------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [None, 25, 10, 3, 1])
def test_posterior_sampler_with_true_noise_recovers_x0(steps):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 1, 16, 16, generator=gen)
    mu = x0 + 0.3 * torch.randn(2, 1, 16, 16, generator=gen)
    out = SDE.sample(_oracle(SDE, x0), mu, steps=steps, generator=gen)
    assert torch.allclose(out, x0, atol=5e-5), float((out - x0).abs().max())


def test_reverse_sde_sampler_with_true_noise_recovers_x0_at_full_steps():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 1, 16, 16, generator=gen)
    mu = x0 + 0.3 * torch.randn(2, 1, 16, 16, generator=gen)
    out = SDE.sample(_oracle(SDE, x0), mu, sampler="sde", generator=gen)
    assert torch.allclose(out, x0, atol=1e-4), float((out - x0).abs().max())


@pytest.mark.parametrize("steps", [100, 7])
def test_strided_posterior_states_follow_the_marginal(steps):
    """With the true noise, every kept state F_s must be distributed as Eq. 6: checks the composed θ' between
    kept steps and the posterior noise, not just the end point."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.full((1, 1, 200, 200), 0.2)
    mu = torch.full((1, 1, 200, 200), 0.8)
    seen = []

    def check(s, x):
        if s > 0:
            seen.append(s)
            m = float(SDE.mean(x0, mu, s).mean())
            sd = float(SDE.std(s, x0).flatten()[0])
            assert abs(float(x.mean()) - m) < 5 * sd / 200 + 1e-5, (s, float(x.mean()), m)
            assert abs(float(x.std()) / sd - 1) < 0.03, (s, float(x.std()), sd)

    # Start from the exact marginal at T (the sampler's default μ + λz is off by eps·(F_0 − μ) in the mean).
    x_T = SDE.q_sample(x0, mu, SDE.T, generator=gen)
    SDE.sample(_oracle(SDE, x0), mu, steps=steps, generator=gen, x_T=x_T, callback=check)
    assert len(seen) == steps - 1


# ---- Eq. 9 -------------------------------------------------------------------------------------------------------
def test_loss_zero_for_the_true_noise_and_positive_otherwise():
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(8, 1, 16, 16, generator=gen)
    mu = x0 + 0.2 * torch.randn(8, 1, 16, 16, generator=gen)
    t = torch.randint(1, SDE.T + 1, (8,), generator=gen)
    xt = SDE.q_sample(x0, mu, t, generator=gen)
    eps = SDE.noise_from_x0(xt, x0, mu, t)
    wrong = eps + 0.3 * torch.randn(eps.shape, generator=gen)
    # 'posterior' form: the one-step mean is Eq. 8 with F̂_0(ε̂), exactly zero for the true noise.
    assert float(SDE.loss(eps, xt, x0, mu, t, form="posterior")) < 1e-7
    assert float(SDE.loss(wrong, xt, x0, mu, t, form="posterior")) > 1e-3
    # 'sde' form (the paper's Euler step of Eq. 5): zero at its own minimiser, tiny but not zero at the true ε.
    assert float(SDE.loss(SDE.eq9_optimal_noise(xt, x0, mu, t), xt, x0, mu, t)) < 1e-7
    at_true = float(SDE.loss(eps, xt, x0, mu, t))
    assert 0 < at_true < 0.05 * float(SDE.loss(wrong, xt, x0, mu, t))
    eps_star = SDE.eq9_optimal_noise(xt, x0, mu, t)
    assert float((eps_star - eps).abs().max()) < 0.1 * float(eps.abs().max())
    eta = torch.full((8,), 2.0)
    assert math.isclose(float(SDE.loss(wrong, xt, x0, mu, t, eta=eta)), 2 * float(SDE.loss(wrong, xt, x0, mu, t)),
                        rel_tol=1e-6)


# ---- the x0 parametrization (SDEConfig.parametrization) ----------------------------------------------------------
SDE_X0 = IRSDE(SDEConfig(parametrization="x0"))


@pytest.mark.parametrize("steps", [None, 5, 1])
def test_x0_parametrization_zero_output_restores_mu_and_the_true_residual_restores_x0(steps):
    """With parametrization='x0' the network's output is F̂_0 − μ: zero gives back μ for any noise draw, the true
    residual gives back F_0 (through Eq. 6's noise and the unchanged sampler), and Eq. 9's posterior form is zero."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 16, 16, generator=gen)
    mu = x0 + 0.3 * torch.randn(2, 1, 16, 16, generator=gen)
    zero = lambda x_t, mu_, t, content=None, control=None: torch.zeros_like(x_t)  # noqa: E731
    true = lambda x_t, mu_, t, content=None, control=None: x0 - mu_  # noqa: E731
    assert torch.allclose(SDE_X0.sample(zero, mu, steps=steps, generator=gen), mu, atol=1e-5)
    assert torch.allclose(SDE_X0.sample(true, mu, steps=steps, generator=gen), x0, atol=5e-5)
    # the noise parametrization reads the same zero output as ε̂ = 0, which is not μ
    assert not torch.allclose(SDE.sample(zero, mu, steps=steps, generator=gen), mu, atol=1e-2)
    assert float(SDE_X0.training_loss(true, x0, mu, generator=gen, form="posterior")) < 1e-5
    assert float(SDE_X0.training_loss(zero, x0, mu, generator=gen, form="posterior")) > 1e-3


def test_noise_of_inverts_x0_from_noise():
    gen = torch.Generator().manual_seed(6)
    x_t, mu, out = (torch.rand(3, 1, 8, 8, generator=gen) for _ in range(3))
    for t in (1, 37, 100):
        eps = SDE_X0.noise_of(out, x_t, mu, t)
        assert torch.allclose(SDE_X0.x0_from_noise(x_t, mu, t, eps), mu + out, atol=1e-4)
        assert SDE.noise_of(out, x_t, mu, t) is out
    with pytest.raises(ValueError, match="parametrization must be 'noise' or 'x0'"):
        SDEConfig(parametrization="v")


# ---- the U-Net ---------------------------------------------------------------------------------------------------
def test_presets_sizes():
    assert 1e5 < count_parameters(build_unet("tiny")) < 1e6
    with torch.device("meta"):
        paper = build_unet("paper")
    assert 47e6 < count_parameters(paper) < 51e6  # DA-CLIP's ≈49 M (REFERENCE §1)


def test_a_level_without_attention_passes_the_context_by():
    # A level in neither attn_levels nor st_levels used to be an nn.Identity called with (x, context): TypeError.
    import dataclasses

    cfg = dataclasses.replace(get_unet_config("tiny"), attn_levels=(), st_levels=())
    net = ConditionalUNet(cfg)
    x = torch.rand(1, 1, 16, 16)
    c = torch.randn(1, cfg.context_dim)
    out = net(x, x, 10, content=c, control=c)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("shape", [(1, 1, 37, 29), (2, 1, 5, 7), (1, 1, 1, 3), (1, 1, 64, 64)])
def test_any_input_size_comes_back_the_same(shape):
    net = build_unet("tiny")
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(shape, generator=gen)
    c = torch.randn(shape[0], 512, generator=gen)
    out = net(x, x.flip(-1), 30, content=c, control=c)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_embeddings_change_the_output_only_when_on():
    gen = torch.Generator().manual_seed(6)
    x, mu = torch.rand(2, 1, 32, 32, generator=gen), torch.rand(2, 1, 32, 32, generator=gen)
    c1, c2 = torch.randn(2, 512, generator=gen), torch.randn(2, 512, generator=gen)
    torch.manual_seed(0)
    on = build_unet("tiny")
    # proj_out starts at zero (a new ST is the identity); give it trained-like weights so e^{I1} can act.
    for m in on.modules():
        if hasattr(m, "proj_out"):
            torch.nn.init.normal_(m.proj_out.weight, std=0.05)
    base = on(x, mu, 10, content=c1, control=c1)
    assert (on(x, mu, 10, content=c2, control=c1) - base).abs().max() > 1e-4  # content → cross-attention
    # control → softmax → prompt → added to the time embedding: near-uniform softmax at init, so a small change.
    assert (on(x, mu, 10, content=c1, control=c2) - base).abs().max() > 1e-6
    off = build_unet("tiny", use_embeddings=False)
    assert torch.equal(off(x, mu, 10, content=c1, control=c1), off(x, mu, 10, content=c2, control=c2))
    assert torch.equal(off(x, mu, 10), off(x, mu, 10, content=c1, control=c2))
    assert count_parameters(off) < count_parameters(on)


def test_bad_inputs_raise_clear_errors():
    net = build_unet("tiny")
    x, c = torch.rand(2, 1, 16, 16), torch.randn(2, 512)
    with pytest.raises(ValueError, match="mu must have the same shape as x_t"):
        net(x, x[:, :, :8], 3, content=c, control=c)
    with pytest.raises(ValueError, match=r"content must have shape \(2, 512\)"):
        net(x, x, 3, content=torch.randn(2, 256), control=c)
    with pytest.raises(ValueError, match=r"control must have shape \(2, 512\)"):
        net(x, x, 3, content=c, control=torch.randn(1, 512))
    with pytest.raises(ValueError, match="x_t must have 4 dimensions"):
        net(x[0], x[0], 3, content=c, control=c)
    with pytest.raises(ValueError, match=r"x_t must have shape \(N, 1, N, N\)"):
        net(x.repeat(1, 2, 1, 1), x.repeat(1, 2, 1, 1), 3, content=c, control=c)
    with pytest.raises(ValueError, match="content .* is required"):
        net(x, x, 3, control=c)
    with pytest.raises(ValueError, match="t must be"):
        net(x, x, torch.ones(3), content=c, control=c)
    with pytest.raises(ValueError, match="steps must be an int in"):
        SDE.sample(net, x, c, c, steps=0)
    with pytest.raises(ValueError, match="sampler must be"):
        SDE.sample(net, x, c, c, sampler="ddim")
    with pytest.raises(ValueError, match="overlap must be"):
        SDE.sample_tiled(net, x, c, c, tile=8, overlap=8)
    with pytest.raises(ValueError, match=r"t must lie in \[1, 100\]"):
        SDE.loss(x, x, x, x, 0)
    with pytest.raises(ValueError, match="x0 must have the same shape as x_t"):
        SDE.optimal_prev(x, x[:1], x, 5)
    with pytest.raises(ValueError, match="SDEConfig.lam"):
        SDEConfig(lam=-1.0)
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        get_unet_config("huge")
    with pytest.raises(ValueError, match="config must be"):
        ConditionalUNet(3)


# ---- tiled sampling ----------------------------------------------------------------------------------------------
def test_tiled_sampling_equals_sample_for_one_tile():
    net = build_unet("tiny")
    gen = torch.Generator().manual_seed(7)
    mu, c = torch.rand(1, 1, 24, 20, generator=gen), torch.randn(1, 512, generator=gen)
    a = SDE.sample(net, mu, c, c, steps=5, generator=torch.Generator().manual_seed(0))
    b = SDE.sample_tiled(net, mu, c, c, tile=32, overlap=8, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_tiled_sampling_gives_each_pixel_the_same_noise():
    """A per-pixel (non-oracle) model makes tiling invisible iff the noise per pixel and the blending are right."""

    def pixelwise(x_t, mu, t, content=None, control=None):
        return torch.tanh(3 * (x_t - mu)) * (1 + t.view(-1, 1, 1, 1) / 100) + 0.1 * mu

    gen = torch.Generator().manual_seed(8)
    mu = torch.rand(2, 1, 45, 38, generator=gen)
    a = SDE.sample(pixelwise, mu, steps=10, generator=torch.Generator().manual_seed(0))
    b = SDE.sample_tiled(pixelwise, mu, tile=16, overlap=5, tile_batch=3, steps=10,
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())


def test_tiled_sampling_with_the_unet_keeps_shape():
    net = build_unet("tiny", use_embeddings=False)
    mu = torch.rand(1, 1, 50, 41, generator=torch.Generator().manual_seed(9))
    out = SDE.sample_tiled(net, mu, tile=24, overlap=8, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == mu.shape and bool(torch.isfinite(out).all())


def test_tiled_sampling_is_seamless():
    """A model whose ε̂ depends on the whole window it sees (here: the window's mean μ, as GroupNorm and attention
    make a U-Net's output depend on its window) gives each tile another ε̂. The difference D between tiled and
    untiled sampling (same noise per pixel) then changes from one tile's value to the other's across the overlap;
    blended by the sin² window it may change by at most its steepest step, π / (2 (overlap + 1)) of the total,
    between neighbouring pixels. A seam (tiles pasted, or averaged with flat weights) steps by 1 or 1/2 of it."""

    def windowwise(x_t, mu, t, content=None, control=None):
        return (2 * mu.mean((2, 3), keepdim=True) - 1).expand_as(x_t)

    h, w, tile, overlap = 24, 40, 24, 8  # two tiles across, starting at columns 0 and 16
    mu = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(1, 1, h, w).contiguous()
    a = SDE.sample(windowwise, mu, steps=4, generator=torch.Generator().manual_seed(0))
    b = SDE.sample_tiled(windowwise, mu, tile=tile, overlap=overlap, steps=4,
                         generator=torch.Generator().manual_seed(0))
    d = (b - a)[0, 0]
    total = float(d.max() - d.min())
    assert total > 1.0  # the two windows do give different ε̂
    steepest = float((d[:, 1:] - d[:, :-1]).abs().max())
    assert steepest <= 1.05 * math.pi / (2 * (overlap + 1)) * total, (steepest, total)


# ---- learning a toy restoration ---------------------------------------------------------------------------------
def _toy(n: int, gen: torch.Generator, size: int = 32):
    """F_0: three discs on a background; μ: F_0 plus oriented stripes of random angle, phase and amplitude (a
    structured 'artifact'). Also returns the stripe parameters (cos 2a, sin 2a, amplitude) for a degradation
    embedding, as DA-CLIP's control embedding describes the degradation."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    x0 = torch.full((n, 1, size, size), 0.2)
    for _ in range(3):
        c = torch.rand(n, 2, generator=gen) * 1.2 - 0.6
        r = torch.rand(n, generator=gen) * 0.3 + 0.15
        v = torch.rand(n, generator=gen) * 0.6 + 0.2
        inside = (xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2 < r[:, None, None] ** 2
        x0 = torch.where(inside[:, None], v[:, None, None, None], x0)
    ang = torch.rand(n, generator=gen) * math.pi
    phase = torch.rand(n, generator=gen) * 2 * math.pi
    amp = torch.rand(n, generator=gen) * 0.15 + 0.3
    along = xx * torch.cos(ang)[:, None, None] + yy * torch.sin(ang)[:, None, None]
    mu = x0 + (amp[:, None, None] * torch.sin(4 * math.pi * along + phase[:, None, None]))[:, None]
    return x0, mu, torch.stack([torch.cos(2 * ang), torch.sin(2 * ang), amp], 1)


_EMBED = torch.randn(5, 512, generator=torch.Generator().manual_seed(11)) / math.sqrt(5)


def _embeddings(mu: torch.Tensor, degradation: torch.Tensor):
    """Stand-ins for CLIP: e^{I1} from image statistics, e^{I2} from the degradation parameters."""
    stats = torch.stack([mu.mean((1, 2, 3)), mu.std((1, 2, 3))], 1)
    return stats @ _EMBED[:2], degradation @ _EMBED[2:]


@pytest.fixture(scope="module")
def toy_run():
    """The tiny U-Net trained 300 steps (batch 8, 32², ≈30 s on 2 cores) with the paper's loss (Eq. 9)."""
    torch.manual_seed(0)
    net = build_unet("tiny")
    untrained = build_unet("tiny")
    untrained.load_state_dict(net.state_dict())
    steps = 300
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1.5e-4)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x0, mu, deg = _toy(8, gen)
        content, control = _embeddings(mu, deg)
        loss = SDE.training_loss(net, x0, mu, content, control, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    x0, mu, deg = _toy(16, torch.Generator().manual_seed(123))
    return {"net": net, "untrained": untrained, "losses": losses, "x0": x0, "mu": mu, "emb": _embeddings(mu, deg)}


def _restore(run, model, **kw):
    return SDE.sample(model, run["mu"], *run["emb"], generator=torch.Generator().manual_seed(1), x0_range=(0.0, 1.0),
                      **kw)


def test_tiny_unet_learns_a_toy_restoration(toy_run):
    losses = toy_run["losses"]
    assert sum(losses[-30:]) / 30 < 0.5 * sum(losses[:30]) / 30
    x0 = toy_run["x0"]
    p_input = _psnr(toy_run["mu"], x0)
    p_trained = _psnr(_restore(toy_run, toy_run["net"]), x0)
    p_untrained = _psnr(_restore(toy_run, toy_run["untrained"]), x0)
    assert p_trained > p_input + 2.0, (p_trained, p_input)
    assert p_trained > p_untrained + 5.0, (p_trained, p_untrained)


def test_reduced_steps_quality(toy_run):
    """Strided sampling (θ' composed over the skipped timestamps): 10 evaluations instead of 100 keep the quality
    within 1 dB on the toy task; the reverse-SDE sampler also restores."""
    x0 = toy_run["x0"]
    p_input = _psnr(toy_run["mu"], x0)
    p100 = _psnr(_restore(toy_run, toy_run["net"]), x0)
    p10 = _psnr(_restore(toy_run, toy_run["net"], steps=10), x0)
    p_sde = _psnr(_restore(toy_run, toy_run["net"], sampler="sde"), x0)
    assert p10 > p_input + 2.0 and abs(p10 - p100) < 1.0, (p10, p100, p_input)
    assert p_sde > p_input + 1.0, (p_sde, p_input)


def test_loss_weight_restricts_eq9_to_a_region():
    """``weight``: a weighted mean per sample; pixels of weight 0 do not count, all-ones is the plain loss."""
    gen = torch.Generator().manual_seed(11)
    x0, mu = torch.rand(2, 1, 8, 8, generator=gen), torch.rand(2, 1, 8, 8, generator=gen)
    t = torch.tensor([10, 60])
    xt = SDE.q_sample(x0, mu, t, generator=gen)
    pred = torch.randn(2, 1, 8, 8, generator=gen)
    w = torch.zeros(2, 1, 8, 8)
    w[..., :4, :] = 1
    other = pred.clone()
    other[..., 4:, :] += 5.0  # changed only where the weight is 0
    assert math.isclose(float(SDE.loss(pred, xt, x0, mu, t, weight=w)), float(SDE.loss(other, xt, x0, mu, t, weight=w)),
                        rel_tol=1e-6)
    assert float(SDE.loss(other, xt, x0, mu, t)) > float(SDE.loss(pred, xt, x0, mu, t))
    assert math.isclose(float(SDE.loss(pred, xt, x0, mu, t, weight=torch.ones_like(w))),
                        float(SDE.loss(pred, xt, x0, mu, t)), rel_tol=1e-6)


def test_input_standardisation_is_the_same_network_on_rescaled_inputs():
    """in_offset / in_scale: the network sees cat[F_t − μ, (μ − o)·s] and returns output / s, i.e. exactly the
    plain network applied to μ' = (μ − o)·s, F_t' = μ' + (F_t − μ), its output divided by s."""
    gen = torch.Generator().manual_seed(12)
    x, mu = torch.rand(2, 1, 24, 24, generator=gen), torch.rand(2, 1, 24, 24, generator=gen)
    c = torch.randn(2, 512, generator=gen)
    plain = build_unet("tiny")
    for p in plain.final_conv.parameters():  # a non-zero output layer, so the division shows
        torch.nn.init.normal_(p, std=0.1, generator=gen)
    s, o = 20.0, 0.25
    scaled = build_unet("tiny", in_scale=s, in_offset=o)
    scaled.load_state_dict(plain.state_dict())
    mu_s = (mu - o) * s
    want = plain(mu_s + (x - mu), mu_s, 7, content=c, control=c) / s
    assert torch.allclose(scaled(x, mu, 7, content=c, control=c), want, atol=1e-6)
    assert not torch.allclose(plain(x, mu, 7, content=c, control=c), want, atol=1e-3)
    with pytest.raises(ValueError, match="in_scale must be a positive"):
        get_unet_config("tiny", in_scale=0.0)


def test_x0_loss_form_weighs_the_restoration_equally_at_every_t():
    """form='x0': mean |F̂_0(ε̂) − F_0|, zero for the true noise; an F̂_0 that is off by the same amount costs the
    same at t = 5 and t = T, while the one-step forms hardly see it at t = T (why small's image model uses it)."""
    gen = torch.Generator().manual_seed(13)
    x0 = torch.rand(2, 1, 16, 16, generator=gen)
    mu = x0 + 0.1 * torch.randn(2, 1, 16, 16, generator=gen)
    losses = {}
    for t_val in (5, SDE.T):
        t = torch.full((2,), t_val)
        xt = SDE.q_sample(x0, mu, t, generator=gen)
        eps = SDE.noise_from_x0(xt, x0, mu, t)
        assert float(SDE.loss(eps, xt, x0, mu, t, form="x0")) < 1e-5
        off = SDE.noise_from_x0(xt, x0 + 0.05, mu, t)  # the ε̂ whose F̂_0 is F_0 + 0.05 everywhere
        losses[t_val] = {f: float(SDE.loss(off, xt, x0, mu, t, form=f)) for f in ("x0", "sde", "posterior")}
    assert losses[5]["x0"] == pytest.approx(0.05, rel=1e-3) and losses[SDE.T]["x0"] == pytest.approx(0.05, rel=1e-3)
    for f in ("sde", "posterior"):
        assert losses[SDE.T][f] < 0.2 * losses[5][f], f
    with pytest.raises(ValueError, match="'sde', 'posterior' or 'x0'"):
        SDE.loss(off, xt, x0, mu, t, form="l2")
