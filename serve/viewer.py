"""The browser viewer (issue 22): ``GET /`` and its static files, and read-only previews of a job's slices.

Two routers, included by ``serve/app.py``: ``pages`` (the page, no auth: it holds no data and asks for the token
itself) and ``previews`` (included with the app's bearer-token dependency). A preview slice is a ``.npy`` of
little-endian int16 HU, shape (2, rows, cols): the input slice and the corrected one on the input grid, in the
order of the result series. The browser windows it on a canvas, so a window change needs no request.

Routes are plain functions (not ingress methods): they reach the job store through ``app.state.job_store``, which
the ingress sets, so a test can mount them on a bare FastAPI app over a store it fills itself.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: the files the page may load, by name: anything else is a 404 (no path reaches the file system from a URL)
STATIC_FILES = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
NPY_MEDIA = "application/x-npy"

pages = APIRouter()
previews = APIRouter()


def _store(request: Request):
    store = getattr(request.app.state, "job_store", None)
    if store is None:
        raise HTTPException(503, "the job store is not open yet")
    return store


@pages.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The viewer page (plain HTML + JavaScript + CSS, nothing fetched from elsewhere)."""
    return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


@pages.get("/viewer/config", include_in_schema=False)
async def page_config(request: Request) -> dict:
    """What the page needs before its first authorised call: whether to ask for a bearer token."""
    return {"auth_required": bool(getattr(request.app.state, "token", None))}


@pages.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(404, f"no static file {name[:60]!r}")
    return FileResponse(os.path.join(STATIC, name), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})


async def _record(store, job_id: str) -> dict:
    from dudocrop.service.jobs import UnknownJob

    try:
        return await asyncio.to_thread(store.record, job_id)
    except UnknownJob as e:
        raise HTTPException(404, str(e)) from e


@previews.get("/v1/jobs/{job_id}/slices")
async def job_slices(job_id: str, request: Request) -> JSONResponse:
    """A job's preview geometry: slice count, rows x cols and pixel spacing of the input grid, slice positions
    (mm along the slice normal, in result order), each slice's maximum HU, and which slices are finished."""
    store = _store(request)
    rec = await _record(store, job_id)
    if rec["state"] == "cancelled":
        raise HTTPException(409, f"job {job_id} is cancelled: its slices are deleted")
    geo = await asyncio.to_thread(_geometry, store, job_id, rec["fmt"])
    done = sorted(await asyncio.to_thread(store.finished_slices, job_id))
    return JSONResponse({"id": job_id, "state": rec["state"], "fmt": rec["fmt"], "total": rec["total"],
                         "finished": done, **geo})


@previews.get("/v1/jobs/{job_id}/slices/{index}")
async def job_slice(job_id: str, index: int, request: Request) -> Response:
    """Slice ``index`` (0-based, result order): ``.npy`` int16 HU of shape (2, rows, cols), the input and the
    corrected slice. 404: unknown job or index; 409: the job is cancelled or the slice is not finished yet.
    Header ``X-Metal-Pixels``: metal pixels the job found in it (0: passed through uncorrected);
    ``X-Consistency``: the corrected slice's measured-data consistency score (X'_p's is 1), when it has one."""
    store = _store(request)
    rec = await _record(store, job_id)
    if not 0 <= index < rec["total"]:
        raise HTTPException(404, f"job {job_id} has {rec['total']} slices: no slice {index}")
    if rec["state"] == "cancelled":
        raise HTTPException(409, f"job {job_id} is cancelled: its slices are deleted")
    if index not in await asyncio.to_thread(store.finished_slices, job_id):
        raise HTTPException(409, f"job {job_id}: slice {index} is not finished yet ({rec['state']})")
    data, metal, score = await asyncio.to_thread(_slice_npy, store, job_id, index, rec["fmt"])
    headers = {"X-Metal-Pixels": str(metal), "Cache-Control": "no-cache"}
    if score is not None:
        headers["X-Consistency"] = f"{score:.3f}"
    return Response(data, media_type=NPY_MEDIA, headers=headers)


def _original(store, job_id: str, index: int, fmt: str) -> np.ndarray:
    if fmt == "nifti":  # a volume is decoded whole: keep the last one (as int16), the page asks slice by slice
        return _nifti_volume(store, job_id)[index]
    return _to_int16(store.input_slice(job_id, index))


@functools.lru_cache(maxsize=1)
def _nifti_volume(store, job_id: str) -> np.ndarray:
    return _to_int16(np.stack([s.hu for s in store.load_study(job_id).slices]))


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -32768, 32767).astype("<i2")


def _slice_npy(store, job_id: str, index: int, fmt: str) -> tuple[bytes, int, float | None]:
    original = _original(store, job_id, index, fmt)
    corrected, metal, score = store.get_slice(job_id, index)
    if corrected.shape != original.shape:  # the job store's invariant: results live on the input grid
        raise HTTPException(500, f"job {job_id}: slice {index} result {corrected.shape} != input {original.shape}")
    buf = io.BytesIO()
    np.save(buf, np.stack([original, _to_int16(corrected)]))
    return buf.getvalue(), metal, score


@functools.lru_cache(maxsize=8)
def _geometry(store, job_id: str, fmt: str) -> dict:
    """Rows, cols, pixel spacing (mm), slice positions (mm along the slice normal) of the input grid (a job's
    slices share shape and spacing: ``decode_study`` refuses mixed ones) and each input slice's maximum HU (the
    page marks slices at or above the model's metal threshold). Inputs never change: cached."""
    from dudocrop.data.clinical import _position_along_normal

    study = store.load_study(job_id)
    s0 = study.slices[0]
    if fmt == "nifti":
        import nibabel as nib

        dz = float(nib.as_closest_canonical(study.nifti).header.get_zooms()[2])
        pos = [round(i * dz, 4) for i in range(len(study.slices))]
    else:
        pos = [round(float(_position_along_normal(s.dataset)), 4) for s in study.slices]
    return {"rows": int(s0.hu.shape[0]), "cols": int(s0.hu.shape[1]),
            "spacing_mm": [float(v) for v in s0.spacing], "positions_mm": pos,
            "max_hu": [round(float(s.hu.max()), 1) for s in study.slices]}
