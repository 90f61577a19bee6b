"""Choosing the OSRO factors k, α, β (Eq. 13-15) from cached priors.

The paper tunes k, α, β by hand (Algorithm 2: "manual-adjusted factors"). Here they are chosen on held-out
slices (the ``val`` split, never the test split the report scores): the diffusion priors X_p, X'_p and the refined
residual X̂_r are sampled once per slice (:meth:`FusionCache.build`), and every candidate (k, α, β) is only
Eq. 13-15 plus the metrics, milliseconds per slice, so a sweep of thousands of trials costs less than one sampling.
With ``OSROConfig.safeguard`` set (beyond the paper, issue 25 §2) each candidate is scored as the pipeline runs it,
adaptive fusion included; the cache then also holds the measurement Y_ma and the trace, and the consistency
residuals the safeguard needs are computed once per k (they are affine in the image, so α and β only re-combine
them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import torch

from dudocrop.atomic import torch_save
from dudocrop.data.normalize import Normalization
from dudocrop.metrics.image import body_mask, image_metrics
from dudocrop.pipeline.osro import OSROConfig, complete, fuse, safeguard
from dudocrop.serialization import load_torch

__all__ = ["FusionCache", "rank"]


@dataclass
class FusionCache:
    """What Eq. 13-15 and the metrics need, per slice: the priors in normalised units and the HU images."""

    X_p: torch.Tensor
    X_p_prime: torch.Tensor
    X_r_hat: torch.Tensor | None
    region: torch.Tensor  # the Eq. 11 min / max region (DuDoCROP.region)
    x_ma_hu: torch.Tensor
    metal_mask: torch.Tensor
    x_ref_hu: torch.Tensor
    roi: torch.Tensor  # the body of the reference (metrics.image.body_mask), where the report scores
    norm: Normalization  # normalised attenuation -> HU, as the model's
    case_ids: list[str]
    # what the safeguard's consistency check needs (None in caches written before it): Y_ma in line integrals,
    # the metal trace M_s (float), each slice's geometry name
    y_ma: torch.Tensor | None = None
    trace: torch.Tensor | None = None
    geometries: list[str] | None = None
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    @torch.no_grad()
    def build(cls, model, x_ma_hu, y_ma, metal_mask, trace, x_ref_hu, case_ids, batch_size: int = 8,
              progress=None, geometries=None) -> FusionCache:
        """Sample the priors of a :class:`~dudocrop.pipeline.model.DuDoCROP` ``model`` on (N, 1, ...) tensors;
        ``geometries`` (one name per slice, None: the model's) puts each slice in its own geometry
        (``DuDoCROP.at``)."""
        from dudocrop.pipeline.model import geometry_batches

        if model.models["residual"] is None:
            raise ValueError("the model folder has no sde_residual.pt: k (Eq. 13) cannot be chosen without ε3")
        keys = ("X_p", "X_p_prime", "X_r_hat", "region")
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        n, order, done = x_ma_hu.shape[0], [], 0
        for geom, idx in geometry_batches(geometries, n, batch_size):
            m, sl = model.at(geom), torch.as_tensor(idx)
            out = m(x_ma_hu[sl], y_ma[sl], metal_mask=metal_mask[sl], trace=trace[sl], return_priors=True)
            x, _, mask, _ = m.prepare(x_ma_hu[sl], y_ma[sl], metal_mask[sl], trace[sl])
            for k in ("X_p", "X_p_prime", "X_r_hat"):
                parts[k].append(getattr(out.priors, k).cpu())
            parts["region"].append(m.region(x, mask).cpu())
            order += idx
            done += len(idx)
            if progress is not None:
                progress(done, n)
        back = torch.argsort(torch.as_tensor(order))  # batches grouped by geometry -> the slices' order
        cat = {k: torch.cat(v)[back] for k, v in parts.items()}
        names = [model.at(g).geometry.name for g in (geometries if geometries is not None else [None] * n)]
        return cls(cat["X_p"], cat["X_p_prime"], cat["X_r_hat"], cat["region"], x_ma_hu.cpu().float(),
                   metal_mask.cpu().float(), x_ref_hu.cpu().float(), body_mask(x_ref_hu.cpu().float()), model.norm,
                   [str(c) for c in case_ids], y_ma.cpu().float(), trace.cpu().float(), names)

    def __getstate__(self):  # Ray ships the cache to Tune's workers: without the guards (rebuilt there once)
        return {**self.__dict__, "_memo": {}}

    def _to_hu(self, x_unit: torch.Tensor) -> torch.Tensor:
        return torch.where(self.metal_mask > 0, self.x_ma_hu, self.norm.image_to_hu(x_unit))

    def fused(self, cfg: OSROConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(X̂_p, X_o, the safeguard's fallback t or None) for ``cfg``, as the pipeline computes them
        (``osro.guarded_fuse``): Eq. 13-15, then the safeguard when ``cfg.safeguard`` is set."""
        x_p_hat, x_o = fuse(self.X_p, self.X_p_prime, self.X_r_hat, self.region, cfg,
                            self._trust() if cfg.trust is not None else None)
        if cfg.safeguard is None or not cfg.fusion:
            return x_p_hat, self._complete(x_o, cfg), None
        t = torch.zeros(x_o.shape[0])
        x_o = x_o.clone()
        for name, idx, guard in self._guards():
            key = (name, cfg.k, cfg.normalize, cfg.residual_refine, cfg.norm, cfg.norm_sigma, cfg.trust)
            if key not in self._memo:  # X̂_p's residual depends on k (and the Norm), not on α, β or the bound
                self._memo[key] = guard.residual(x_p_hat[idx])
            res = (self._memo[key], self._memo[("prime", name)], self._memo[("zero", name)])
            x_o[idx], t[idx], _ = safeguard(x_p_hat[idx], self.X_p_prime[idx], cfg, guard, res)
        return x_p_hat, self._complete(x_o, cfg), t

    def _complete(self, x_o: torch.Tensor, cfg: OSROConfig) -> torch.Tensor:
        """``osro.complete`` per geometry (``OSROConfig.completion``), as the pipeline applies it."""
        if not cfg.completion:
            return x_o
        if self.y_ma is None or self.trace is None or self.geometries is None:
            raise ValueError("OSROConfig.completion needs the measurement in the fusion cache (Y_ma, the trace, the "
                             "geometries); this cache was written without them: rebuild it")
        from dudocrop.pipeline.model import completion_fn

        out = torch.empty_like(x_o)
        for name, idx in self._by_geometry():
            fn = completion_fn(self.y_ma[idx], self.metal_mask[idx], self.trace[idx], self._op(name), self.norm)
            out[idx] = complete(x_o[idx], cfg, fn)
        return out

    def _by_geometry(self) -> list[tuple[str, torch.Tensor]]:
        """[(geometry name, the indices of its slices)], in name order."""
        return [(name, torch.as_tensor([i for i, g in enumerate(self.geometries) if g == name]))
                for name in sorted(set(self.geometries))]

    def _op(self, name: str):
        """The fan-beam operator of geometry ``name``, built once per cache (and per Tune worker)."""
        if ("op", name) not in self._memo:
            from dudocrop.ct.operators import FanBeamOperator

            self._memo[("op", name)] = FanBeamOperator(name)
        return self._memo[("op", name)]

    def _trust(self) -> torch.Tensor:
        """``osro.trust_map`` of every slice in its geometry, built once (OSROConfig.trust)."""
        if "trust" not in self._memo:
            if self.trace is None or self.geometries is None:
                raise ValueError("OSROConfig.trust needs the trace in the fusion cache; this cache was written "
                                 "without it: rebuild it")
            from dudocrop.pipeline.osro import trust_map

            out = torch.zeros_like(self.X_p)
            for name, idx in self._by_geometry():
                out[idx] = trust_map(self.trace[idx], self._op(name))
            self._memo["trust"] = out
        return self._memo["trust"]

    def _guards(self):
        """[(geometry name, slice indices, ConsistencyCheck)]: the measured-data check per geometry, built once
        (X_ma with the metal read as water gives the body, as ``DuDoCROP.guard``)."""
        if "guards" in self._memo:
            return self._memo["guards"]
        if self.y_ma is None or self.trace is None or self.geometries is None:
            raise ValueError("OSROConfig.safeguard needs the measurement in the fusion cache (Y_ma, the trace, the "
                             "geometries); this cache was written without them: rebuild it (tune_fusion samples "
                             "the priors again)")
        from dudocrop.metrics.consistency import ConsistencyCheck

        out = []
        for name, idx in self._by_geometry():
            ref = torch.where(self.metal_mask[idx] > 0, torch.zeros_like(self.x_ma_hu[idx]), self.x_ma_hu[idx])
            guard = ConsistencyCheck.build(ref, self.y_ma[idx], self.trace[idx], self._op(name),
                                           self.metal_mask[idx], to_hu=self.norm.image_to_hu)
            self._memo[("prime", name)] = guard.residual(self.X_p_prime[idx])
            self._memo[("zero", name)] = guard.residual(torch.zeros_like(self.X_p_prime[idx]))
            out.append((name, idx, guard))
        self._memo["guards"] = out
        return out

    def output_hu(self, cfg: OSROConfig) -> torch.Tensor:
        """X_o (Eq. 15, the safeguard when ``cfg`` sets it) in HU with the metal of X_ma reinserted."""
        return self._to_hu(self.fused(cfg)[1])

    def score(self, cfg: OSROConfig) -> dict[str, float]:
        """Mean PSNR / SSIM of X_o against the reference (same pixels as the evaluation report), and the PSNR of
        the refined image prior X̂_p (Eq. 13-14), which alone depends on k when α = 0. With the safeguard also the
        mean share of the image prior's weight it moved to X'_p (``fallback``)."""
        x_p_hat, x_o, t = self.fused(cfg)
        m = image_metrics(self._to_hu(x_o), self.x_ref_hu, self.metal_mask, self.roi)
        refined = image_metrics(self._to_hu(x_p_hat), self.x_ref_hu, self.metal_mask, self.roi)["psnr"]
        out = {"psnr": float(m["psnr"].mean()), "ssim": float(m["ssim"].mean()),
               "psnr_refined": float(refined.mean())}
        if t is not None:
            out["fallback"] = float(t.mean())
        return out

    def best(self, base: OSROConfig, candidates) -> tuple[OSROConfig, dict[str, float]]:
        """The (k, α, β) of ``candidates`` (dicts) that :func:`rank` puts first, and its scores (a plain grid
        search; ``ray_jobs/tune_fusion.py`` runs the same scoring as Ray Tune trials)."""
        scored = [(self.score(c := replace(base, **dict(cand))), c) for cand in candidates]
        m, c = max(scored, key=lambda t: rank(t[0]))
        return c, m

    def save(self, path: str) -> None:
        """Tensors and plain data (the normalisation as a dict), so :meth:`load` needs no unpickling of objects."""
        torch_save(path, {**{f.name: getattr(self, f.name) for f in fields(self) if f.init},
                          "norm": asdict(self.norm)})

    @classmethod
    def load(cls, path: str) -> FusionCache:
        """The cache :meth:`save` wrote; tensors and plain data only (a pickled callable is refused unrun)."""
        d = load_torch(path, "fusion cache (priors.pt)")
        names = {f.name for f in fields(cls) if f.init}
        optional = {"y_ma", "trace", "geometries"}  # older caches lack the measurement: loaded, safeguard refused
        if not isinstance(d, dict) or not (names - optional <= set(d) <= names):
            raise ValueError(f"{path} is not a fusion cache: expected the keys {sorted(names)}, got "
                             f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        return cls(**{**d, "norm": Normalization(**d["norm"])})  # missing optional fields: None


def rank(scores: dict[str, float]) -> tuple[float, float]:
    """Order of candidates: mean PSNR of X_o (to 1e-4 dB), ties broken by the refined prior's PSNR, so a k that
    X_o cannot see (α = 0) is still the one that refines best and the Table V refining rows stay meaningful."""
    return round(scores["psnr"], 4), scores["psnr_refined"]
