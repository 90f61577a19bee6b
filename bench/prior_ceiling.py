"""How much can a U-Net preset learn beyond NMAR in a step budget? A probe for sizing a training preset.

The image IR-SDE with ``parametrization = "x0"`` starts at its μ and must learn F_0 − μ. This bench removes the
diffusion altogether and trains the same U-Net, with the same crops, batches, optimiser and cosine schedule as
``train_sde`` (peak LR 3e-4: the tiny SDE preset's 2e-3 diverged here), by plain supervised regression:
F̂_0 = μ + U(μ, μ, t = 1), loss ‖F̂_0 − F_0‖². It asks the question without the diffusion noise on the input
(a probe, not a bound: hyperparameters differ). On small's data, 800 steps, 10 val slices: regression from the
NMAR image −0.32 dB against NMAR, the image IR-SDE trained from the same μ −0.62 dB (5 sampler steps). The
baseline is NMAR on the same slices, in the same run.

    python bench/prior_ceiling.py --data outputs/small/data --json            # tiny U-Net, 800 steps, μ = NMAR
    python bench/prior_ceiling.py --data D --unet paper --steps 20000 --device cuda

``--mu nmar``: μ is the NMAR image before the metal is put back (metal pixels would otherwise be ~94 % of the
loss: on small's train crops the mean squared error of μ was 2.6e-3 with the metal, 1.6e-4 without, 8 batches).
``--mu ma``: μ is X_ma, the paper's input. The last row per split is the best mix a·regression + (1 − a)·NMAR
(a in steps of 0.1, chosen on that split): what fusing the learned image with NMAR could add at most. The oracle
row is the headroom: NMAR's normalised interpolation with the reference image as its prior (55.3 dB on small's
val slices against NMAR's 42.1), so NMAR's error is the prior's, which a better image prior could remove.
PSNR / SSIM as in the evaluation report (dudocrop.metrics.image: outside the metal, inside the reference's body,
metal reinserted from X_ma).

Input contrast. [0, 1] spans −1000..+3072 HU (dudocrop.data.normalize), so NMAR's streaks of a few tens of HU are
~0.01 units on a ~0.25 water level, and the tiny U-Net hardly sees them: from the NMAR image (metal mask in the
x_t slot, loss on the body outside the metal, peak LR 1e-3, 600 steps) its training loss ended 0.8 % under μ's.
``--input-scale 20`` (UNetConfig.in_scale: water at 0, 1 unit ≈ 200 HU) made it 12 % at 600 steps and 28 % at
1500. Scored on whole 128² slices that is still −0.94 / +0.23 dB against NMAR (val), but in Hann-blended 64²
windows like its training crops (``--tile 64``) −0.30 / +0.53 dB: the first learned margin over NMAR here. These
settings are the small preset's image IR-SDE (``image_mu=nmar``, ``input_scale``, ``loss_region=body``,
``sample_tile``):

    python bench/prior_ceiling.py --input-scale 20 --metal-channel --loss-region body --lr 1e-3 --steps 1500 \
        --tile 64
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from dudocrop.classic.li import reinsert_metal
from dudocrop.classic.nmar import nmar, normalized_interpolation
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.units import MU_WATER, hu_to_mu, mu_to_hu
from dudocrop.data.loader import CropSpec
from dudocrop.data.normalize import Normalization
from dudocrop.metrics.image import body_mask, image_metrics
from dudocrop.sde.train import (
    build_training,
    domain_columns,
    embedding_width,
    geometry_for_data,
    get_train_config,
    make_batch,
)
from dudocrop.train.rows import SliceRows, batch_indices, load_split
from dudocrop.train.state import cosine_lr, step_rng

NEEDED = ["X_ma", "X_ref", "metal_mask", "Y_ma", "metal_trace"]


def nmar_images(cols, op: FanBeamOperator, batch: int = 16) -> np.ndarray:
    """NMAR of every row in HU (N, H, W), with NMAR's own values in the metal pixels (no X_ma: no reinsertion)."""
    out = []
    for i in range(0, len(cols["X_ma"]), batch):
        t = {k: torch.as_tensor(np.array(cols[k][i:i + batch], dtype=np.float32))[:, None] for k in NEEDED}
        out.append(nmar(t["Y_ma"], t["metal_mask"] > 0.5, None, op, trace=t["metal_trace"] > 0.5)[:, 0].numpy())
    return np.concatenate(out)


