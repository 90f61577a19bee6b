"""The MAR service: an HTTP ingress (FastAPI) in front of a batched model deployment holding one DuDoCROP.

    serve run serve/config.yaml                      # or: python -m serve --model outputs/train_all/models
    curl -s localhost:8000/healthz
    curl -s -X POST --data-binary @slice.dcm -H 'Content-Type: application/dicom' localhost:8000/v1/mar -o out.dcm

Orchestration only: decoding and bounds (``dudocrop.service.inputs``), grid mapping (``dudocrop.service.grid``),
jobs (``dudocrop.service.jobs``) and derived DICOM (``dudocrop.data.dicom_derived``) are library code. Logs carry
job ids, shapes and error types, never names, ids or pixel values from the data.
"""

import asyncio
import copy
import hmac
import json
import logging
import os
from dataclasses import replace

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve import http_io, viewer
from serve.settings import TOKEN_ENV, ServeSettings, settings_from

logger = logging.getLogger("ray.serve")



def steps_table(uri: str) -> dict | None:
    """The model folder's speed/quality table (``ray_jobs/steps_sweep.py``'s ``steps.json``: val PSNR / SSIM and
    seconds per slice per number of reverse steps), so a client can pick ``steps``; None when the folder has none
    or the model comes from an MLflow URI."""
    p = os.path.join(uri, "steps.json")
    if "://" in uri or uri.startswith(("runs:/", "models:/")) or not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            t = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("MARModel: %s is unreadable (%s); /healthz leaves the steps table out", p, e)
        return None
    keep = ("steps", "psnr", "ssim", "seconds_per_slice", "cpu_seconds_per_slice")
    return {"split": t.get("split"), "slices": t.get("slices"), "device": t.get("device"),
            "rows": [{k: r[k] for k in keep if k in r} for r in t.get("rows", [])]}


# ---- the model deployment ------------------------------------------------------------------------------------------
@serve.deployment(name="MARModel", max_ongoing_requests=16, max_queued_requests=64,
                  graceful_shutdown_timeout_s=600, health_check_period_s=10, health_check_timeout_s=60)
