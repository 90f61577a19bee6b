"""IR-SDE (Luo et al. 2023) as used by DuDoCROP for the image, sinogram and residual domains (paper §III-B-2,
Eq. 4-9, Fig. 4): schedule, closed-form marginal, maximum-likelihood loss and samplers. One class serves every
domain; the network is passed in (``dudocrop.sde.unet``), so the schedule knows nothing about it.

Notation (paper → code): F_t → ``x_t``, F_0 → ``x0``, μ → ``mu``, γ_t → θ_t (``thetas``), γ̄_t → θ̄_t
(``theta_bar``), sqrt(v_t) → σ̄_t (``sigma_bar``), γ'_{t_i} → θ' = θ̄_t − θ̄_s.

Discretisation (the public IR-SDE code's, REFERENCE §1): integer timestamps t = 0..T, each of length ``dt``;
the rate θ is constant on (t−1, t] and equal to ``thetas[t]``, so θ̄_t = dt · Σ_{i=1..t} θ_i exactly and every
formula below (Eq. 6, 8, the posterior variance) is the exact Ornstein-Uhlenbeck transition of Eq. 4 for that
piecewise-constant θ, for any pair of timestamps s < t. That is what makes strided sampling (``steps < T``) exact
in its Gaussian parts: only the network is evaluated on fewer timestamps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from dudocrop.checks import check_tensor
from dudocrop.sde.config import SDEConfig

Sampler = Literal["posterior", "sde"]
LossForm = Literal["sde", "posterior", "x0"]
#: ``model(x_t, mu, t, content=..., control=...) -> predicted noise`` (or F̂_0 − μ, SDEConfig.parametrization);
#: ``t`` is a float tensor (N,) of timestamps.
NoiseModel = Callable[..., torch.Tensor]


def cosine_thetas(T: int, s: float) -> torch.Tensor:
    """θ_t for t = 0..T (T + 1 values, float64): 1 − ᾱ of the cosine schedule (Nichol & Dhariwal) laid over
    T + 2 intervals with both ends dropped, as in the public IR-SDE code (so no θ is exactly 0 or 1)."""
    n = T + 2
    x = torch.arange(n + 1, dtype=torch.float64)
    alpha_bar = torch.cos((x / n + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return 1 - alpha_bar[1:-1]


class IRSDE:
    """The forward SDE dF = θ_t(μ − F)dt + σ_t dω, σ_t² = 2λ²θ_t (Eq. 4), its reverse (Eq. 5), the marginal
    (Eq. 6), the optimal reverse state (Eq. 8), the loss (Eq. 9), and the "posterior" and reverse-SDE samplers.

    Tensors: ``x0``, ``mu``, ``x_t``, ``noise`` share one shape (N, C, H, W) (any rank >= 1 works); timestamps ``t``
    are an int or a tensor of shape () or (N,) with values in 0..T. Devices and dtypes come from the inputs.
    """

    def __init__(self, config: SDEConfig | None = None) -> None:
        self.config = cfg = SDEConfig() if config is None else config
        if not isinstance(cfg, SDEConfig):
            raise ValueError(f"config must be an SDEConfig, got {type(config).__name__}")
        self.T, self.lam = cfg.T, float(cfg.lam)
        #: θ_t, the mean-reversion rate on (t−1, t] (θ_0 is never used: there is no interval before t = 0).
        self.thetas = cosine_thetas(cfg.T, cfg.cosine_s)
        cum = torch.cumsum(self.thetas, 0) - self.thetas[0]
        #: length of one timestamp in SDE time, chosen so that exp(−θ̄_T) = eps (≈ 0.104 for T = 100).
        self.dt = float(-math.log(cfg.eps) / cum[-1])
        #: θ̄_t = ∫_0^t θ_z dz (Eq. 6), θ̄_0 = 0.
        self.theta_bar = cum * self.dt
        #: σ̄_t = sqrt(v_t) = λ sqrt(1 − e^{−2θ̄_t}) (Eq. 6).
        self.sigma_bar = self.lam * torch.sqrt(-torch.expm1(-2 * self.theta_bar))
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"IRSDE(T={self.T}, lam={self.lam:.5f}, dt={self.dt:.5f}, eps={self.config.eps})"

    # ---- schedule lookup --------------------------------------------------------------------------------------
    def _theta_bar_on(self, device: torch.device) -> torch.Tensor:
        # Coefficients are formed in float64 (float32 where the device has none) and cast at the end: e^{θ̄_T} = 200
        # amplifies rounding in x̂0.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        key = (device, dtype)
        if key not in self._tables:
            self._tables[key] = self.theta_bar.to(device=device, dtype=dtype)
        return self._tables[key]

    def _index(self, t, n: int, device: torch.device, name: str = "t", low: int = 0) -> torch.Tensor:
        """Timestamps as a long tensor (n,) on ``device``; float tensors of integer values are accepted (the U-Net
        receives float timestamps)."""
        if isinstance(t, bool) or not isinstance(t, int | torch.Tensor):
            raise ValueError(f"{name} must be an int or a torch.Tensor of timestamps, got {type(t).__name__}")
        if isinstance(t, int):
            if not low <= t <= self.T:
                raise ValueError(f"{name} must lie in [{low}, {self.T}], got {t}")
            return torch.full((n,), t, dtype=torch.long, device=device)
        if t.ndim == 0:
            t = t.expand(n)
        elif t.shape != (n,):
            raise ValueError(f"{name} must be an int, a 0-d tensor or a tensor of shape ({n},), got {tuple(t.shape)}")
        t = (t.round() if t.is_floating_point() else t).to(device=device, dtype=torch.long)
        if bool(((t < low) | (t > self.T)).any()):
            raise ValueError(f"{name} must lie in [{low}, {self.T}], got values from {int(t.min())} to {int(t.max())}")
        return t

    def _coef(self, t, like: torch.Tensor, name: str = "t", low: int = 0) -> torch.Tensor:
        """θ̄ at ``t``, shaped (N, 1, ..., 1) to broadcast against ``like``, in the lookup precision."""
        n = like.shape[0] if like.ndim else 1
        idx = self._index(t, n, like.device, name, low)
        return self._theta_bar_on(like.device)[idx].view((n,) + (1,) * (like.ndim - 1))

    def _pair(self, t, s, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ̄_t, θ̄_s) for s < t; ``s=None`` means t − 1."""
        n = like.shape[0] if like.ndim else 1
        if isinstance(s, int) and isinstance(t, int) and not isinstance(s, bool) and s >= t:
            raise ValueError(f"s must be smaller than t, got s={s}, t={t}")
        ti = self._index(t, n, like.device, "t", low=1)
        si = ti - 1 if s is None else self._index(s, n, like.device, "s")
        # Checking tensors costs a device sync; the samplers pass ints and are checked above.
        if isinstance(s, torch.Tensor) or (s is not None and isinstance(t, torch.Tensor)):
            if bool((si >= ti).any()):
                raise ValueError("s must be smaller than t for every sample")
        tb = self._theta_bar_on(like.device)
        shape = (n,) + (1,) * (like.ndim - 1)
        return tb[ti].view(shape), tb[si].view(shape)

    # ---- Eq. 6: marginal ----------------------------------------------------------------------------------------
    def mean(self, x0: torch.Tensor, mu: torch.Tensor, t) -> torch.Tensor:
        """m_t = μ + (F_0 − μ) e^{−θ̄_t} (Eq. 6)."""
        _same_shape(x0=x0, mu=mu)
        return mu + (x0 - mu) * torch.exp(-self._coef(t, x0)).to(x0.dtype)

    def std(self, t, like: torch.Tensor) -> torch.Tensor:
        """σ̄_t = sqrt(v_t) = λ sqrt(1 − e^{−2θ̄_t}) (Eq. 6), shaped to broadcast against ``like``."""
        return (self.lam * torch.sqrt(-torch.expm1(-2 * self._coef(t, like)))).to(like.dtype)

    def q_sample(self, x0: torch.Tensor, mu: torch.Tensor, t, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """F_t = m_t + sqrt(v_t) ε, ε ~ N(0, I) (Eq. 6, reparameterised); ``noise`` overrides ε."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        _same_shape(x0=x0, noise=noise)
        return self.mean(x0, mu, t) + self.std(t, x0) * noise

    def noise_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t) -> torch.Tensor:
        """The true ε_t = (F_t − m_t) / sqrt(v_t) (Eq. 6); the score is −ε_t / sqrt(v_t)."""
        _same_shape(x_t=x_t, x0=x0, mu=mu)
        return (x_t - self.mean(x0, mu, t)) / self.std(t, x_t)

    def x0_from_noise(self, x_t: torch.Tensor, mu: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """F̂_0 = μ + (F_t − μ − sqrt(v_t) ε̂) e^{θ̄_t}: Eq. 6 solved for F_0 given a noise estimate."""
        _same_shape(x_t=x_t, mu=mu, noise=noise)
        tb = self._coef(t, x_t)
        return mu + (x_t - mu - self.std(t, x_t) * noise) * torch.exp(tb).to(x_t.dtype)

    def noise_of(self, out: torch.Tensor, x_t: torch.Tensor, mu: torch.Tensor, t) -> torch.Tensor:
        """ε̂ from the network's output: the output itself, or for ``parametrization='x0'`` the noise of Eq. 6 that
        F̂_0 = μ + ``out`` implies (SDEConfig.parametrization)."""
        if self.config.parametrization == "noise":
            return out
        return self.noise_from_x0(x_t, mu + out, mu, t)

    # ---- Eq. 8: optimal reverse state and its posterior ---------------------------------------------------------
    def _abc(self, t, s, like):
        tb_t, tb_s = self._pair(t, s, like)
        a = torch.exp(-(tb_t - tb_s))  # e^{−θ'}, θ' = ∫_s^t θ_z dz
        b2 = -torch.expm1(-2 * tb_t)  # 1 − e^{−2θ̄_t}
        c = torch.exp(-tb_s)
        return a, b2, c, -torch.expm1(-2 * (tb_t - tb_s)), -torch.expm1(-2 * tb_s)

    def optimal_prev(self, x_t: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t, s=None) -> torch.Tensor:
        """F*_{t_{i−1}} (Eq. 8): the mean of q(F_s | F_t, F_0), the argmin of −log p(F_t | F_s, F_0) (Eq. 7).

        F* = (1 − e^{−2θ̄_s}) / (1 − e^{−2θ̄_t}) · e^{−θ'} (F_t − μ) + (1 − e^{−2θ'}) / (1 − e^{−2θ̄_t}) · e^{−θ̄_s}
        (F_0 − μ) + μ with θ' = θ̄_t − θ̄_s; ``s`` defaults to t − 1 and may be any earlier timestamp.
        """
        _same_shape(x_t=x_t, x0=x0, mu=mu)
        a, b2, c, one_m_a2, one_m_c2 = self._abc(t, s, x_t)
        k_t = (a * one_m_c2 / b2).to(x_t.dtype)
        k_0 = (c * one_m_a2 / b2).to(x_t.dtype)
        return mu + k_t * (x_t - mu) + k_0 * (x0 - mu)

    def posterior_std(self, t, like: torch.Tensor, s=None) -> torch.Tensor:
        """Standard deviation of q(F_s | F_t, F_0): λ sqrt((1 − e^{−2θ'})(1 − e^{−2θ̄_s}) / (1 − e^{−2θ̄_t}))."""
        _, b2, _, one_m_a2, one_m_c2 = self._abc(t, s, like)
        return (self.lam * torch.sqrt(one_m_a2 * one_m_c2 / b2)).to(like.dtype)

    # ---- Eq. 5: reverse SDE ------------------------------------------------------------------------------------
    def reverse_sde_mean(self, x_t: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor, t, s=None) -> torch.Tensor:
        """F_t − (dF_t)_ε̂: one Euler-Maruyama step of the reverse SDE (Eq. 5) from t back to s, without its noise.

        dF = [θ_t(μ − F) − σ_t² ∇log p_t(F)]dt with ∇log p_t = −ε̂ / sqrt(v_t); over (s, t] the drift integrates to
        θ'(μ − F_t) + 2λ²θ' ε̂ / σ̄_t with θ' = θ̄_t − θ̄_s (= θ_t dt for s = t − 1, the paper's step).
        """
        _same_shape(x_t=x_t, mu=mu, noise=noise)
        tb_t, tb_s = self._pair(t, s, x_t)
        tp = (tb_t - tb_s).to(x_t.dtype)
        score = -noise / self.std(t, x_t)
        return x_t - tp * (mu - x_t) + (2 * self.lam**2) * tp * score

    def reverse_sde_std(self, t, like: torch.Tensor, s=None) -> torch.Tensor:
        """σ_t sqrt(Δt) of the reverse Euler-Maruyama step: λ sqrt(2θ')."""
        tb_t, tb_s = self._pair(t, s, like)
        return (self.lam * torch.sqrt(2 * (tb_t - tb_s))).to(like.dtype)

    # ---- Eq. 9: loss --------------------------------------------------------------------------------------------
    def loss(self, noise_pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t,
             eta: torch.Tensor | None = None, form: LossForm = "sde", weight: torch.Tensor | None = None
             ) -> torch.Tensor:
        """L_ε (Eq. 9): η_t · mean |F_t − (dF_t)_ε̂ − F*_{t−1}|, averaged over the batch.

        ``form='sde'`` (the paper's): the one-step reverse mean is the Euler-Maruyama step of Eq. 5 with the score
        −ε̂/σ̄_t. It is *not* zero for the true ε: the Euler step and Eq. 8 agree only to first order in θ', and the
        loss's minimiser differs from ε by up to ≈2.5 % at t = T (cosine, T = 100); see ``eq9_optimal_noise``.
        ``form='posterior'``: the one-step mean is Eq. 8 with F_0 replaced by F̂_0(ε̂), the same step the
        "posterior" sampler takes; it is zero exactly for the true ε (a t-weighted L1 on the noise).
        ``form='x0'`` (not the paper's): mean |F̂_0(ε̂) − F_0|, the restoration itself at every t alike. Both forms
        above weigh F̂_0's error by its coefficient in a one-step mean, which vanishes at high t, so a network
        trained with them may return any F̂_0 there: an x0-output U-Net on small's image domain gave F̂_0 at t = T
        of 7-9 dB against its μ's 42 dB, and a 5-step sampler, whose first jump spans t = 100 -> 80, kept part of
        that. It is zero exactly for the true ε.
        ``eta`` (N,) are the η_{t_i} > 0 of Eq. 9 (default 1). ``weight`` (shaped like ``x0``, >= 0) turns each
        sample's mean into a weighted mean (a region such as the body outside the metal; a sample with no weight
        contributes 0).
        """
        _same_shape(noise_pred=noise_pred, x_t=x_t, x0=x0, mu=mu)
        if form == "sde":
            pred, target = self.reverse_sde_mean(x_t, mu, noise_pred, t), self.optimal_prev(x_t, x0, mu, t)
        elif form == "posterior":
            pred = self.optimal_prev(x_t, self.x0_from_noise(x_t, mu, t, noise_pred), mu, t)
            target = self.optimal_prev(x_t, x0, mu, t)
        elif form == "x0":
            pred, target = self.x0_from_noise(x_t, mu, t, noise_pred), x0
        else:
            raise ValueError(f"form must be 'sde', 'posterior' or 'x0', got {form!r}")
        err = (pred - target).abs()
        if weight is None:
            per_sample = err.flatten(1).mean(1)
        else:
            weight = check_tensor(weight, "weight", shape=tuple(x0.shape), finite=False).to(err)
            per_sample = (err * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1e-12)
        if eta is not None:
            eta = check_tensor(eta, "eta", shape=(x_t.shape[0],), finite=False)
            per_sample = per_sample * eta.to(per_sample)
        return per_sample.mean()

    def eq9_optimal_noise(self, x_t: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t) -> torch.Tensor:
        """The ε̂ for which the paper's loss (``form='sde'``) is exactly zero: Eq. 5's Euler step solved for ε̂ so
        that it lands on F*_{t−1} (Eq. 8). It is what a network trained with Eq. 9 learns to output."""
        tb_t, tb_s = self._pair(t, None, x_t)
        tp = (tb_t - tb_s).to(x_t.dtype)
        target = self.optimal_prev(x_t, x0, mu, t)
        return (x_t - tp * (mu - x_t) - target) * self.std(t, x_t) / ((2 * self.lam**2) * tp)

    def training_loss(self, model: NoiseModel, x0: torch.Tensor, mu: torch.Tensor, content=None, control=None, *,
                      t=None, generator: torch.Generator | None = None, eta: torch.Tensor | None = None,
                      form: LossForm = "sde", weight: torch.Tensor | None = None) -> torch.Tensor:
        """One training objective evaluation: t ~ U{1..T}, F_t from Eq. 6, ε̂ = model(F_t, μ, t, e^{I1}, e^{I2}),
        L_ε of Eq. 9 (``weight``: see :meth:`loss`). ``generator`` (on x0's device) drives t and ε."""
        x0 = check_tensor(x0, "x0", finite=False)
        mu = check_tensor(mu, "mu", finite=False)
        _same_shape(x0=x0, mu=mu)
        n = x0.shape[0]
        if t is None:
            t = torch.randint(1, self.T + 1, (n,), generator=generator, device=x0.device)
        t = self._index(t, n, x0.device, low=1)
        x_t = self.q_sample(x0, mu, t, generator=generator)
        noise_pred = self.noise_of(model(x_t, mu, t.to(x0.dtype), content=content, control=control), x_t, mu, t)
        return self.loss(noise_pred, x_t, x0, mu, t, eta=eta, form=form, weight=weight)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def timesteps(self, steps: int | None = None) -> list[int]:
        """The kept timestamps, descending from T to 0: ``steps`` network evaluations at T = t_k > ... > t_1, then 0.

        Kept timestamps are evenly spaced (rounded); the Gaussian parts of each step use θ' = θ̄_{t_i} − θ̄_{t_{i−1}},
        the exact integral of θ over the skipped interval, so fewer steps only coarsen the network's part.
        """
        steps = self.T if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise ValueError(f"steps must be an int in [1, {self.T}] (T), got {steps!r}")
        return sorted({round(self.T * k / steps) for k in range(steps + 1)}, reverse=True)

    def prior_sample(self, mu: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """F_T ≈ μ + λ z: the stationary distribution the forward SDE reaches (m_T − μ = eps (F_0 − μ))."""
        return mu + self.lam * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)

    def step(self, x_t: torch.Tensor, mu: torch.Tensor, noise_pred: torch.Tensor, t: int, s: int,
             sampler: Sampler = "posterior", z: torch.Tensor | None = None) -> torch.Tensor:
        """One reverse step from timestamp t to s < t given ε̂ = ``noise_pred`` and fresh noise ``z`` (ignored at s = 0).

        ``posterior``: F̂_0 from ε̂ (Eq. 6), then the optimal mean of Eq. 8 plus the posterior noise; at s = 0 the
        posterior collapses to F̂_0. ``sde``: the Euler-Maruyama step of Eq. 5 (no noise in the step to 0, which
        would only add λ sqrt(2θ') of grain to the result).
        """
        if sampler == "posterior":
            x0_hat = self.x0_from_noise(x_t, mu, t, noise_pred)
            if s == 0:
                return x0_hat
            mean = self.optimal_prev(x_t, x0_hat, mu, t, s)
            return mean + self.posterior_std(t, x_t, s) * z
        if sampler == "sde":
            mean = self.reverse_sde_mean(x_t, mu, noise_pred, t, s)
            return mean if s == 0 else mean + self.reverse_sde_std(t, x_t, s) * z
        raise ValueError(f"sampler must be 'posterior' or 'sde', got {sampler!r}")

    def _run(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mu: torch.Tensor, steps, sampler,
             generator, x_T, callback, x0_range) -> torch.Tensor:
        if sampler not in ("posterior", "sde"):
            raise ValueError(f"sampler must be 'posterior' or 'sde', got {sampler!r}")
        if x0_range is not None:
            if (not isinstance(x0_range, tuple | list) or len(x0_range) != 2
                    or not all(isinstance(v, int | float) for v in x0_range) or not x0_range[0] < x0_range[1]):
                raise ValueError(f"x0_range must be None or a pair (low, high) with low < high, got {x0_range!r}")
        kept = self.timesteps(steps)
        if x_T is None:
            x = self.prior_sample(mu, generator)
        else:
            x = check_tensor(x_T, "x_T")
            _same_shape(x_T=x, mu=mu)
        for t, s in zip(kept[:-1], kept[1:]):
            t_vec = torch.full((mu.shape[0],), float(t), device=mu.device, dtype=mu.dtype)
            noise_pred = self.noise_of(denoise(x, t_vec), x, mu, t)
            if x0_range is not None:
                # Clipping F̂_0 to the data range and re-deriving ε̂ (DDPM's "clip_denoised") bounds the e^{θ̄_t} (up
                # to 1/eps = 200x) amplification of the network's error at large t, where F̂_0 is mostly noise.
                x0_hat = self.x0_from_noise(x, mu, t, noise_pred).clamp(*x0_range)
                noise_pred = self.noise_from_x0(x, x0_hat, mu, t)
            # Noise is drawn for the whole image in one call per step, so tiled and untiled runs with the same
            # generator give every pixel the same noise.
            z = None if s == 0 else torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            x = self.step(x, mu, noise_pred, t, s, sampler, z)
            if callback is not None:
                callback(s, x)
        return x

    @torch.no_grad()
    def sample(self, model: NoiseModel, mu: torch.Tensor, content: torch.Tensor | None = None,
               control: torch.Tensor | None = None, *, steps: int | None = None, sampler: Sampler = "posterior",
               generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
               x0_range: tuple[float, float] | None = None,
               callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Restore F̂_0 from the degraded ``mu`` by reverse diffusion from F_T = μ + λz (Eq. 5-8).

        ``steps`` network evaluations (default T; any 1 <= steps <= T, see ``timesteps``); ``sampler`` is
        ``'posterior'`` (the public code's default, better) or ``'sde'`` (Euler-Maruyama on Eq. 5). ``generator``
        must live on ``mu``'s device. ``x0_range=(low, high)`` clips each F̂_0 to the data range (not in the paper or
        the public code; it makes sampling robust to an imperfect ε̂ at large t). ``callback(s, x_s)`` sees every
        intermediate state. The model is put in eval mode for the call and restored afterwards.
        """
        mu = check_tensor(mu, "mu")

        def denoise(x, t_vec):
            return model(x, mu, t_vec, content=content, control=control)

        with _eval_mode(model):
            return self._run(denoise, mu, steps, sampler, generator, x_T, callback, x0_range)

    @torch.no_grad()
    def sample_tiled(self, model: NoiseModel, mu: torch.Tensor, content: torch.Tensor | None = None,
                     control: torch.Tensor | None = None, *, tile: int = 256, overlap: int = 32, tile_batch: int = 4,
                     steps: int | None = None, sampler: Sampler = "posterior",
                     generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                     x0_range: tuple[float, float] | None = None,
                     callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """``sample`` for inputs too large for one network call: at each step the network sees overlapping
        ``tile`` x ``tile`` windows (``tile_batch`` windows per call) and the predicted noise is blended with a
        smooth (sin²-ramped) window before one global step.

        The state, the step and the noise stay global: every pixel gets the same noise as in ``sample`` with the same
        generator, so an input no larger than one tile gives exactly ``sample``'s result, and a per-pixel model gives
        it for any tiling. Blending ε̂ (rather than tile outputs) is exact because each step is affine in ε̂.
        """
        mu = check_tensor(mu, "mu", ndim=4)
        for name, v in (("tile", tile), ("tile_batch", tile_batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"overlap must be an int in [0, tile={tile}), got {overlap!r}")
        n, _, h, w = mu.shape
        rows, th = _tile_starts(h, tile, overlap)
        cols, tw = _tile_starts(w, tile, overlap)
        boxes = [(r, c) for r in rows for c in cols]
        win = (_window(th, overlap, mu)[:, None] * _window(tw, overlap, mu)[None, :])[None, None]
        total = torch.zeros((1, 1, h, w), device=mu.device, dtype=mu.dtype)
        for r, c in boxes:
            total[..., r:r + th, c:c + tw] += win
        # Per-tile weights normalised once, so the blended ε̂ is a convex combination (a lone tile gets weight 1.0
        # exactly and reproduces ``sample`` bit for bit).
        weights = [win / total[..., r:r + th, c:c + tw] for r, c in boxes]

        def denoise(x, t_vec):
            acc = torch.zeros_like(x)
            for i in range(0, len(boxes), tile_batch):
                chunk = boxes[i:i + tile_batch]
                k = len(chunk)
                xs = torch.cat([x[..., r:r + th, c:c + tw] for r, c in chunk])
                ms = torch.cat([mu[..., r:r + th, c:c + tw] for r, c in chunk])
                eps = model(xs, ms, t_vec.repeat(k),
                            content=None if content is None else content.repeat(k, 1),
                            control=None if control is None else control.repeat(k, 1))
                for j, (r, c) in enumerate(chunk):
                    acc[..., r:r + th, c:c + tw] += eps[j * n:(j + 1) * n] * weights[i + j]
            return acc

        with _eval_mode(model):
            return self._run(denoise, mu, steps, sampler, generator, x_T, callback, x0_range)


# ---- helpers --------------------------------------------------------------------------------------------------------
def _same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, ref = items[0]
    for name, x in items:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape != ref.shape:
            raise ValueError(f"{name} must have the same shape as {name0} {tuple(ref.shape)}, got {tuple(x.shape)}")


def _tile_starts(size: int, tile: int, overlap: int) -> tuple[Sequence[int], int]:
    """Start offsets of equal tiles covering [0, size) with at least ``overlap`` shared pixels; the last tile is
    flush with the border so every tile has the same size (one batched network call)."""
    if size <= tile:
        return [0], size
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile], tile


def _window(length: int, overlap: int, like: torch.Tensor) -> torch.Tensor:
    """1-D blending weights: 1 inside, a sin² ramp over ``overlap`` pixels at both ends that never reaches 0, so a
    border pixel covered by a single tile still gets that tile's value after normalisation."""
    k = torch.arange(length, device=like.device, dtype=torch.float64)
    if overlap == 0:
        return torch.ones(length, device=like.device, dtype=like.dtype)
    ramp = torch.sin(0.5 * math.pi * (torch.minimum(k, length - 1 - k) + 1) / (overlap + 1)) ** 2
    return torch.where(torch.minimum(k, length - 1 - k) < overlap, ramp, torch.ones_like(ramp)).to(like.dtype)


class _eval_mode:
    """Put a torch module in eval mode for a block and restore its previous mode; plain callables pass through."""

    def __init__(self, model) -> None:
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.was_training = False

    def __enter__(self):
        if self.model is not None:
            self.was_training = self.model.training
            self.model.eval()

    def __exit__(self, *exc) -> None:
        if self.model is not None:
            self.model.train(self.was_training)
