"""Choose the OSRO factors k, α, β (paper Eq. 13-15, Algorithm 2's "manual-adjusted factors") with Ray Tune on
held-out slices, from priors sampled once, and write them into the model folder's ``pipeline.json``.

    python ray_jobs/tune_fusion.py --data outputs/train_all/data --models outputs/train_all/models \\
        --out outputs/train_all/fusion [--split val] [--steps 10] [--space grid --points 5] [--safeguard 1.5]

The priors X_p, X'_p and the refined residual X̂_r of ``--max-slices`` slices of ``--split`` (never the test split
the report scores) are sampled once (``dudocrop.eval.fusion.FusionCache``, saved as ``<out>/priors.pt``); each
Tune trial then only re-fuses them (Eq. 13-15) and scores mean PSNR / SSIM, so the grid's 125 trials (or
thousands of random ones) cost seconds. The best trial by PSNR (ties: the refined prior's PSNR,
``dudocrop.eval.fusion.rank``) is written to ``pipeline.json`` with a record of
how it was chosen; ``<out>/trials.csv`` holds every trial, ``<out>/fusion.json`` the summary, ``<out>/surface.png``
(grid) the val PSNR over (α, β) at the chosen k and over k at the chosen (α, β), the chosen point marked.

``--safeguard BOUND`` (beyond the paper, issue 25 §2) tunes with the measured-data safeguard on: every trial is
scored with adaptive fusion (``OSROConfig.safeguard``) as the pipeline will run it, and the bound is written with
k, α, β, so the tuned factors and the safeguard agree. ``--safeguard none`` tunes without it and writes it off;
left out, the pipeline's own setting is kept and used.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from dudocrop.atomic import write_json, write_text
from dudocrop.eval.fusion import FusionCache, rank
from dudocrop.pipeline.model import PIPELINE_FILE, DuDoCROP, pipeline_config_from_dict, save_pipeline_meta
from dudocrop.pipeline.osro import OSROConfig
from dudocrop.storage import remote_path
from dudocrop.train.rows import load_split
from tune_spaces.fusion import FACTORS, fusion_space

COLUMNS = ["case_id", "X_ma", "X_ref", "Y_ma", "metal_mask", "metal_trace", "geometry"]


#: --safeguard left out: the stored pipeline's setting
KEEP = "keep"


def _bound(v: str):
    if v == KEEP:  # argparse passes a string default through ``type`` too
        return KEEP
    if v.lower() == "none":
        return None
    try:
        OSROConfig(safeguard=float(v))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--safeguard: {e}") from None
    return float(v)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", required=True, help="model folder (its pipeline.json is updated)")
    ap.add_argument("--out", required=True, help="folder for the cached priors, Tune's trials and the summary")
    ap.add_argument("--split", default="val", help="held-out split to choose on (not the split you report)")
    ap.add_argument("--max-slices", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="reverse-diffusion steps (default: the models' T)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--space", default="grid", choices=("grid", "random"))
    ap.add_argument("--points", type=int, default=5, help="grid: values per factor in [0, 1]")
    ap.add_argument("--num-samples", type=int, default=1000, help="random: number of trials")
    ap.add_argument("--safeguard", type=_bound, default=KEEP, help="OSROConfig.safeguard bound to tune with and "
                    "write (a score >= 1), or 'none'; default: the pipeline's own")
    ap.add_argument("--no-write", action="store_true", help="report the best factors, leave pipeline.json as is")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--address", default=None)
    return ap.parse_args(argv)


def build_cache(a: argparse.Namespace, model: DuDoCROP) -> FusionCache:
    try:
        rows = load_split(a.data, a.split, COLUMNS)
    except ValueError as e:
        raise SystemExit(f"tune_fusion: cannot choose the factors on split {a.split!r} of {a.data}: {e} (pass "
                         f"--split, or train_all --set fusion_split=..., naming a held-out split that is not the "
                         f"one you report)") from e
    n = min(a.max_slices, len(rows))
    b = rows.take(np.arange(n))
    t = {k: torch.from_numpy(np.ascontiguousarray(b[k]))[:, None] for k in COLUMNS[1:-1]}
    t0 = time.time()
    return FusionCache.build(
        model, t["X_ma"], t["Y_ma"], t["metal_mask"], t["metal_trace"] > 0, t["X_ref"], b["case_id"],
        a.batch_size, geometries=b["geometry"],
        progress=lambda i, m: print(f"tune_fusion: priors {i}/{m} slices | {time.time() - t0:.1f}s", flush=True))


def _trial(config: dict, cache: FusionCache, base: OSROConfig) -> None:
    from ray import tune

    tune.report(cache.score(replace(base, **{f: float(config[f]) for f in FACTORS})))


def run(a: argparse.Namespace) -> dict:
    from ray import tune

    from ray_jobs import common

    device = "cuda" if a.gpu else "cpu"
    meta_path = os.path.join(a.models, PIPELINE_FILE)
    if not os.path.isfile(meta_path):
        raise SystemExit(f"tune_fusion: {meta_path} is missing: run ray_jobs/priors.py or train_all first")
    with open(meta_path) as f:
        meta = json.load(f)
    stored = pipeline_config_from_dict(meta.get("pipeline", {}))
    model = DuDoCROP.load(a.models, device=device, steps=a.steps)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    cache = build_cache(a, model)
    cache.save(os.path.join(out, "priors.pt"))
    t_priors = time.time() - t0
    base = replace(stored.osro, normalize=True, fidelity=True, residual_refine=True, fusion=True)
    if a.safeguard != KEEP:
        base = replace(base, safeguard=a.safeguard)
    neutral = OSROConfig()  # the neutral start the sweep is compared with: OSROConfig's default k, α, β
    untuned = replace(base, **{f: getattr(neutral, f) for f in FACTORS})
    before = cache.score(untuned)

    common.init_ray(a.address)
    space = fusion_space(a.space, a.points)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, cache=cache, base=base), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="psnr", mode="max", num_samples=1 if a.space == "grid" else a.num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="fusion", storage_path=remote_path(os.path.join(out, "tune")), verbose=0),
    )
    t1 = time.time()
    results = tuner.fit()
    t_tune = time.time() - t1
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"tune_fusion: {len(errors)} trials failed; first: {errors[0]}")
    df = results.get_dataframe()
    cols = [f"config/{f}" for f in FACTORS] + ["psnr", "ssim", "psnr_refined"] + (
        ["fallback"] if "fallback" in df.columns else [])
    df = df[cols].rename(columns={f"config/{f}": f for f in FACTORS})
    df = df.iloc[sorted(range(len(df)), key=lambda i: rank(df.iloc[i]), reverse=True)]
    write_text(os.path.join(out, "trials.csv"), df.to_csv(index=False))
    top = df.iloc[0]
    chosen = replace(base, **{f: float(top[f]) for f in FACTORS})
    after = {"psnr": float(top["psnr"]), "ssim": float(top["ssim"])}
    record = {"split": a.split, "slices": len(cache.case_ids), "steps": a.steps, "space": a.space,
              "trials": len(df), "chosen": {f: getattr(chosen, f) for f in FACTORS}, "psnr": after["psnr"],
              "ssim": after["ssim"], "untuned": {f: getattr(untuned, f) for f in FACTORS},
              "safeguard": chosen.safeguard, "untuned_psnr": before["psnr"], "untuned_ssim": before["ssim"],
              "priors_seconds": t_priors,
              "tune_seconds": t_tune}
    if a.space == "grid":  # the surface of a grid: PSNR over (α, β) at the best k and over k at the best (α, β)
        from dudocrop.eval.sweep_plots import plot_fusion_surface

        record["picture"] = plot_fusion_surface(os.path.join(out, "surface.png"), df,
                                                {f: getattr(chosen, f) for f in FACTORS})
    write_json(os.path.join(out, "fusion.json"), record)
    if not a.no_write:
        save_pipeline_meta(a.models, meta["geometry"], replace(stored, osro=chosen), fusion=record)
    print(f"tune_fusion: {len(df)} trials in {t_tune:.1f}s on {len(cache.case_ids)} slices of split {a.split!r} "
          f"(priors {t_priors:.1f}s)", flush=True)
    print(df.head(10).to_string(index=False), flush=True)
    print(f"tune_fusion: k={chosen.k} alpha={chosen.alpha} beta={chosen.beta} safeguard={chosen.safeguard}: PSNR "
          f"{after['psnr']:.2f} dB, SSIM {after['ssim']:.4f} (untuned k={untuned.k} alpha={untuned.alpha} "
          f"beta={untuned.beta}: "
          f"{before['psnr']:.2f} dB, {before['ssim']:.4f})" + ("" if a.no_write else f"; written to {meta_path}"),
          flush=True)
    return {"trials": len(df), "psnr": after["psnr"], "ssim": after["ssim"], "untuned_psnr": before["psnr"],
            **{f: getattr(chosen, f) for f in FACTORS}, "safeguard": chosen.safeguard, "seconds_priors": t_priors,
            "seconds_tune": t_tune, "osro": asdict(chosen)}


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
