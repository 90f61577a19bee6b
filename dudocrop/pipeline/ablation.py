"""The rows of the paper's Table V as switches of one pipeline, computed from ONE set of diffusion priors.

Each row is an OSRO configuration (``dudocrop.pipeline.osro.OSROConfig``) plus which domains feed the output.
The image and sinogram priors ε2(X_ma), ε1(Y_ma) are sampled once per slice; rows that normalise share one
residual refinement ε3(X_p − X'_p), and the fusion variants are re-fused from it (Eq. 13-15 cost nothing next to
the diffusion). The "+ DuDoCLIP" rows of Table V compare two trained model sets (with and without embedding
guidance); they are the ``guidance`` column of the evaluation, not a switch here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dudocrop.pipeline.osro import OSROConfig, default_safeguard, guarded_fuse, osro, trust_map


@dataclass(frozen=True)
class AblationRow:
    name: str
    label: str  # Table V's wording
    domains: str  # "image" | "sinogram" | "dual"
    normalize: bool = True
    fidelity: bool = True
    residual_refine: bool = True
    fusion: bool = True
    norm: str | None = None  # OSROConfig.norm for this row; None: the pipeline's own
    safeguard: bool = False  # beyond the paper: Eq. 15 under the measured-data safeguard (OSROConfig.safeguard)
    # OSROConfig.completion (beyond the paper) for this row: off in Table V's rows; None: the pipeline's own
    completion: bool | None = False
    variant: bool = False  # a row that differs from the pipeline's own in ``completion`` only: absent when it doesn't


TABLE_V: tuple[AblationRow, ...] = (
    AblationRow("image_raw", "Image-domain IR-SDE (w/o Normalization)", "image", normalize=False),
    AblationRow("image_norm", "Image-domain IR-SDE (w/ Normalization)", "dual", residual_refine=False, fusion=False),
    AblationRow("sino_raw", "Sino-domain IR-SDE (w/o Fidelity)", "sinogram", fidelity=False),
    AblationRow("sino_fidelity", "Sino-domain IR-SDE (w/ Fidelity)", "sinogram"),
    AblationRow("fusion", "Dual-domain Priors Fusion", "dual", residual_refine=False),
    AblationRow("refine_raw", "Residual Refining (w/o Normalization)", "dual", normalize=False, fusion=False),
    AblationRow("refine_norm", "Residual Refining (w/ Normalization)", "dual", fusion=False),
    AblationRow("dudocrop", "Residual Refining (w/ Normalization) + Dual-domain Priors Fusion", "dual",
                completion=None),
    # not in Table V: the full pipeline with the paper's min-max Norm (Eq. 11), present when the pipeline uses the
    # affine one (OSROConfig.norm), with the same models and factors
    AblationRow("dudocrop_minmax", "DuDoCROP with Eq. 11's min-max Norm (same models, k, α, β)", "dual",
                norm="minmax", completion=None),
    # not in Table V (issue 25 §2): the full pipeline with the measured-data safeguard (the pipeline's bound, or
    # osro.default_safeguard); the "dudocrop" row above is always without it
    AblationRow("dudocrop_safeguard", "DuDoCROP with the measured-data safeguard (beyond the paper)", "dual",
                safeguard=True, completion=None),
    # not in Table V (issue 25): the full pipeline with / without the measured sinogram's completion
    # (OSROConfig.completion), whichever the pipeline does not do, with the same models and factors
    AblationRow("dudocrop_completion", "DuDoCROP with X_o completing the measured sinogram (beyond the paper)",
                "dual", completion=True, variant=True),
    AblationRow("dudocrop_eq15", "DuDoCROP's Eq. 15 output, without the sinogram completion", "dual",
                completion=False, variant=True),
)
ROWS = {r.name: r for r in TABLE_V}


def row_config(row: AblationRow, base: OSROConfig) -> OSROConfig:
    cfg = replace(base, normalize=row.normalize, fidelity=row.fidelity, residual_refine=row.residual_refine,
                  fusion=row.fusion, norm=row.norm or base.norm, safeguard=None,
                  completion=base.completion if row.completion is None else row.completion)
    return replace(cfg, safeguard=base.safeguard or default_safeguard(cfg)) if row.safeguard else cfg


@torch.no_grad()
def ablation_outputs(model, x_ma_hu: torch.Tensor, y_ma: torch.Tensor, metal_mask: torch.Tensor,
                     trace: torch.Tensor, x_prior: torch.Tensor, y_prior: torch.Tensor, base: OSROConfig,
                     rows: tuple[AblationRow, ...] = TABLE_V) -> dict[str, torch.Tensor]:
    """X_o in HU (metal reinserted) for every row, from cached priors of a :class:`DuDoCROP` ``model``."""
    region = model.region(x_ma_hu, metal_mask)
    y_unit = model.norm.sino(y_ma)
    has_refiner = model.models["residual"] is not None
    full: dict[tuple, object] = {}  # one OSRO run (with ε3 when available) per normalisation setting

    def run_osro(cfg: OSROConfig):
        key = (cfg.normalize, cfg.norm)
        if key not in full:
            full[key] = osro(x_prior, y_prior, y_unit, trace, model.fbp_unit, model.refine if has_refiner else None,
                             region, replace(cfg, fidelity=True, residual_refine=has_refiner, safeguard=None,
                                             trust=None, completion=False))
        return full[key]

    out = {}
    for row in rows:
        if (row.norm is not None and row.norm == base.norm) or (row.variant and row.completion == base.completion):
            continue  # the same as the pipeline's own row
        cfg = row_config(row, base)
        if row.domains in ("image", "sinogram"):
            x_o, _ = model.combine(x_ma_hu, y_ma, metal_mask, trace, x_prior, y_prior, cfg, row.domains)
            out[row.name] = x_o
            continue
        if row.residual_refine and not has_refiner:
            continue  # no residual model trained: the refining rows are absent, not faked
        res = run_osro(cfg)
        guard = model.guard(x_ma_hu, y_ma, metal_mask, trace) if cfg.safeguard is not None else None
        trust = trust_map(trace, model.op) if cfg.trust is not None else None
        completion = model.completion(y_ma, metal_mask, trace) if cfg.completion else None
        _, x_o, _, _ = guarded_fuse(res.X_p, res.X_p_prime, res.X_r_hat if row.residual_refine else None, region,
                                    cfg, guard, trust, completion)
        out[row.name] = model.to_hu(x_o, x_ma_hu, metal_mask)
    return out
