"""Choosing the OSRO factors k, α, β (Eq. 13-15) from cached priors.

The paper tunes k, α, β by hand (Algorithm 2: "manual-adjusted factors"). Here they are chosen on held-out
slices (the ``val`` split, never the test split the report scores): the diffusion priors X_p, X'_p and the refined
residual X̂_r are sampled once per slice (:meth:`FusionCache.build`), and every candidate (k, α, β) is only
Eq. 13-15 plus the metrics, milliseconds per slice, so a sweep of thousands of trials costs less than one sampling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from dudocrop.atomic import torch_save
from dudocrop.data.normalize import Normalization
from dudocrop.metrics.image import body_mask, image_metrics
from dudocrop.pipeline.osro import OSROConfig, fuse
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
        return cls(cat["X_p"], cat["X_p_prime"], cat["X_r_hat"], cat["region"], x_ma_hu.cpu().float(),
                   metal_mask.cpu().float(), x_ref_hu.cpu().float(), body_mask(x_ref_hu.cpu().float()), model.norm,
                   [str(c) for c in case_ids])

    def _to_hu(self, x_unit: torch.Tensor) -> torch.Tensor:
        return torch.where(self.metal_mask > 0, self.x_ma_hu, self.norm.image_to_hu(x_unit))

    def output_hu(self, cfg: OSROConfig) -> torch.Tensor:
        """X_o (Eq. 15) in HU with the metal of X_ma reinserted, for factors ``cfg``."""
        return self._to_hu(fuse(self.X_p, self.X_p_prime, self.X_r_hat, self.region, cfg)[1])

    def score(self, cfg: OSROConfig) -> dict[str, float]:
        """Mean PSNR / SSIM of X_o against the reference (same pixels as the evaluation report), and the PSNR of
        the refined image prior X̂_p (Eq. 13-14), which alone depends on k when α = 0."""
        x_p_hat, x_o = fuse(self.X_p, self.X_p_prime, self.X_r_hat, self.region, cfg)
        m = image_metrics(self._to_hu(x_o), self.x_ref_hu, self.metal_mask, self.roi)
        refined = image_metrics(self._to_hu(x_p_hat), self.x_ref_hu, self.metal_mask, self.roi)["psnr"]
        return {"psnr": float(m["psnr"].mean()), "ssim": float(m["ssim"].mean()),
                "psnr_refined": float(refined.mean())}

    def best(self, base: OSROConfig, candidates) -> tuple[OSROConfig, dict[str, float]]:
        """The (k, α, β) of ``candidates`` (dicts) that :func:`rank` puts first, and its scores (a plain grid
        search; ``ray_jobs/tune_fusion.py`` runs the same scoring as Ray Tune trials)."""
        scored = [(self.score(c := replace(base, **dict(cand))), c) for cand in candidates]
        m, c = max(scored, key=lambda t: rank(t[0]))
        return c, m

    def save(self, path: str) -> None:
        """Tensors and plain data (the normalisation as a dict), so :meth:`load` needs no unpickling of objects."""
        torch_save(path, {**self.__dict__, "norm": asdict(self.norm)})

    @classmethod
    def load(cls, path: str) -> FusionCache:
        """The cache :meth:`save` wrote; tensors and plain data only (a pickled callable is refused unrun)."""
        d = load_torch(path, "fusion cache (priors.pt)")
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise ValueError(f"{path} is not a fusion cache: expected the keys {sorted(names)}, got "
                             f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        return cls(**{**d, "norm": Normalization(**d["norm"])})


def rank(scores: dict[str, float]) -> tuple[float, float]:
    """Order of candidates: mean PSNR of X_o (to 1e-4 dB), ties broken by the refined prior's PSNR, so a k that
    X_o cannot see (α = 0) is still the one that refines best and the Table V refining rows stay meaningful."""
    return round(scores["psnr"], 4), scores["psnr_refined"]
