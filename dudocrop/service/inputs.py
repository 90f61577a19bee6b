"""Untrusted CT inputs for the MAR service: one slice (DICOM, NIfTI, ``.npy`` / ``.npz`` in HU) or a whole study
(several DICOM files, a zip of them, or a NIfTI volume), decoded within bounds.

Every refusal is an :class:`InputError` carrying the HTTP status it deserves (400 malformed, 413 too large,
415 unsupported encoding, 422 well-formed but unusable) and a message naming the file, field or limit. Nothing
here logs, and no message quotes patient data or pixel values. DICOM checks (CT modality, rescale tags,
decodable pixel data) are :mod:`dudocrop.data.clinical`'s.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np

from dudocrop.data.clinical import _position_along_normal, dicom_to_hu, read_nifti


class InputError(ValueError):
    """A refused input: ``status`` is the HTTP status (4xx) the service answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may make the service decode (issue 21: bounded request and decoded size).

    ``max_request_bytes``: body of one request (413); ``max_slice_pixels`` / ``min_slice_size``: rows x cols of a
    decoded slice (413 / 422); ``max_slices``: slices of one job; ``max_zip_entries`` / ``max_decoded_bytes``:
    members of a zip and the bytes all of them (or a compressed NIfTI) may expand to (a zip bomb: 413)."""

    max_request_bytes: int = 256 << 20
    max_slice_pixels: int = 2048 * 2048
    min_slice_size: int = 16
    max_slices: int = 2000
    max_zip_entries: int = 4000
    max_decoded_bytes: int = 2 << 30


@dataclass
class Slice:
    """One decoded slice: HU (rows, cols) float32, the pixel spacing (row, col) in mm (None: unknown), the
    input format (``dicom``, ``nifti``, ``npy``, ``npz``) and what is needed to answer in the same format."""

    hu: np.ndarray
    spacing: tuple[float, float] | None
    fmt: str
    dataset: object | None = None  # the pydicom Dataset of a DICOM input
    nifti: object | None = None  # the nibabel image of a NIfTI input
    name: str = "input"
    raw: bytes | None = None  # the uploaded file of a DICOM instance in a study, kept as it came


@dataclass
class Study:
    """A decoded study for a job: its slices in order along the slice normal, one series."""

    slices: list[Slice]
    fmt: str  # "dicom" or "nifti"
    nifti: object | None = None
    extra: dict = field(default_factory=dict)


# ---- format sniffing ---------------------------------------------------------------------------------------------
def sniff(data: bytes, content_type: str | None = None, filename: str | None = None) -> str:
    """``dicom``, ``nifti``, ``npy``, ``npz`` or ``zip`` from the bytes themselves (the content type and the name
    only break ties): a client's label is not trusted over the content."""
    ct = (content_type or "").split(";")[0].strip().lower()
    name = (filename or "").lower()
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return "npz" if name.endswith(".npz") or ct in ("application/x-npz",) else "zip"
    if data[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: only a .nii.gz is accepted gzipped
    if len(data) >= 348 and data[344:348] in (b"n+1\0", b"ni1\0"):
        return "nifti"
    if ct == "application/dicom" or name.endswith(".dcm"):
        return "dicom"  # a DICOM file without the Part 10 preamble (raw dataset): pydicom reads it with force
    raise InputError(f"{filename or 'body'}: not a DICOM, NIfTI, .npy or .npz file (content type "
                     f"{content_type or 'none'}, {len(data)} bytes)", 415)


def check_size(n: int, limits: Limits, what: str = "request body") -> None:
    if n > limits.max_request_bytes:
        raise InputError(f"{what} is {n} bytes, over the limit of {limits.max_request_bytes} bytes", 413)


def check_pixels(hu: np.ndarray, name: str, limits: Limits) -> np.ndarray:
    """A decoded slice: 2-D, within the size bounds, finite (NaN / inf refused, counted), as float32."""
    if hu.ndim != 2:
        raise InputError(f"{name}: expected one 2-D slice, got an array of shape {tuple(hu.shape)}", 422)
    rows, cols = hu.shape
    if rows * cols > limits.max_slice_pixels:
        raise InputError(f"{name}: {rows}x{cols} pixels, over the limit of {limits.max_slice_pixels}", 413)
    if min(rows, cols) < limits.min_slice_size:
        raise InputError(f"{name}: {rows}x{cols} pixels, smaller than the minimum {limits.min_slice_size} per side",
                         422)
    if not np.issubdtype(hu.dtype, np.number) or np.issubdtype(hu.dtype, np.complexfloating):
        raise InputError(f"{name}: pixel dtype {hu.dtype} is not real numbers (HU expected)", 422)
    hu = hu.astype(np.float32)
    bad = int((~np.isfinite(hu)).sum())
    if bad:
        raise InputError(f"{name}: {bad} NaN or inf pixels", 422)
    return hu


# ---- one slice ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_pydicom():
    """pydicom's validation warnings quote element values (UIDs, names): nothing of the data goes to logs, so
    its reading validation is off and its warnings are dropped while an upload is decoded."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = old


def _read_dicom(data: bytes, name: str, limits: Limits):
    with quiet_pydicom():
        return _read_dicom_quiet(data, name, limits)


def _read_dicom_quiet(data: bytes, name: str, limits: Limits):
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for malformed files
        raise InputError(f"{name}: not a readable DICOM file ({type(e).__name__})", 400) from e
    try:  # pydicom parses lazily: read every element now, so a malformed one is refused here, not later
        for elem in ds.iterall():
            _ = elem.value
    except Exception as e:  # noqa: BLE001 - unknown VRs, bad lengths, undecodable text ...
        raise InputError(f"{name}: malformed DICOM element ({type(e).__name__}: {str(e)[:120]})", 400) from e
    if "PixelData" not in ds:
        raise InputError(f"{name}: DICOM file without pixel data (truncated, or not an image)", 400)
    missing = [t for t in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if t not in ds]
    if missing:
        raise InputError(f"{name}: DICOM file lacks {missing}", 422)
    modality = ds.get("Modality", None)
    if modality != "CT":
        raise InputError(f"{name}: Modality is {modality!r}, not 'CT': only CT values are HU", 422)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{name}: Rows / Columns missing or malformed", 400) from e
    if rows * cols > limits.max_slice_pixels or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InputError(f"{name}: {rows}x{cols} pixels x {ds.get('NumberOfFrames', 1)} frames, over the limit of "
                         f"one frame of {limits.max_slice_pixels} pixels", 413)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        hu = dicom_to_hu(ds, path=name)
    except ValueError as e:
        msg = str(e)
        status = 415 if "transfer syntax" in msg and ts is not None and ts.is_compressed else 422
        if "cannot decode" in msg and status != 415:
            status = 400
        raise InputError(msg, status) from e
    except Exception as e:  # noqa: BLE001 - anything else pydicom raises on hostile headers
        raise InputError(f"{name}: malformed DICOM image ({type(e).__name__})", 400) from e
    sp = ds.get("PixelSpacing", None)
    try:
        spacing = (float(sp[0]), float(sp[1])) if sp is not None and len(sp) == 2 else None
    except Exception:  # noqa: BLE001
        spacing = None
    return ds, check_pixels(hu, name, limits), spacing


def _read_nifti_bytes(data: bytes, name: str, limits: Limits):
    import nibabel as nib

    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory(prefix="dudocrop-nii-") as tmp:
        path = os.path.join(tmp, "input" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        try:
            hdr = nib.load(path).header
            shape = tuple(int(s) for s in hdr.get_data_shape())
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{name}: not a readable NIfTI file ({type(e).__name__})", 400) from e
        n = int(np.prod(shape)) if shape else 0
        if len(shape) not in (2, 3) and not (len(shape) == 4 and shape[3] == 1):
            raise InputError(f"{name}: NIfTI of shape {shape}: expected a 2-D slice or a 3-D volume", 422)
        if n * 4 > limits.max_decoded_bytes or (shape and shape[0] * shape[1] > limits.max_slice_pixels):
            raise InputError(f"{name}: NIfTI of shape {shape} decodes past the size limits", 413)
        if len(shape) == 3 and shape[2] > limits.max_slices:
            raise InputError(f"{name}: {shape[2]} slices, over the limit of {limits.max_slices}", 413)
        try:
            img = nib.load(path, mmap=False)  # no memory map: the file is rewritten below
            data = np.asarray(img.dataobj, dtype=np.float32)
            data = data[..., None] if data.ndim == 2 else data[..., 0] if data.ndim == 4 else data
            img = nib.Nifti1Image(data, img.affine, img.header)
            img.header.set_data_dtype(np.float32)
            img.header.set_slope_inter(1.0, 0.0)
            path = os.path.join(tmp, "volume.nii")
            nib.save(img, path)
            vol, spacing = read_nifti(path)
        except ValueError as e:
            raise InputError(str(e).replace(path, name), 422 if "NaN" in str(e) else 400) from e
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{name}: not a readable NIfTI file ({type(e).__name__})", 400) from e
    return img, vol, spacing


def _read_numpy(data: bytes, fmt: str, name: str, limits: Limits):
    try:
        if fmt == "npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            spacing = None
        else:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                keys = list(z.keys())
                key = "hu" if "hu" in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise InputError(f"{name}: .npz holds {keys}: name the slice 'hu' (and spacing 'spacing')", 422)
                info = z.zip.getinfo(key + ".npy") if hasattr(z, "zip") else None
                if info is not None and info.file_size > limits.max_decoded_bytes:
                    raise InputError(f"{name}: member {key!r} decodes to {info.file_size} bytes", 413)
                arr = z[key]
                spacing = tuple(float(v) for v in np.asarray(z["spacing"]).ravel()[:2]) if "spacing" in keys else None
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError / OSError / EOFError / BadZipFile
        raise InputError(f"{name}: not a readable .{fmt} array ({type(e).__name__}: {e})", 400) from e
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    return check_pixels(arr, name, limits), spacing


def decode_slice(data: bytes, content_type: str | None = None, filename: str | None = None,
                 limits: Limits = Limits(), spacing: tuple[float, float] | None = None) -> Slice:
    """One slice from a request body. ``spacing`` (mm, row / col) overrides what the file says; .npy carries
    none, so without it the caller must take the model's own grid (same shape) or refuse the slice."""
    name = filename or "body"
    check_size(len(data), limits)
    if not data:
        raise InputError(f"{name}: empty body", 400)
    fmt = sniff(data, content_type, filename)
    if fmt == "zip":
        raise InputError(f"{name}: a zip is a study: POST it to /v1/jobs", 415)
    if fmt == "dicom":
        ds, hu, sp = _read_dicom(data, name, limits)
        return Slice(hu, spacing or sp, "dicom", dataset=ds, name=name)
    if fmt == "nifti":
        img, vol, sp = _read_nifti_bytes(data, name, limits)
        if vol.shape[0] != 1:
            raise InputError(f"{name}: NIfTI volume of {vol.shape[0]} slices: POST volumes to /v1/jobs", 422)
        return Slice(check_pixels(vol[0], name, limits), spacing or sp, "nifti", nifti=img, name=name)
    hu, sp = _read_numpy(data, fmt, name, limits)
    return Slice(hu, spacing or sp, fmt, name=name)


# ---- a study -----------------------------------------------------------------------------------------------------
def unzip(data: bytes, limits: Limits, name: str = "upload.zip") -> list[tuple[str, bytes]]:
    """The members of a zip as (name, bytes), refusing path traversal (an absolute name or ``..``), more than
    ``max_zip_entries`` members, and a declared or actual expansion past ``max_decoded_bytes`` (zip bomb)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{name}: not a readable zip file ({type(e).__name__})", 400) from e
    if len(infos) > limits.max_zip_entries:
        raise InputError(f"{name}: {len(infos)} members, over the limit of {limits.max_zip_entries}", 413)
    total = 0
    out = []
    for info in infos:
        member = info.filename
        parts = member.replace("\\", "/").split("/")
        if member.startswith(("/", "\\")) or ".." in parts or (len(member) > 1 and member[1] == ":"):
            raise InputError(f"{name}: member name {member!r} points outside the archive (path traversal)", 400)
        if info.is_dir():
            continue
        total += info.file_size
        if total > limits.max_decoded_bytes:
            raise InputError(f"{name}: members expand past {limits.max_decoded_bytes} bytes (zip bomb?)", 413)
        try:
            with zf.open(info) as f:
                blob = f.read(info.file_size + 1)  # never more than declared (+1 to see a lie)
        except Exception as e:  # noqa: BLE001 - bad CRC, unsupported compression, encrypted member
            raise InputError(f"{name}: member {member!r} cannot be read ({type(e).__name__})", 400) from e
        if len(blob) > info.file_size:
            raise InputError(f"{name}: member {member!r} expands past its declared size", 413)
        out.append((member, blob))
    return out


def decode_study(files: list[tuple[str, bytes]], limits: Limits = Limits()) -> Study:
    """A whole study from uploaded files: several DICOM files, one zip of them, or one NIfTI volume. DICOM
    instances must form one CT series (one SeriesInstanceUID, one spacing, one shape); they are ordered along
    the slice normal; files in a zip that are not DICOM (a README, a DICOMDIR) are skipped."""
    if not files:
        raise InputError("no files uploaded: send DICOM files, a zip of them, or a NIfTI volume", 400)
    check_size(sum(len(b) for _, b in files), limits, "upload")
    if len(files) == 1:
        fname, blob = files[0]
        fmt = sniff(blob, None, fname) if blob else None
        if fmt == "zip":
            files = unzip(blob, limits, fname)
        elif fmt == "nifti":
            img, vol, sp = _read_nifti_bytes(blob, fname, limits)
            slices = [Slice(check_pixels(v, f"{fname} slice {i}", limits), sp, "nifti", name=f"{fname}[{i}]")
                      for i, v in enumerate(vol)]
            return Study(slices, "nifti", nifti=img)
    if len(files) > limits.max_slices:
        raise InputError(f"{len(files)} files, over the limit of {limits.max_slices} slices", 413)
    slices = []
    for fname, blob in files:
        if not blob:
            raise InputError(f"{fname}: empty file", 400)
        try:
            fmt = sniff(blob, None, fname)
        except InputError:
            if os.path.basename(fname).upper() == "DICOMDIR" or not fname.lower().endswith(".dcm"):
                continue  # a note or index beside the series
            raise
        if fmt != "dicom":
            raise InputError(f"{fname}: a study job takes DICOM files, one zip of them or one NIfTI volume; "
                             f"got a {fmt} file among them", 415)
        ds, hu, sp = _read_dicom(blob, fname, limits)
        slices.append(Slice(hu, sp, "dicom", dataset=ds, name=fname, raw=blob))
    if not slices:
        raise InputError("no DICOM images in the upload", 422)
    series = {str(s.dataset.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise InputError(f"the upload mixes {len(series)} DICOM series: send one series per job", 422)
    shapes = {s.hu.shape for s in slices}
    if len(shapes) > 1:
        raise InputError(f"slices have different shapes {sorted(shapes)}", 422)
    spacings = {s.spacing for s in slices}
    if len(spacings) > 1:
        raise InputError(f"slices have mixed pixel spacing {sorted(map(str, spacings))}", 422)
    slices.sort(key=lambda s: _position_along_normal(s.dataset))
    uids = [str(s.dataset.get("SOPInstanceUID", "")) for s in slices]
    if len(set(uids)) != len(uids):
        raise InputError("the upload holds the same SOPInstanceUID twice", 422)
    return Study(slices, "dicom")


def nifti_like(template, volume_hu: np.ndarray):
    """A NIfTI image of ``volume_hu`` (slices, rows, cols, display orientation as :func:`read_nifti` returns it)
    in the template's canonical (RAS+) frame, float32 HU, geometry (affine) unchanged."""
    import nibabel as nib

    canon = nib.as_closest_canonical(template)
    data = np.transpose(np.flip(np.asarray(volume_hu, np.float32), axis=(1, 2)), (2, 1, 0))
    img = nib.Nifti1Image(np.ascontiguousarray(data), canon.affine)
    img.header.set_xyzt_units(*canon.header.get_xyzt_units())
    return img


def nifti_bytes(img) -> bytes:
    """A NIfTI image as gzipped ``.nii.gz`` bytes."""
    import nibabel as nib

    with tempfile.TemporaryDirectory(prefix="dudocrop-nii-") as tmp:
        path = os.path.join(tmp, "out.nii.gz")
        nib.save(img, path)
        with open(path, "rb") as f:
            return f.read()