class MARModel:
    """One DuDoCROP per replica. Slices from concurrent requests are batched (``@serve.batch``); each batch runs
    in a worker thread so the replica's event loop keeps answering health checks and queueing requests."""

    def __init__(self, settings: dict):
        import torch

        from dudocrop.pipeline.model import DuDoCROP, model_version

        s = ServeSettings(**settings)
        cuda = torch.cuda.is_available() and s.device != "cpu"
        if s.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda but this replica has no GPU (ray_actor_options num_gpus)")
        self.device = "cuda" if cuda else "cpu"
        self.precision = ("bf16" if cuda else "fp32") if s.precision == "auto" else s.precision
        compile_ = cuda if s.compile == "auto" else s.compile == "on"
        overrides = {"precision": self.precision, "compile": compile_}
        if s.steps is not None:
            overrides["steps"] = s.steps
        if not cuda:
            torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
        self.model = DuDoCROP.load(s.model_uri, device=self.device, **overrides)
        self.version = model_version(s.model_uri)
        self.steps_table = steps_table(s.model_uri)
        self.settings = s
        self._batched.set_max_batch_size(s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        if compile_:  # compile and warm every batch size now, before the replica reports healthy
            x = self._warm_slice()
            for b in range(1, s.max_batch_size + 1):
                self.model(torch.from_numpy(np.stack([x] * b))[:, None])
        logger.info("MARModel: %s on %s (%s, steps %s, batch ≤ %d)", self.version, self.device, self.precision,
                    self.model.config.steps, s.max_batch_size)

    def _warm_slice(self) -> np.ndarray:
        """A water disc with a small metal insert on the model grid (warm-up only)."""
        n = self.model.geometry.image_size
        yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
        x = np.where(xx ** 2 + yy ** 2 < (0.35 * n) ** 2, 0.0, -1000.0).astype(np.float32)
        x[(xx - 0.1 * n) ** 2 + yy ** 2 < (0.04 * n + 1) ** 2] = 3000.0
        return x

    def info(self) -> dict:
        g = self.model.geometry
        return {"model_version": self.version, "geometry": g.name, "image_size": g.image_size,
                "pixel_size_mm": g.pixel_size, "device": self.device, "precision": self.precision,
                "steps": self.model.config.steps, "metal_threshold_hu": self.model.config.metal_threshold_hu,
                "osro": {f: getattr(self.model.config.osro, f) for f in ("k", "alpha", "beta", "safeguard", "trust",
                                                                         "completion")},
                "max_batch_size": self.settings.max_batch_size, "steps_table": self.steps_table}

    async def check_health(self) -> None:
        """A tiny forward pass of the image U-Net (one evaluation at 32², or the U-Net's size multiple)."""
        await asyncio.to_thread(self._tiny_forward)

    def _tiny_forward(self) -> None:
        import torch

        m = self.model.models["image"]
        cfg = m.unet.config
        n = max(32, cfg.size_multiple)
        x = torch.full((1, 1, n, n), 0.5, device=self.device)
        emb = torch.zeros(1, cfg.context_dim, device=self.device) if cfg.use_embeddings else None
        with torch.no_grad():
            out = m.unet(x, x, torch.ones(1, device=self.device, dtype=torch.long), content=emb, control=emb)
        if not torch.isfinite(out).all():
            raise RuntimeError("the image U-Net returns non-finite values")

    async def correct(self, hu: np.ndarray, params: dict | None = None) -> dict:
        """One model-grid slice (HU) corrected: {"hu": ...} (+ priors), or {"error": msg} for a slice the
        pipeline refuses (e.g. a metal mask leaving Eq. 11 no body)."""
        key = tuple(sorted((params or {}).items()))
        return await self._batched((np.asarray(hu, np.float32), key))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list) -> list:
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list) -> list:
        out: list = [None] * len(items)
        groups: dict = {}
        for i, (_, key) in enumerate(items):
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            p = dict(key)
            cfg = self.model.config
            osro = replace(cfg.osro, **{k: p[k] for k in ("k", "alpha", "beta") if p.get(k) is not None})
            cfg = replace(cfg, steps=p.get("steps") or cfg.steps, seed=int(p.get("seed") or 0))
            view = copy.copy(self.model)
            view.config = cfg
            self._run_group(view, items, idx, bool(p.get("return_priors")), osro, out)
        return out

    def _run_group(self, view, items: list, idx: list[int], return_priors: bool, osro, out: list) -> None:
        import torch

        x = torch.from_numpy(np.stack([items[i][0] for i in idx]))[:, None]
        try:
            res = view(x, return_priors=return_priors, osro_config=osro, consistency=True)
        except ValueError as e:  # a slice the pipeline refuses: answer it alone, keep the rest of the batch
            if len(idx) > 1:
                for i in idx:
                    self._run_group(view, items, [i], return_priors, osro, out)
                return
            out[idx[0]] = {"error": str(e)}
            return
        xo = res.X_o[:, 0].float().cpu().numpy()
        norm = self.model.norm
        for j, i in enumerate(idx):
            out[i] = {"hu": xo[j]}
            if res.consistency is not None:
                out[i]["consistency"] = float(res.consistency[j])
            if res.priors is not None:
                pr = res.priors
                out[i]["priors"] = {
                    "X_p": norm.image_to_hu(pr.X_p[j:j + 1])[0, 0].float().cpu().numpy(),
                    "X_p_prime": norm.image_to_hu(pr.X_p_prime[j:j + 1])[0, 0].float().cpu().numpy(),
                    "Y_p": pr.Y_p[j, 0].float().cpu().numpy()}


# ---- the HTTP ingress ------------------------------------------------------------------------------------------------
api = FastAPI(title="DuDoCROP metal artifact reduction", version="1",
              description="CT metal artifact reduction (DuDoCROP). Research software: NOT FOR DIAGNOSTIC USE.")


def _auth(request: Request) -> None:
    """Optional bearer-token auth: on when the app was built with a token (``DUDOCROP_SERVE_TOKEN``)."""
    token = getattr(request.app.state, "token", None)
    if not token:
        return
    got = request.headers.get("authorization", "")
    if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode())):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


api.include_router(viewer.pages)  # the browser viewer (issue 22): its page, and job previews behind the same auth
api.include_router(viewer.previews, dependencies=[Depends(_auth)])


@serve.deployment(name="MARIngress", max_ongoing_requests=64, max_queued_requests=256,
                  graceful_shutdown_timeout_s=600)
