"""Correct whole CT studies as a Ray batch job, without the HTTP endpoint (issue 22): the same slice preparation,
model and derived series as the Serve app's ``/v1/jobs``.

    python ray_jobs/mar_study.py --input study_dir/ --out out/ --models outputs/train_all/models
    python ray_jobs/mar_study.py --input volume.nii.gz --out out/ --models runs:/<run_id>/models
    DUDOCROP_DICOMWEB_PASSWORD=... python ray_jobs/mar_study.py --dicomweb http://pacs:8042/dicom-web \\
        --study 1.2.3 [--series 1.2.3.4] --user mar --store --out out/ --models models:/dudocrop/3
    ray job submit --working-dir . -- python ray_jobs/mar_study.py ...              # unchanged on a cluster

Slices are decoded and bounded by ``dudocrop.service.inputs`` (a DICOM folder must hold one series; a NIfTI
volume is one study), put on the model's grid by ``dudocrop.service.grid``; metal-free slices are passed through
untouched, the slices with metal go through Ray Data (``map_batches`` over a pool of model actors, each holding
one ``DuDoCROP.load(--models)``, a GPU each when the cluster has them). Output: the derived series
(``dudocrop.service.jobs.derived_files``: DICOM in -> one derived DICOM instance per input in ``--out``, NIfTI in
-> ``--out/result.nii.gz``) and ``--out/summary.json``; ``--store`` sends a DICOMweb study's derived series back
with STOW-RS (``dudocrop.service.dicomweb``). PACS credentials come from the environment
(``DUDOCROP_DICOMWEB_PASSWORD`` with ``--user``, or ``DUDOCROP_DICOMWEB_TOKEN``), never from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np

PASSWORD_ENV, TOKEN_ENV = "DUDOCROP_DICOMWEB_PASSWORD", "DUDOCROP_DICOMWEB_TOKEN"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a folder of DICOM files (one series) or a NIfTI volume (.nii / .nii.gz)")
    src.add_argument("--dicomweb", help="a DICOMweb service root, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--study", help="StudyInstanceUID on --dicomweb")
    p.add_argument("--series", help="SeriesInstanceUID on --dicomweb (needed when the study has several)")
    p.add_argument("--user", help=f"basic auth user for --dicomweb (password from ${PASSWORD_ENV}); "
                                  f"${TOKEN_ENV} set instead: bearer auth")
    p.add_argument("--store", action="store_true", help="STOW-RS the derived series back to --dicomweb")
    p.add_argument("--out", required=True, help="folder for the derived series and summary.json")
    p.add_argument("--models", required=True, help="model folder, runs:/<id>/models or models:/<name>/<version>")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--k", type=float, help="Eq. 13 residual weight (default: the model's)")
    p.add_argument("--alpha", type=float, help="Eq. 15 image-prior weight (default: the model's)")
    p.add_argument("--beta", type=float, help="Eq. 15 sinogram-prior weight (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="metal slices per model call")
    p.add_argument("--concurrency", type=int, default=0, help="model actors (0: one per GPU, else 1)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    a = p.parse_args(argv)
    if a.dicomweb and not a.study:
        p.error("--dicomweb needs --study")
    if a.input and (a.study or a.series or a.store or a.user):
        p.error("--study / --series / --user / --store go with --dicomweb, not --input")
    for name in ("k", "alpha", "beta"):
        v = getattr(a, name)
        if v is not None and not 0 <= v <= 1:
            p.error(f"--{name} must lie in [0, 1], got {v}")
    if a.batch_size < 1 or (a.steps is not None and a.steps < 1):
        p.error("--batch-size and --steps must be at least 1")
    return a


def dicomweb_ref(a: argparse.Namespace):
    from dudocrop.service.dicomweb import parse_ref

    auth = None
    if a.user:
        if not os.environ.get(PASSWORD_ENV):
            raise SystemExit(f"--user needs the password in ${PASSWORD_ENV}")
        auth = {"type": "basic", "username": a.user, "password": os.environ[PASSWORD_ENV]}
    elif os.environ.get(TOKEN_ENV):
        auth = {"type": "bearer", "token": os.environ[TOKEN_ENV]}
    return parse_ref({"url": a.dicomweb, "study": a.study, "series": a.series, "auth": auth}, "--dicomweb")


def read_input(path: str) -> list[tuple[str, bytes]]:
    """The files of ``--input`` as an upload would carry them: every file of a folder (sorted), or the one file."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        if not names:
            raise SystemExit(f"--input {path}: empty folder")
        out = []
        for n in names:
            with open(os.path.join(path, n), "rb") as f:
                out.append((n, f.read()))
        return out
    if not os.path.isfile(path):
        raise SystemExit(f"--input {path}: no such file or folder")
    with open(path, "rb") as f:
        return [(os.path.basename(path), f.read())]


class Corrector:
    """A Ray Data actor: one DuDoCROP (``--models``), correcting a batch of model-grid slices (HU)."""

    def __init__(self, models: str, overrides: dict, osro: dict):
        import torch

        from dudocrop.pipeline.model import DuDoCROP

        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        self.model = DuDoCROP.load(models, device=self.device, precision="bf16" if cuda else "fp32",
                                   compile=False, **overrides)
        self.osro = replace(self.model.config.osro, **osro)
        self.ready = time.time()  # wall clock: the driver separates actor start-up from correction

    def __call__(self, batch: dict) -> dict:
        import torch

        x = torch.from_numpy(np.stack(list(batch["model_hu"])).astype(np.float32))[:, None].to(self.device)
        res = self.model(x, osro_config=self.osro)
        return {"index": batch["index"], "hu": list(res.X_o[:, 0].float().cpu().numpy()),
                "ready": np.full(len(batch["index"]), self.ready)}