def oracle_prior_nmar(t: dict, op: FanBeamOperator) -> torch.Tensor:
    """NMAR's completion with the reference image as its prior (metal pixels water, as NMAR's own prior has them):
    the most a perfect image prior could give through NMAR's normalised interpolation. Not a method."""
    metal = t["metal_mask"] > 0.5
    prior = torch.where(metal, torch.full_like(t["X_ref"], MU_WATER), hu_to_mu(t["X_ref"]).clamp(min=0))
    return mu_to_hu(op.fbp(normalized_interpolation(t["Y_ma"], t["metal_trace"] > 0.5, prior, op)))


def score(x_hu: torch.Tensor, t: dict) -> tuple[float, float]:
    x = reinsert_metal(x_hu, t["metal_mask"] > 0, t["X_ma"])
    m = image_metrics(x, t["X_ref"], t["metal_mask"], body_mask(t["X_ref"]))
    return float(m["psnr"].mean()), float(m["ssim"].mean())


def tiled(f, inputs: tuple[torch.Tensor, ...], tile: int | None) -> torch.Tensor:
    """f(*inputs) over overlapping ``tile``² windows (stride tile / 2), blended with a Hann window: the network
    sees what it saw in training (crops), not a whole slice. ``tile=None``: f on the whole images."""
    x = inputs[0]
    h, w = x.shape[-2:]
    if tile is None or tile >= max(h, w):
        return f(*inputs)
    win = torch.hann_window(tile + 2, periodic=False, device=x.device)[1:-1]
    win = win[:, None] * win[None] + 1e-3  # > 0 at the border, where only one window covers a pixel
    acc, wsum = torch.zeros_like(x), torch.zeros_like(x)
    starts = lambda n: [*range(0, n - tile, tile // 2), n - tile]  # noqa: E731
    for r in starts(h):
        for c in starts(w):
            sl = (slice(r, r + tile), slice(c, c + tile))
            acc[..., sl[0], sl[1]] += f(*(v[..., sl[0], sl[1]] for v in inputs)) * win
            wsum[..., sl[0], sl[1]] += win
    return acc / wsum


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="outputs/small/data", help="a prepared data folder with DuDoCLIP embeddings")
    ap.add_argument("--unet", default="tiny")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-4, help="peak LR (the tiny SDE preset's 2e-3 diverges here)")
    ap.add_argument("--mu", choices=("nmar", "ma"), default="nmar")
    ap.add_argument("--slices", type=int, default=10, help="slices scored per split")
    ap.add_argument("--input-scale", type=float, default=None,
                    help="SDETrainConfig.input_scale: the U-Net sees μ as (μ − water)·K and its correction is "
                         "divided by K (default: [0, 1] as is)")
    ap.add_argument("--metal-channel", action="store_true",
                    help="the metal mask (×0.5) in the x_t slot, which regression leaves empty")
    ap.add_argument("--loss-region", choices=("all", "body"), default="all",
                    help="body: the loss only inside the reference's body, outside the metal (the PSNR's region)")
    ap.add_argument("--tile", type=int, default=None, help="score in Hann-blended windows of this size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    cfg = get_train_config("tiny", domain="image", unet=a.unet, steps=a.steps, lr=a.lr, parametrization="x0",
                           input_scale=a.input_scale or 1.0)
    scale = cfg.input_scale
    geometry = geometry_for_data(a.data)
    norm, op = Normalization.for_geometry(geometry), FanBeamOperator(geometry)
    cols, side = domain_columns("image", True)
    rows = load_split(a.data, "train", sorted(set(cols) | set(NEEDED)), side)
    measured_x_ma = rows.columns["X_ma"]
    if a.mu == "nmar":  # make_batch reads μ from X_ma
        rows = SliceRows({**rows.columns, "X_ma": nmar_images(rows.columns, op)}, rows.shard_of_row)
    ctx = embedding_width(rows, "image")
    unet, ema, opt, _ = build_training(cfg, a.device, ctx)

    def correction(mu, mask, t, **emb):
        """F̂_0 − μ; the metal mask rides in the x_t slot (the U-Net sees x_t − μ) with --metal-channel, at 0.5 in
        μ's standardised units (the measurements above)."""
        return unet(mu + 0.5 * scale * mask if a.metal_channel else mu, mu, t, **emb)
    t0, losses, mu_losses = time.perf_counter(), [], []
    for step in tqdm(range(cfg.steps), desc="regression", disable=a.json):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup, final=cfg.final_lr)
        b = make_batch(rows.take(batch_indices(len(rows), cfg.batch_size, step, cfg.seed, 0, 1)), "image", norm,
                       CropSpec(cfg.patch, cfg.patch), step_rng(cfg.seed, step, 0), True, ctx)
        b = {k: v.to(a.device) for k, v in b.items()}
        t1 = torch.ones(b["mu"].shape[0], device=a.device)
        w = torch.ones_like(b["mu"])
        if a.loss_region == "body":
            w = (1 - b["mask"]) * body_mask(norm.image_to_hu(b["x0"])).float()
        err2 = (b["mu"] + correction(b["mu"], b["mask"], t1, content=b["content"], control=b["control"])
                - b["x0"]) ** 2
        loss = (w * err2).sum() / w.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(unet)
        losses.append(loss.item())
        mu_losses.append(float((w * (b["mu"] - b["x0"]) ** 2).sum() / w.sum().clamp(min=1)))
    train_s = time.perf_counter() - t0
    unet.load_state_dict(ema.shadow)
    unet.eval()

    table = []
    for split in ("train", "val"):
        c = (load_split(a.data, split, NEEDED, side).columns if split == "val"
             else {**rows.columns, "X_ma": measured_x_ma})
        n = min(a.slices, len(c["X_ma"]))
        c = {k: v[:n] for k, v in c.items()}
        t = {k: torch.as_tensor(np.array(c[k], dtype=np.float32))[:, None].to(a.device) for k in NEEDED}
        x_nmar = torch.as_tensor(nmar_images(c, op))[:, None].to(a.device)
        mu = norm.image(x_nmar if a.mu == "nmar" else t["X_ma"])
        emb = {k: torch.as_tensor(np.array(c[f"e_image_{k}"], dtype=np.float32)).reshape(n, -1).to(a.device)
               for k in ("content", "control")}
        mask = (t["metal_mask"] > 0.5).float()
        with torch.no_grad():
            out = tiled(functools.partial(correction, t=1.0, **emb), (mu, mask), a.tile)
            x_reg = norm.image_to_hu((mu + out).clamp(0, 1))
        base = score(x_nmar, t)
        # the most Eq. 15-style fusion with NMAR could give: the best a of a·regression + (1 − a)·NMAR
        a_best = max(np.linspace(0, 1, 11), key=lambda w: score(w * x_reg + (1 - w) * x_nmar, t)[0])
        shown = [("NMAR", x_nmar)] + ([("X_ma", t["X_ma"])] if a.mu == "ma" else []) + [("regression", x_reg)] + [
            (f"{a_best:.1f}·regression + {1 - a_best:.1f}·NMAR", a_best * x_reg + (1 - a_best) * x_nmar),
            ("oracle: NMAR with X_ref as its prior", oracle_prior_nmar(t, op))]
        for method, x in shown:
            p, s = score(x, t)
            table.append({"split": split, "method": method, "slices": n, "psnr": round(p, 3), "ssim": round(s, 4),
                          "psnr_vs_nmar": round(p - base[0], 3)})
    out = {"data": a.data, "unet": a.unet, "mu": a.mu, "steps": a.steps, "lr": a.lr, "device": a.device,
           "input_scale": a.input_scale, "metal_channel": a.metal_channel, "loss_region": a.loss_region,
           "tile": a.tile,
           "train_seconds": round(train_s, 1), "baseline": "NMAR on the same slices",
           "last100_loss": float(np.mean(losses[-100:])), "last100_loss_of_mu": float(np.mean(mu_losses[-100:])),
           "table": table}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.unet} U-Net, μ = {a.mu}, {a.steps} steps in {train_s:.0f} s on {a.device}; training loss of the "
              f"last 100 steps {out['last100_loss']:.3g} (μ itself {out['last100_loss_of_mu']:.3g})")
        print("| split | method | slices | PSNR (dB) | SSIM | PSNR − NMAR |\n|---|---|--:|--:|--:|--:|")
        for r in table:
            print(f"| {r['split']} | {r['method']} | {r['slices']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                  f"{r['psnr_vs_nmar']:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