@serve.ingress(api)
class MARIngress:
    """HTTP API: /healthz, /v1/mar (one slice), /v1/jobs (whole studies; state on the job store)."""

    async def __init__(self, model, settings: dict, token: str | None = None):
        from dudocrop.service.inputs import Limits
        from dudocrop.service.jobs import JobStore

        api.state.token = token
        self.model = model
        self.settings = ServeSettings(**settings)
        self.limits = Limits(max_request_bytes=int(self.settings.max_request_mb * (1 << 20)),
                             max_decoded_bytes=int(self.settings.max_decoded_mb * (1 << 20)))
        self.store = JobStore(self.settings.store)
        api.state.job_store = self.store  # for the viewer's preview routes (serve/viewer.py)
        self._info: dict | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._refs: dict = {}  # job id -> DicomwebRef of a PACS job to store back (credentials in memory only)
        for job_id in self.store.unfinished():  # an ingress restart loses no job: resume from the store
            self._start(job_id)

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    # -- helpers ---------------------------------------------------------------------------------------------------
    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit, whatever Content-Length claims."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _correct(self, model_hu: np.ndarray, params: dict) -> dict:
        from ray.serve.exceptions import BackPressureError

        try:
            res = await self.model.correct.remote(model_hu, params)
        except BackPressureError as e:
            raise HTTPException(503, "the model queue is full: retry later",
                                headers={"Retry-After": str(self.settings.retry_after_s)}) from e
        if "error" in res:
            raise HTTPException(422, res["error"])
        return res

    def _start(self, job_id: str) -> None:
        from dudocrop.ct.geometry import get_geometry
        from dudocrop.service.jobs import run_job

        async def go():
            info = await self.info()
            params = self.store.record(job_id).get("params", {})
            params = {k: params.get(k) for k in ("steps", "k", "alpha", "beta", "seed")}

            async def correct(model_hu):
                res = await self.model.correct.remote(model_hu, params)
                if "error" in res:
                    raise ValueError(res["error"])
                return {"hu": res["hu"], "consistency": res.get("consistency")}

            rec = self.store.record(job_id)
            await run_job(self.store, job_id, correct, get_geometry(info["geometry"]), info["metal_threshold_hu"],
                          concurrency=self.settings.job_concurrency, limits=self.limits,
                          log=lambda m: logger.info(m), publish=self._store_back if rec.get("store") else None)
            self._tasks.pop(job_id, None)
            self._refs.pop(job_id, None)  # a failed or cancelled PACS job drops its credentials too

        self._tasks[job_id] = asyncio.get_running_loop().create_task(go())

    async def _from_pacs(self, body: bytes):
        """A JSON job request naming a DICOMweb study: (reference, store, retrieved files) or a 4xx naming the
        field (``dudocrop.service.dicomweb``)."""
        from dudocrop.service import dicomweb
        from dudocrop.service.inputs import InputError

        try:
            ref, store_back = dicomweb.parse_job_request(body)
            dicomweb.check_allowed(ref, self.settings.dicomweb_allow)
            files = await asyncio.to_thread(dicomweb.retrieve, ref, self.limits)
        except InputError as e:
            raise HTTPException(e.status, str(e)) from e
        return ref, store_back, files

    async def _store_back(self, job_id: str) -> dict:
        """STOW-RS a finished PACS job's derived series to the study it came from: ``{"stored": {...}}``."""
        from dudocrop.service import dicomweb

        ref = self._refs.pop(job_id, None)
        if ref is None:
            src = self.store.record(job_id)["source"]
            if src.get("auth"):
                return {"store_error": "the PACS credentials were held by an ingress that restarted: not stored"}
            ref = dicomweb.DicomwebRef(src["url"], src["study"], src.get("series"))
        files = await asyncio.to_thread(self.store.result_files, job_id)
        stored = await asyncio.to_thread(dicomweb.store, ref, files)
        logger.info("job %s: %d derived instances stored with STOW-RS", job_id, stored["instances"])
        return {"stored": stored}

    # -- routes ----------------------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Model id / version, geometry, device, precision, sampler steps, and the model folder's steps table
        (speed / quality per number of reverse steps, ``steps.json``) when it has one."""
        return {"status": "ok", **(await self.info())}

    @api.post("/v1/mar", dependencies=[Depends(_auth)])
    async def mar(self, request: Request,
                  steps: int | None = Query(None, ge=1, le=1000, description="sampler steps (default: model's)"),
                  k: float | None = Query(None, ge=0, le=1, description="Eq. 13 residual weight"),
                  alpha: float | None = Query(None, ge=0, le=1, description="Eq. 15 image-prior weight"),
                  beta: float | None = Query(None, ge=0, le=1, description="Eq. 15 sinogram-prior weight"),
                  seed: int = Query(0, ge=0, le=2**31 - 1),
                  return_priors: bool = Query(False, description="add the priors (model grid) to an .npz answer"),
                  spacing: str | None = Query(None, description="pixel spacing 'row,col' in mm (for .npy)")):
        """One slice (DICOM, NIfTI, .npy or .npz in HU) corrected, answered in its own format or the one
        ``Accept`` names. Headers: ``X-Model-Version``, ``X-Metal-Pixels``, ``X-Metal-Free`` (true: no metal, the
        input came back without diffusion), ``X-Resampled`` (the slice was mapped to the model's grid),
        ``X-Consistency`` (a slice with metal: X_o's measured-data consistency score, X'_p's is 1; well above 1
        means the raw data contradict the result, ``docs/consistency.md``)."""
        from dudocrop.ct.geometry import get_geometry
        from dudocrop.service.grid import back_to_input_grid, prepare_slice
        from dudocrop.service.inputs import InputError, decode_slice

        sp = None
        if spacing is not None:
            try:
                sp = tuple(float(v) for v in spacing.split(","))
                assert len(sp) == 2
            except (ValueError, AssertionError) as e:
                raise HTTPException(422, f"spacing must be 'row,col' in mm, got {spacing[:40]!r}") from e
        body = await self._body(request)
        info = await self.info()
        geometry = get_geometry(info["geometry"])
        try:
            s = await asyncio.to_thread(decode_slice, body, request.headers.get("content-type"), None, self.limits,
                                        sp)
            if s.spacing is None:
                if s.hu.shape != geometry.image_shape:
                    raise InputError(f"body: a {s.fmt} slice of {s.hu.shape[0]}x{s.hu.shape[1]} pixels carries no "
                                     "pixel spacing: pass ?spacing=ROW,COL (mm) or an .npz with 'spacing'", 422)
                s.spacing = (geometry.pixel_size, geometry.pixel_size)
            prepared = prepare_slice(s.hu, s.spacing, geometry, info["metal_threshold_hu"], "body")
        except InputError as e:
            raise HTTPException(e.status, str(e)) from e
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        fmt = http_io.ACCEPT.get((request.headers.get("accept") or "").split(",")[0].strip().lower(), s.fmt)
        if fmt == "dicom" and s.fmt != "dicom":
            raise HTTPException(406, "a DICOM answer needs a DICOM input (its patient and study modules)")
        if fmt == "nifti" and s.fmt != "nifti":
            fmt = "npz"
        priors = consistency = None
        params = {"steps": steps, "k": k, "alpha": alpha, "beta": beta, "seed": seed, "return_priors": return_priors}
        if prepared.has_metal:
            res = await self._correct(prepared.model_hu, params)
            consistency = res.get("consistency")
            out = back_to_input_grid(res["hu"], prepared, geometry)
            priors = res.get("priors")
        else:
            out = prepared.input_hu
        if return_priors:
            fmt = "npz"
        try:
            data = await asyncio.to_thread(http_io.encode, out, s, fmt, info, params, priors, not prepared.has_metal)
        except Exception as e:  # noqa: BLE001 - an input whose header cannot be written back (odd VRs, bit depths)
            raise HTTPException(422, f"the corrected slice cannot be written as {fmt}: {type(e).__name__}") from e
        headers = {"X-Model-Version": info["model_version"], "X-Metal-Pixels": str(prepared.metal_pixels),
                   "X-Metal-Free": str(not prepared.has_metal).lower(), "X-Resampled": str(prepared.resampled).lower()}
        if consistency is not None:  # issue 25: how far the raw data contradict X_o (X'_p's own score is 1)
            headers["X-Consistency"] = f"{consistency:.3f}"
        return Response(data, media_type=http_io.MEDIA[fmt], headers=headers)

    @api.post("/v1/jobs", status_code=202, dependencies=[Depends(_auth)])
    async def create_job(self, request: Request,
                         steps: int | None = Query(None, ge=1, le=1000),
                         k: float | None = Query(None, ge=0, le=1), alpha: float | None = Query(None, ge=0, le=1),
                         beta: float | None = Query(None, ge=0, le=1), seed: int = Query(0, ge=0, le=2**31 - 1)):
        """A whole study: DICOM files as multipart/form-data, a zip of them, a NIfTI volume (.nii / .nii.gz), or
        a JSON body naming a study on a PACS (``{"dicomweb": {"url", "study", "series", "auth"}, "store": bool}``,
        retrieved with WADO-RS; with ``store`` the derived series goes back with STOW-RS, docs/pacs.md).
        Answers 202 with the job id; poll ``GET /v1/jobs/{id}``."""
        from dudocrop.ct.geometry import get_geometry
        from dudocrop.data.clinical import metal_mask_from_hu
        from dudocrop.service.grid import check_mappable
        from dudocrop.service.inputs import InputError, decode_study

        body = await self._body(request)
        ref, store_back = None, False
        if (request.headers.get("content-type") or "").split(";")[0].strip().lower() == "application/json":
            ref, store_back, files = await self._from_pacs(body)
        else:
            files = await http_io.files(request, body, self.limits)
        info = await self.info()
        try:
            study = await asyncio.to_thread(decode_study, files, self.limits)
        except InputError as e:
            raise HTTPException(e.status, str(e)) from e
        geometry = get_geometry(info["geometry"])
        try:
            for s in study.slices:
                if s.spacing is None:
                    raise InputError(f"{s.name}: no pixel spacing", 422)
                check_mappable(s.hu.shape, s.spacing, geometry, s.name)
        except (InputError, ValueError) as e:
            raise HTTPException(getattr(e, "status", 422), str(e)) from e
        with_metal = sum(bool(metal_mask_from_hu(s.hu, info["metal_threshold_hu"]).any()) for s in study.slices)
        osro = info["osro"]
        params = {"steps": steps or info["steps"], "k": osro["k"] if k is None else k,
                  "alpha": osro["alpha"] if alpha is None else alpha, "beta": osro["beta"] if beta is None else beta,
                  "seed": seed}
        pacs = {"source": ref.public(), "store": store_back} if ref is not None else {}
        job_id = await asyncio.to_thread(self.store.create, study, {
            "with_metal": with_metal, "model_version": info["model_version"], "params": params, **pacs})
        if ref is not None and store_back:
            self._refs[job_id] = ref  # its credentials live in this process only, never in job.json
        logger.info("job %s: %d slices (%d with metal) queued", job_id, len(study.slices), with_metal)
        self._start(job_id)
        return JSONResponse({"id": job_id, "state": "queued", "total": len(study.slices), "with_metal": with_metal,
                             "status_url": f"/v1/jobs/{job_id}"}, status_code=202)

    async def _known_job(self, call, job_id: str):
        """``call(job_id)`` on the job store off the event loop; an unknown job id is a 404 naming it."""
        from dudocrop.service.jobs import UnknownJob

        try:
            return await asyncio.to_thread(call, job_id)
        except UnknownJob as e:
            raise HTTPException(404, str(e)) from e

    @api.get("/v1/jobs/{job_id}", dependencies=[Depends(_auth)])
    async def job_status(self, job_id: str) -> dict:
        """State (queued, running, done, failed, cancelled), slices total / done / with metal, ETA in seconds."""
        st = await self._known_job(self.store.status, job_id)
        if st["state"] in ("queued", "running") and job_id not in self._tasks:
            self._start(job_id)  # its runner died with a previous ingress process
        return st

    @api.get("/v1/jobs/{job_id}/result", dependencies=[Depends(_auth)])
    async def job_result(self, job_id: str):
        """The corrected study: a zip of derived DICOM instances, or a NIfTI volume (.nii.gz)."""
        rec = await self._known_job(self.store.record, job_id)
        if rec["state"] != "done":
            raise HTTPException(409, f"job {job_id} is {rec['state']}: no result yet")
        data = await asyncio.to_thread(self.store.result, job_id)
        name = self.store.result_name(job_id)
        return Response(data, media_type=http_io.MEDIA["zip" if name.endswith(".zip") else "nifti"],
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}"',
                                 "X-Model-Version": rec["model_version"]})

    @api.delete("/v1/jobs/{job_id}", dependencies=[Depends(_auth)])
    async def job_cancel(self, job_id: str) -> dict:
        """Cancel a job (its inputs and finished slices are deleted; a finished job keeps its result)."""
        rec = await self._known_job(self.store.cancel, job_id)
        return {"id": job_id, "state": rec["state"]}


def build_app(args: dict):
    """The application builder that ``serve run serve/config.yaml`` (and ``serve run serve.app:build_app
    model_uri=...``) calls with the config's ``args``: Serve requires exactly one parameter."""
    return app_with(args)


def app_with(args: dict | None = None, model_options: dict | None = None, ingress_options: dict | None = None):
    """The application, with ``Deployment.options`` for code that runs it without a config file
    (``python -m serve``, the tests, the bench): ``model_options`` / ``ingress_options``."""
    s = settings_from(args)
    if not s.model_uri.startswith(("runs:/", "models:/")) and "://" not in s.model_uri:
        s = replace(s, model_uri=os.path.abspath(s.model_uri))
    if "://" not in s.store:
        s = replace(s, store=os.path.abspath(s.store))
    # the token travels as a constructor argument, not in the settings (which /healthz and logs may show)
    model = MARModel.options(**model_options) if model_options else MARModel
    ingress = MARIngress.options(**ingress_options) if ingress_options else MARIngress
    return ingress.bind(model.bind(s.to_dict()), s.to_dict(), os.environ.get(TOKEN_ENV) or None)

