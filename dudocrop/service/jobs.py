"""Whole-study jobs: a job store on any pyarrow file system and the slice queue that works through it.

Layout under the store's root (a local folder by default, ``s3://…`` / ``gs://…`` on a cluster)::

    jobs/<id>/job.json             state, counts, settings (written atomically at each state change)
    jobs/<id>/input/<i>.dcm        the uploaded instances (or input/volume.nii.gz)
    jobs/<id>/slices/<i>.npz       one finished slice: corrected HU (input grid) and whether metal was found
    jobs/<id>/result.zip | .nii.gz the corrected study, written once every slice is finished

Progress is the set of finished slice files, so a process that dies (a model replica, the HTTP ingress) loses
nothing finished: :func:`run_job` run again skips the slices already there and re-queues the rest. Metal-free
slices are finished at once without the model (issue 21: only slices with metal go to the GPU). No Ray here:
``correct`` is any coroutine that maps a model-grid slice (HU) to its corrected image.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable

import numpy as np
import pyarrow.fs as pafs

from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.data.shards import atomic_write_bytes, resolve
from dudocrop.service.grid import back_to_input_grid, prepare_slice
from dudocrop.service.inputs import Limits, Study, decode_study, nifti_bytes, nifti_like, quiet_pydicom

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


class UnknownJob(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


def _valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


class JobStore:
    """Jobs on ``uri`` (a folder or a pyarrow file-system URI)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = resolve(uri)
        self.fs.create_dir(self._p("jobs"), recursive=True)

    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path, compression=None) as f:  # bytes as stored (no .gz auto-inflate)
            return f.read()

    # -- records ---------------------------------------------------------------------------------------------------
    def create(self, study: Study, info: dict) -> str:
        """A new queued job holding the study's input files as uploaded (DICOM) or its volume (NIfTI); ``info``
        (settings, model version, metal count) is kept in job.json. Returns the job id."""
        job_id = uuid.uuid4().hex
        if study.fmt == "nifti":
            atomic_write_bytes(self.fs, self._p("jobs", job_id, "input", "volume.nii.gz"), nifti_bytes(study.nifti))
        else:
            self.fs.create_dir(self._p("jobs", job_id, "input"), recursive=True)
            for i, s in enumerate(study.slices):
                atomic_write_bytes(self.fs, self._p("jobs", job_id, "input", f"{i:05d}.dcm"), s.raw)
        self.fs.create_dir(self._p("jobs", job_id, "slices"), recursive=True)
        rec = {"id": job_id, "state": "queued", "fmt": study.fmt, "total": len(study.slices), "created": time.time(),
               "updated": time.time(), **info}
        self._write_record(job_id, rec)
        return job_id

    def _write_record(self, job_id: str, rec: dict) -> None:
        atomic_write_bytes(self.fs, self._p("jobs", job_id, "job.json"), json.dumps(rec, indent=1).encode())

    def record(self, job_id: str) -> dict:
        if not _valid_id(job_id) or not self._exists(self._p("jobs", job_id, "job.json")):
            raise UnknownJob(job_id)
        return json.loads(self._read(self._p("jobs", job_id, "job.json")))

    def update(self, job_id: str, **changes) -> dict:
        rec = self.record(job_id)
        if rec["state"] in FINAL_STATES and changes.get("state") not in (None, rec["state"]):
            return rec  # a cancelled / finished job stays so
        rec.update(changes, updated=time.time())
        self._write_record(job_id, rec)
        return rec

    def finished_slices(self, job_id: str) -> set[int]:
        sel = pafs.FileSelector(self._p("jobs", job_id, "slices"), allow_not_found=True)
        return {int(i.base_name[:-4]) for i in self.fs.get_file_info(sel)
                if i.base_name.endswith(".npz") and i.base_name[:-4].isdigit()}

    def status(self, job_id: str) -> dict:
        """State, slices total / done / with metal, seconds so far and an ETA from the metal slices' pace."""
        rec = self.record(job_id)
        done = len(self.finished_slices(job_id)) if rec["state"] != "cancelled" else rec.get("done", 0)
        out = {k: rec.get(k) for k in ("id", "state", "fmt", "total", "with_metal", "model_version", "error")}
        out.update({k: rec[k] for k in ("source", "store", "stored", "store_error") if k in rec})  # PACS jobs
        out["done"] = done
        started = rec.get("started")
        elapsed = (rec.get("finished") or time.time()) - started if started else 0.0
        out["elapsed_s"] = round(elapsed, 3)
        remaining = rec["total"] - done
        if rec["state"] in FINAL_STATES:
            out["eta_s"] = 0.0
        elif done and started:
            out["eta_s"] = round(elapsed / done * remaining, 1)
        else:
            out["eta_s"] = None
        return out

    def unfinished(self) -> list[str]:
        """Ids of jobs that are queued or running (to resume after a restart)."""
        sel = pafs.FileSelector(self._p("jobs"), allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.Directory and _valid_id(info.base_name):
                try:
                    if self.record(info.base_name)["state"] in ("queued", "running"):
                        out.append(info.base_name)
                except (UnknownJob, ValueError):
                    continue
        return out

    def cancel(self, job_id: str) -> dict:
        """Mark cancelled (a running :func:`run_job` stops before its next slice) and drop inputs and slices."""
        rec = self.record(job_id)
        if rec["state"] in FINAL_STATES:
            return rec
        done = len(self.finished_slices(job_id))
        rec = self.update(job_id, state="cancelled", done=done, finished=time.time())
        for sub in ("input", "slices"):
            try:
                self.fs.delete_dir(self._p("jobs", job_id, sub))
            except (FileNotFoundError, OSError):
                pass
        return rec

    # -- slices ----------------------------------------------------------------------------------------------------
    def load_study(self, job_id: str, limits: Limits | None = None) -> Study:
        limits = limits or Limits()
        rec = self.record(job_id)
        base = self._p("jobs", job_id, "input")
        if rec["fmt"] == "nifti":
            return decode_study([("volume.nii.gz", self._read(base + "/volume.nii.gz"))], limits)
        sel = pafs.FileSelector(base)
        names = sorted(i.base_name for i in self.fs.get_file_info(sel) if i.base_name.endswith(".dcm"))
        study = decode_study([(n, self._read(f"{base}/{n}")) for n in names], limits)
        return study

    def input_slice(self, job_id: str, index: int, limits: Limits | None = None) -> np.ndarray:
        """The input HU of slice ``index`` in the job's (and the result's) order, on the input grid: one stored
        DICOM instance decoded, or the stored NIfTI volume decoded whole. IndexError past the last slice;
        FileNotFoundError once a cancelled job's inputs are gone."""
        from dudocrop.service.inputs import decode_slice

        rec = self.record(job_id)
        if not 0 <= index < rec["total"]:
            raise IndexError(f"job {job_id} has {rec['total']} slices: no slice {index}")
        if rec["fmt"] == "nifti":
            return self.load_study(job_id, limits).slices[index].hu
        name = f"{index:05d}.dcm"
        return decode_slice(self._read(self._p("jobs", job_id, "input", name)), "application/dicom", name,
                            limits or Limits()).hu

    def put_slice(self, job_id: str, index: int, hu: np.ndarray, metal_pixels: int,
                  consistency: float | None = None) -> None:
        """A finished slice; ``consistency``: the model's measured-data consistency score of it (None: no metal)."""
        buf = io.BytesIO()
        np.savez(buf, hu=np.asarray(hu, np.float32), metal_pixels=np.int64(metal_pixels),
                 consistency=np.float64(np.nan if consistency is None else consistency))
        atomic_write_bytes(self.fs, self._p("jobs", job_id, "slices", f"{index:05d}.npz"), buf.getvalue())

    def get_slice(self, job_id: str, index: int) -> tuple[np.ndarray, int, float | None]:
        """(corrected HU, metal pixels, consistency score or None)."""
        with np.load(io.BytesIO(self._read(self._p("jobs", job_id, "slices", f"{index:05d}.npz")))) as z:
            score = float(z["consistency"]) if "consistency" in z.files else float("nan")
            return z["hu"], int(z["metal_pixels"]), None if np.isnan(score) else score

    def result_name(self, job_id: str) -> str:
        return "result.nii.gz" if self.record(job_id)["fmt"] == "nifti" else "result.zip"

    def result(self, job_id: str) -> bytes:
        rec = self.record(job_id)
        if rec["state"] != "done":
            raise FileNotFoundError(f"job {job_id} is {rec['state']}: no result")
        return self._read(self._p("jobs", job_id, self.result_name(job_id)))

    def finalize(self, job_id: str, study: Study, mark_done: bool = True) -> None:
        """Write the corrected study (derived DICOM series in a zip, or a NIfTI volume) and mark the job done
        (``mark_done=False``: the caller does, after storing the result elsewhere)."""
        rec = self.record(job_id)
        outs = [self.get_slice(job_id, i)[:2] for i in range(rec["total"])]
        files = derived_files(study, outs, rec["model_version"], rec.get("params", {}), rec.get("series_uid"),
                              rec.get("series_number"))
        if rec["fmt"] == "nifti":
            data = files[0][1]
        else:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, blob in files:
                    zf.writestr(name, blob)
            data = buf.getvalue()
        atomic_write_bytes(self.fs, self._p("jobs", job_id, self.result_name(job_id)), data)
        if mark_done:
            self.update(job_id, state="done", finished=time.time())

    def result_files(self, job_id: str) -> list[bytes]:
        """The derived DICOM instances of a DICOM job's result, in slice order (what its result zip holds)."""
        with zipfile.ZipFile(io.BytesIO(self._read(self._p("jobs", job_id, "result.zip")))) as zf:
            return [zf.read(n) for n in sorted(zf.namelist())]


def derived_files(study: Study, outs: list[tuple[np.ndarray, int]], model_version: str, params: dict,
                  series_uid: str | None = None, series_number: int | None = None) -> list[tuple[str, bytes]]:
    """The corrected study as files: one derived DICOM instance per input instance (``00000.dcm`` ..., a new
    series of the same study) or one NIfTI volume (``result.nii.gz``). ``outs`` holds, per slice in order, its
    corrected HU on the input grid and its metal pixel count (0: returned as it came)."""
    from dudocrop.data.dicom_derived import derived_slice, new_series_uid, to_bytes

    if study.fmt == "nifti":
        return [("result.nii.gz", nifti_bytes(nifti_like(study.nifti, np.stack([hu for hu, _ in outs]))))]
    series_uid = series_uid or new_series_uid()
    files = []
    with quiet_pydicom():
        for i, (s, (hu, metal)) in enumerate(zip(study.slices, outs)):
            ds = derived_slice(s.dataset, hu, series_uid=series_uid, model_version=model_version,
                               steps=params.get("steps"), k=params["k"], alpha=params["alpha"], beta=params["beta"],
                               series_number=series_number, metal_free=metal == 0)
            files.append((f"{i:05d}.dcm", to_bytes(ds)))
    return files


async def run_job(store: JobStore, job_id: str, correct: Callable[[np.ndarray], Awaitable[np.ndarray]],
                  geometry: FanBeamGeometry, threshold_hu: float, *, concurrency: int = 8, retries: int = 3,
                  retry_delay_s: float = 0.5, limits: Limits | None = None, log: Callable[[str], None] = print,
                  max_runs: int = 3, publish: Callable[[str], Awaitable[dict]] | None = None) -> str:
    """Work a job through: skip finished slices, finish metal-free ones at once, send each metal slice (on the
    model grid) to ``correct`` (returning its corrected HU, or ``{"hu", "consistency"}`` to keep the score) with
    at most ``concurrency`` in flight, retrying a failed call ``retries`` times (a lost model replica: the call
    is re-queued), then write the result. Returns the final state. A job marked
    cancelled stops before its next slice. A job started ``max_runs`` times without finishing (one that takes its
    process down each time) is failed instead of resumed forever. ``publish`` (a PACS job's STOW-RS) runs
    after the result is written and before the job is marked done; the dict it returns (``stored``) is recorded
    on the job, and so is its failure (``store_error``), which leaves the corrected study done."""
    rec = store.record(job_id)
    if rec["state"] in FINAL_STATES:
        return rec["state"]
    runs = int(rec.get("runs", 0)) + 1
    if runs > max_runs:
        store.update(job_id, state="failed", error=f"started {max_runs} times without finishing", finished=time.time())
        log(f"job {job_id}: failed (started {max_runs} times without finishing)")
        return "failed"
    store.update(job_id, state="running", started=rec.get("started") or time.time(), runs=runs)
    try:
        study = await asyncio.to_thread(store.load_study, job_id, limits)
        done = store.finished_slices(job_id)
        sem = asyncio.Semaphore(concurrency)

        def cancelled() -> bool:
            return store.record(job_id)["state"] == "cancelled"

        async def one(i: int) -> None:
            s = study.slices[i]
            prepared = prepare_slice(s.hu, s.spacing, geometry, threshold_hu, s.name)
            if not prepared.has_metal:
                await asyncio.to_thread(store.put_slice, job_id, i, s.hu, 0)
                return
            async with sem:
                if await asyncio.to_thread(cancelled):
                    return
                for attempt in range(retries + 1):
                    try:
                        out, score = await correct(prepared.model_hu), None
                        if isinstance(out, dict):  # {"hu": ..., "consistency": ...} from a model that scores
                            out, score = out["hu"], out.get("consistency")
                        break
                    except Exception as e:  # noqa: BLE001 - a replica lost mid-call: re-queue the slice
                        if attempt == retries:
                            raise
                        log(f"job {job_id}: slice {i} attempt {attempt + 1} failed ({type(e).__name__}); re-queued")
                        await asyncio.sleep(retry_delay_s * (attempt + 1))
            hu = back_to_input_grid(np.asarray(out), prepared, geometry)
            await asyncio.to_thread(store.put_slice, job_id, i, hu, prepared.metal_pixels, score)

        await asyncio.gather(*(one(i) for i in range(len(study.slices)) if i not in done))
        if await asyncio.to_thread(cancelled):
            return "cancelled"
        await asyncio.to_thread(store.finalize, job_id, study, publish is None)
        if publish is not None:
            try:
                extra = await publish(job_id)
            except Exception as e:  # noqa: BLE001 - the result stands; why it could not be stored is recorded
                extra = {"store_error": f"{type(e).__name__}: {e}"[:500]}
                log(f"job {job_id}: store failed ({type(e).__name__})")
            await asyncio.to_thread(store.update, job_id, state="done", finished=time.time(), **extra)
        log(f"job {job_id}: done, {len(study.slices)} slices")
        return "done"
    except Exception as e:  # noqa: BLE001 - recorded on the job; the message names no patient data
        if store.record(job_id)["state"] == "cancelled":
            return "cancelled"
        store.update(job_id, state="failed", error=f"{type(e).__name__}: {e}"[:500], finished=time.time())
        log(f"job {job_id}: failed ({type(e).__name__})")
        return "failed"
