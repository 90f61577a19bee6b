"""IR-SDE / conditional U-Net benchmark: parameters and FLOPs per network evaluation, seconds per training step,
seconds to restore one 512² image and one 1000x900 sinogram with 100 steps and with the fewest steps (1), and the
held-out PSNR of tiny models trained with and without DuDoCLIP guidance (issue 6).

    python bench/sde.py --json            # CPU: tiny timings, FLOPs of tiny and paper, guidance A/B (≈10-20 min)
    python bench/sde.py --json --quick    # smaller timing inputs and a short A/B, for a smoke run
    python bench/sde.py --json --data D   # the A/B on prepared shards D with their stage-1 embeddings sidecar

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (no compute; a multiply-add is
2 FLOPs). On CPU only the ``tiny`` preset is timed; ``paper`` is timed when CUDA is available (training at the paper's
batch 16 x 256², REFERENCE §1). Sampling time is linear in the number of network evaluations, so 100-step times on
CPU are extrapolated from runs with 1 and ``--measure-steps`` steps and say so (``"extrapolated": true``).

Guidance A/B (``"guidance"``): the tiny image-domain IR-SDE trained in-process (dudocrop.sde.train.fit_in_process,
the loop the Ray job runs per worker) for ``--guidance-steps`` steps with and without embeddings, same seed, data
and steps; held-out PSNR/SSIM (val split, full size, the preset's ``val_steps`` = 10 sampler steps, so validation
stays a few seconds) next to the uncorrected input's.
Without ``--data`` it builds tiny synthetic shards and takes the embeddings from an UNTRAINED tiny DuDoCLIP (random
weights): the output says so, and such a comparison measures the plumbing, not the value of stage 1.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dudocrop.sde import IRSDE, build_unet, count_parameters
from dudocrop.sde.unet import tflop_per_eval

EMB = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_eval(preset: str, shapes: list[tuple[int, int]]) -> dict:
    with torch.device("meta"):
        net = build_unet(preset)
    out = {"params": count_parameters(net), "tflop_per_eval": {}}
    for h, w in shapes:
        out["tflop_per_eval"][f"{h}x{w}"] = round(tflop_per_eval(net, (h, w), "meta"), 4)
    return out


def train_step_seconds(preset: str, batch: int, size: int, device: torch.device, repeat: int) -> dict:
    torch.manual_seed(0)
    net = build_unet(preset).to(device)
    sde = IRSDE()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.9, 0.99))
    x0 = torch.rand(batch, 1, size, size, device=device)
    mu = x0 + 0.1 * torch.randn_like(x0)
    c = torch.randn(batch, EMB, device=device)

    def step():
        loss = sde.training_loss(net, x0, mu, content=c, control=c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        step()
    _sync(device)
    return {"preset": preset, "device": device.type, "batch": batch, "size": size,
            "seconds_per_step": round((time.perf_counter() - t0) / repeat, 4)}


def sampling_seconds(preset: str, shape: tuple[int, int], device: torch.device, measure_steps: int | None,
                     tiled: bool = False) -> list[dict]:
    """Rows for 1 step (the fewest supported) and 100 steps; 100 is measured when ``measure_steps`` is None."""
    torch.manual_seed(0)
    net = build_unet(preset).to(device).eval()
    sde = IRSDE()
    mu = torch.rand(1, 1, *shape, device=device)
    c = torch.randn(1, EMB, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    run = sde.sample_tiled if tiled else sde.sample
    kw = {"tile": 256, "overlap": 32} if tiled else {}

    def timed(steps: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        run(net, mu, c, c, steps=steps, generator=gen, **kw)
        _sync(device)
        return time.perf_counter() - t0

    timed(1)  # warm-up
    t1 = timed(1)
    base = {"preset": preset, "device": device.type, "input": f"{shape[0]}x{shape[1]}",
            "tiled": "256/32" if tiled else None}
    rows = [{**base, "steps": 1, "seconds": round(t1, 3), "extrapolated": False}]
    if measure_steps is None:
        rows.append({**base, "steps": 100, "seconds": round(timed(100), 3), "extrapolated": False})
    else:
        tk = timed(measure_steps)
        per_step = (tk - t1) / (measure_steps - 1)
        rows.append({**base, "steps": 100, "seconds": round(t1 + 99 * per_step, 3), "extrapolated": True,
                     "measured_steps": [1, measure_steps], "seconds_per_step": round(per_step, 4)})
    return rows


def _synthetic_data(out: str, n_train: int, n_val: int) -> str:
    """Tiny synthetic shards (train + val) with an embeddings sidecar from an untrained tiny DuDoCLIP."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dudocrop.clip import DuDoCLIP
    from dudocrop.ct.geometry import get_geometry
    from dudocrop.data.build import ShardSpec, SourceOptions, build_shard, list_case_refs
    from dudocrop.data.shards import write_manifest
    from dudocrop.data.sidecar import write_sidecar

    opts = SourceOptions(source="synthetic", geometry="tiny", n_patients=(n_train + n_val + 1) // 2,
                         slices_per_patient=2)
    refs = list_case_refs(opts)
    infos = [build_shard(ShardSpec("train-00000.parquet", "train", tuple(refs[:n_train])), opts, out),
             build_shard(ShardSpec("val-00000.parquet", "val", tuple(refs[n_train:n_train + n_val])), opts, out)]
    write_manifest(out, infos, get_geometry("tiny").to_dict(), {"bench": "sde guidance"})
    torch.manual_seed(0)
    clip = DuDoCLIP.from_config("tiny").eval()
    for info in infos:
        t = pq.read_table(os.path.join(out, info.name), columns=["case_id", "checksum", "X_ma", "Y_ma"])
        cols = {"case_id": t["case_id"], "checksum": t["checksum"]}
        for domain, col in (("image", "X_ma"), ("sinogram", "Y_ma")):
            x = torch.from_numpy(t[col].combine_chunks().to_numpy_ndarray().astype(np.float32))[:, None]
            with torch.no_grad():
                e = clip.encode_ct(clip.preprocess(x, domain, geometry="tiny"), domain)
            cols[f"e_{domain}_content"] = pa.array(list(e.content.numpy()), type=pa.list_(pa.float32()))
            cols[f"e_{domain}_control"] = pa.array(list(e.control.numpy()), type=pa.list_(pa.float32()))
        write_sidecar(out, "embeddings", info.name, pa.table(cols))
    return out


