"""How many training steps a λ-sweep trial needs before the tiny image IR-SDE's val PSNR says something (issue 23):
train the image IR-SDE in this process (``fit_in_process``'s loop, the sweep trials' settings) once per λ and
validate every ``--interval`` steps exactly as a ``tune_sde`` trial does (val PSNR of the prior sampled with
``val_steps`` steps on ``val_slices`` val slices), next to the two inputs: X_ma (``val_psnr_input``) and, with
``image_mu=nmar``, the μ the sampler starts from (NMAR, ``val_psnr_mu``: the EMA network's zero output at step 0).

    python bench/tune_length.py --data D [--lambdas 15,50,110] [--steps 200] [--interval 25]
        [--recipe bench|small] [--embeddings] [--set FIELD=VALUE ...] [--json]

``--recipe bench`` (default) is bench/tune.py's trial settings; ``--recipe small`` the small preset's image stage.
Prints one row per (λ, step) and, with ``--json``, one object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.tune import TRIAL_SET  # noqa: E402
from dudocrop.config import RUN_PRESETS  # noqa: E402


def _mu_psnr(cols) -> float:
    """PSNR of the image μ (IMAGE_MU_COLUMN, HU) against X_ref the way ``validate`` scores (metal excluded)."""
    import numpy as np
    import torch

    from dudocrop.metrics.image import CT_RANGE_HU, psnr
    from dudocrop.sde.train import IMAGE_MU_COLUMN

    t = {k: torch.from_numpy(np.asarray(cols[k], dtype=np.float64)[:, None])
         for k in (IMAGE_MU_COLUMN, "X_ref", "metal_mask")}
    return float(psnr(t[IMAGE_MU_COLUMN], t["X_ref"], t["metal_mask"] > 0.5, window=CT_RANGE_HU).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--lambdas", default="15,50,110", help="λ·255 values")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--interval", type=int, default=25)
    ap.add_argument("--recipe", choices=("bench", "small"), default="bench",
                    help="bench: bench/tune.py's trial settings; small: the small preset's image_set (NMAR μ, 64² "
                         "sampling windows) validated like small's evaluation (5 sampler steps)")
    ap.add_argument("--set", action="append", default=[], help="more SDETrainConfig overrides")
    ap.add_argument("--embeddings", action="store_true", help="the guided IR-SDE (needs the data's sidecar)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    from dudocrop.sde.train import (
        Normalization,
        build_training,
        domain_columns,
        embedding_width,
        geometry_for_data,
        get_train_config,
        parse_overrides,
        sde_model_from_training,
        train_step,
        validate,
        with_image_mu,
    )
    from dudocrop.train.rows import SliceRows, load_split

    torch.set_num_threads(a.threads)
    base = list(TRIAL_SET) if a.recipe == "bench" else [
        *(x for x in RUN_PRESETS["small"].image_set if not x.startswith("steps=")), "val_slices=4",
        f"val_steps={RUN_PRESETS['small'].eval_steps}"]
    over = parse_overrides(base + a.set)
    geometry = geometry_for_data(a.data)
    norm = Normalization.for_geometry(geometry)
    out = []
    rows = val = None
    for lam in [float(v) for v in a.lambdas.split(",")]:
        cfg = get_train_config("tiny", domain="image", use_embeddings=a.embeddings, lam=lam / 255, steps=a.steps,
                               **over)
        if rows is None:  # the same slices (and NMAR μ, computed once) for every λ
            cols, side = domain_columns("image", a.embeddings, cfg.sinogram_mu, cfg.image_mu)
            rows = with_image_mu(load_split(a.data, "train", cols, side), cfg.image_mu, geometry)
            v = load_split(a.data, "val", cols, side)
            val = with_image_mu(SliceRows({k: x[:cfg.val_slices] for k, x in v.columns.items()},
                                          v.shard_of_row[:cfg.val_slices]), cfg.image_mu, geometry).columns
            mu_psnr = _mu_psnr(val) if cfg.image_mu != "ma" else None
        ctx = embedding_width(rows, "image") if a.embeddings else None
        unet, ema, opt, sde = build_training(cfg, "cpu", ctx)
        t0 = time.process_time()
        for step in range(a.steps + 1):
            if step % a.interval == 0:
                m = validate(sde_model_from_training(unet, ema, cfg, norm), val, n=cfg.val_slices,
                             steps=cfg.val_steps, seed=cfg.seed)
                row = {"lam_255": lam, "step": step, "val_psnr": m["val_psnr"], "val_ssim": m["val_ssim"],
                       "val_psnr_input": m["val_psnr_input"], "cpu_s": round(time.process_time() - t0, 1)}
                if cfg.image_mu != "ma":
                    row["val_psnr_mu"] = mu_psnr
                out.append(row)
                print(json.dumps(row), flush=True)
            if step < a.steps:
                train_step(unet, ema, opt, sde, rows, cfg, norm, step)
    if a.json:
        print(json.dumps({"data": a.data, "set": base + a.set, "embeddings": a.embeddings, "rows": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