def model_facts(models: str) -> tuple[str, float, dict]:
    """Geometry name, metal threshold (HU) and the pipeline settings of ``--models`` (its pipeline.json)."""
    from dudocrop.pipeline.model import PIPELINE_FILE, pipeline_config_from_dict, resolve_model_location

    folder = resolve_model_location(models)
    with open(os.path.join(folder, PIPELINE_FILE)) as f:
        meta = json.load(f)
    cfg = pipeline_config_from_dict(meta.get("pipeline", {}))
    return meta["geometry"], cfg.metal_threshold_hu, {"steps": cfg.steps, "k": cfg.osro.k, "alpha": cfg.osro.alpha,
                                                      "beta": cfg.osro.beta}


def run(a: argparse.Namespace, log=print) -> dict:
    import ray
    from tqdm import tqdm

    from dudocrop.ct.geometry import get_geometry
    from dudocrop.data.shards import atomic_write_bytes, resolve
    from dudocrop.pipeline.model import model_version
    from dudocrop.service import dicomweb
    from dudocrop.service.grid import back_to_input_grid, prepare_slice
    from dudocrop.service.inputs import InputError, Limits, decode_study
    from dudocrop.service.jobs import derived_files
    from ray_jobs.common import cluster_gpus, init_ray

    t0 = time.perf_counter()
    limits = Limits()
    ref = dicomweb_ref(a) if a.dicomweb else None
    try:
        files = dicomweb.retrieve(ref, limits) if ref else read_input(a.input)
        study = decode_study(files, limits)
    except InputError as e:
        raise SystemExit(f"{a.input or a.dicomweb}: {e}") from None
    t_in = time.perf_counter() - t0
    geometry_name, threshold, defaults = model_facts(a.models)
    g = get_geometry(geometry_name)
    params = {"steps": a.steps or defaults["steps"], "seed": a.seed,
              **{k: defaults[k] if getattr(a, k) is None else getattr(a, k) for k in ("k", "alpha", "beta")}}
    try:
        for s in study.slices:
            if s.spacing is None:
                raise ValueError(f"{s.name}: no pixel spacing")  # as the service answers (422)
        prepared = [prepare_slice(s.hu, s.spacing, g, threshold, s.name) for s in study.slices]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    metal = [i for i, p in enumerate(prepared) if p.has_metal]
    outs: list = [(p.input_hu, 0) for p in prepared]  # metal-free slices: passed through as they came
    log(f"mar_study: {len(prepared)} slices, {len(metal)} with metal, model {model_version(a.models)} ({g.name})")

    t1, wall1, ready = time.perf_counter(), time.time(), None
    if metal:
        import ray.data

        init_ray(a.address)
        gpus = cluster_gpus()
        concurrency = a.concurrency or max(1, int(gpus))
        overrides = {"seed": a.seed, **({"steps": a.steps} if a.steps else {})}
        osro = {k: getattr(a, k) for k in ("k", "alpha", "beta") if getattr(a, k) is not None}
        ds = ray.data.from_items([{"index": i, "model_hu": prepared[i].model_hu} for i in metal])
        ds = ds.map_batches(Corrector, fn_constructor_kwargs={"models": a.models, "overrides": overrides,
                                                              "osro": osro},
                            batch_size=a.batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                            num_cpus=a.cpus_per_actor,
                            num_gpus=1 if gpus >= 1 else 0)
        with tqdm(total=len(metal), desc="slices with metal", unit="slice", file=sys.stderr) as bar:
            for row in ds.iter_rows():
                i = int(row["index"])
                outs[i] = (back_to_input_grid(row["hu"], prepared[i], g), prepared[i].metal_pixels)
                ready = min(ready or np.inf, float(row["ready"]))
                bar.update(1)
    t_model = time.perf_counter() - t1

    files_out = derived_files(study, outs, model_version(a.models), params)
    fs, root = resolve(a.out)
    fs.create_dir(root, recursive=True)
    for name, blob in files_out:
        atomic_write_bytes(fs, f"{root.rstrip('/')}/{name}", blob)
    summary = {"input": ref.public() if ref else a.input, "out": a.out, "slices": len(prepared),
               "with_metal": len(metal), "fmt": study.fmt, "model_version": model_version(a.models),
               "params": params, "files": [n for n, _ in files_out]}
    if a.store:
        try:
            summary["stored"] = dicomweb.store(ref, [b for _, b in files_out])
        except (InputError, RuntimeError) as e:
            summary["store_error"] = str(e)
    # model: the Ray Data phase, actor start-up (loading DuDoCROP) included
    summary["seconds"] = {"input": round(t_in, 3), "model": round(t_model, 3),
                          "actor_start": round(ready - wall1, 3) if ready else 0.0,
                          "total": round(time.perf_counter() - t0, 3)}
    atomic_write_bytes(fs, f"{root.rstrip('/')}/summary.json", json.dumps(summary, indent=1).encode())
    log(f"mar_study: wrote {len(files_out)} file(s) to {a.out} in {summary['seconds']['total']:.1f} s"
        + (f"; stored {summary['stored']['instances']} instances in series {summary['stored']['series']}"
           if "stored" in summary else "") + (f"; STORE FAILED: {summary['store_error']}"
                                              if "store_error" in summary else ""))
    return summary


def main(argv=None) -> dict:
    summary = run(parse_args(argv))
    if "store_error" in summary:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