def guidance_ab(data: str | None, steps: int, val_slices: int, source: str) -> dict:
    """Held-out PSNR of the tiny image-domain model trained with and without embeddings (same everything else)."""
    import tempfile

    from dudocrop.sde.train import (
        domain_columns,
        fit_in_process,
        get_train_config,
        normalization_for_data,
        sde_model_from_training,
        validate,
    )
    from dudocrop.train import load_split

    with tempfile.TemporaryDirectory(prefix="dudocrop-bench-sde-") as tmp:
        t0 = time.perf_counter()
        if data is None:
            data = _synthetic_data(tmp, 24, val_slices)
        built = round(time.perf_counter() - t0, 1)
        norm = normalization_for_data(data)
        what = (f"tiny synthetic shards (24 train / {val_slices} val slices), built in {built}s"
                if source.startswith("UNTRAINED") else data)
        out = {"embeddings": source, "data": what, "train_steps": steps,
               "preset": "tiny", "domain": "image", "runs": {}}
        for guided in (True, False):
            cfg = get_train_config("tiny", steps=steps, use_embeddings=guided)
            cols, side = domain_columns("image", guided)
            rows, val = load_split(data, "train", cols, side), load_split(data, "val", cols, side)
            t1 = time.perf_counter()
            unet, ema, losses = fit_in_process(cfg, rows, norm)
            train_s = time.perf_counter() - t1
            model = sde_model_from_training(unet, ema, cfg, norm)
            row = {"train_seconds": round(train_s, 1), "loss_first_20": round(sum(losses[:20]) / 20, 5),
                   "loss_last_20": round(sum(losses[-20:]) / 20, 5)}
            for k in (cfg.val_steps,):
                r = validate(model, val, n=val_slices, steps=k, seed=0)
                row[f"steps_{k}"] = {key[4:]: round(v, 4) for key, v in r.items()}
            out["runs"]["with_dudoclip" if guided else "without_dudoclip"] = row
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="smaller timing inputs (smoke run)")
    ap.add_argument("--measure-steps", type=int, default=3, help="CPU: steps actually run to extrapolate 100")
    ap.add_argument("--data", default=None, help="guidance A/B on these shards (with an embeddings sidecar)")
    ap.add_argument("--guidance-steps", type=int, default=None, help="training steps per A/B model (default 300)")
    ap.add_argument("--skip-guidance", action="store_true", help="leave the trained-model A/B out")
    args = ap.parse_args(argv)
    if args.measure_steps < 2:
        ap.error("--measure-steps must be >= 2")
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    cpu = torch.device("cpu")
    image, sino = ((128, 128), (250, 225)) if args.quick else ((512, 512), (1000, 900))

    out: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if cuda else None},
        "models": {p: flops_per_eval(p, [(256, 256), (512, 512), (1000, 900)]) for p in ("tiny", "paper")},
        "train_step": [train_step_seconds("tiny", 2 if args.quick else 4, 64 if args.quick else 256, cpu, 2)],
        "sampling": [],
    }
    for shape, tiled in ((image, False), (sino, False), (sino, True)):
        out["sampling"] += sampling_seconds("tiny", shape, cpu, args.measure_steps, tiled)
    if cuda:
        gpu = torch.device("cuda")
        out["train_step"].append(train_step_seconds("paper", 16, 256, gpu, 10))  # REFERENCE §1: batch 16, 256²
        for preset in ("tiny", "paper"):
            for shape, tiled in ((image, False), (sino, False), (sino, True)):
                out["sampling"] += sampling_seconds(preset, shape, gpu, None, tiled)
    else:
        out["train_step"].append({"preset": "paper", "batch": 16, "size": 256, "seconds_per_step": None,
                                  "note": "no GPU: paper-preset training step not timed"})
    if not args.skip_guidance:
        source = ("from the data's embeddings sidecar" if args.data else
                  "UNTRAINED tiny DuDoCLIP (random weights; stage 1 not available): not the paper's guidance")
        steps = args.guidance_steps or (40 if args.quick else 300)
        out["guidance"] = guidance_ab(args.data, steps, 4, source)
    out["bench_seconds"] = round(time.perf_counter() - t_start, 1)

    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key in ("machine", "models"):
            print(key, out[key])
        for row in out["train_step"] + out["sampling"]:
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
