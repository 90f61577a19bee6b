"""Request bodies in and answers out for the ingress (multipart / raw uploads; npy, npz, NIfTI, derived DICOM).

A module of its own so the ingress class, which Serve ships to its replica by value, refers to it by name."""

import io
import os

import numpy as np
from fastapi import HTTPException, Request

MEDIA = {"dicom": "application/dicom", "nifti": "application/gzip", "npy": "application/x-npy",
         "npz": "application/x-npz", "zip": "application/zip"}
ACCEPT = {"application/dicom": "dicom", "application/x-npy": "npy", "application/x-npz": "npz",
          "application/gzip": "nifti", "application/x-nifti": "nifti", "application/nifti": "nifti"}


async def files(request: Request, body: bytes, limits) -> list[tuple[str, bytes]]:
    """The uploaded files of a job request: multipart parts, or the body itself (a zip, a NIfTI, one DICOM)."""
    ctype = (request.headers.get("content-type") or "").lower()
    if not ctype.startswith("multipart/form-data"):
        return [("upload" + (".zip" if body[:2] == b"PK" else ".dcm" if "dicom" in ctype else ""), body)]
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=limits.max_slices,
                                     max_fields=limits.max_slices).parse()
    except MultiPartException as e:
        raise HTTPException(400, f"malformed multipart body: {e}") from e
    files = []
    for i, (_, v) in enumerate(form.multi_items()):
        if isinstance(v, UploadFile):
            files.append((os.path.basename(v.filename or f"part{i}"), await v.read()))
    if not files:
        raise HTTPException(400, "multipart body holds no files")
    return files


def encode(hu: np.ndarray, s, fmt: str, info: dict, params: dict, priors: dict | None, metal_free: bool) -> bytes:
    if fmt == "dicom":
        from dudocrop.data.dicom_derived import derived_slice, new_series_uid, to_bytes
        from dudocrop.service.inputs import quiet_pydicom

        osro = info["osro"]
        with quiet_pydicom():
            ds = derived_slice(s.dataset, hu, series_uid=new_series_uid(), model_version=info["model_version"],
                               steps=params["steps"] or info["steps"], k=params["k"] if params["k"] is not None
                               else osro["k"], alpha=params["alpha"] if params["alpha"] is not None else osro["alpha"],
                               beta=params["beta"] if params["beta"] is not None else osro["beta"],
                               metal_free=metal_free)
            return to_bytes(ds)
    if fmt == "nifti":
        from dudocrop.service.inputs import nifti_bytes, nifti_like

        return nifti_bytes(nifti_like(s.nifti, hu[None]))
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, hu.astype(np.float32))
    else:
        arrays = {"hu": hu.astype(np.float32), "spacing": np.asarray(s.spacing, np.float64),
                  "metal_free": np.bool_(metal_free)}
        for k, v in (priors or {}).items():
            arrays[k] = v
        np.savez(buf, **arrays)
    return buf.getvalue()
