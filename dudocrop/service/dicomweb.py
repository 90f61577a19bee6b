"""A PACS as the source and destination of a study (issue 22): DICOMweb QIDO-RS / WADO-RS / STOW-RS through
``dicomweb-client``, with optional basic or bearer auth. No Ray: the Serve ingress and ``ray_jobs/mar_study.py``
share it.

A reference names a study (and optionally one of its series) on a DICOMweb server::

    {"url": "http://host:8042/dicom-web", "study": "<StudyInstanceUID>", "series": "<SeriesInstanceUID>" | null,
     "auth": null | {"type": "basic", "username": "...", "password": "..."} | {"type": "bearer", "token": "..."}}

Every refusal is an :class:`~dudocrop.service.inputs.InputError` naming the field (``dicomweb.url``,
``dicomweb.study``, ``dicomweb.auth`` ...) with the HTTP status the service answers: 400 for a malformed body,
413 for a study over the :class:`~dudocrop.service.inputs.Limits`, 422 for a well-formed reference the PACS
cannot serve (unknown UID, refused credentials, unreachable server). Credentials never appear in a message,
in :meth:`DicomwebRef.public` (what a job record keeps) or in ``repr``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dudocrop.service.inputs import InputError, Limits, check_size, quiet_pydicom

#: a DICOM UID: dot-separated digit groups, at most 64 characters (PS3.5 §9.1).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: seconds to wait for the PACS to connect / to send the next bytes of an answer.
TIMEOUT_S = (10.0, 120.0)
#: dicomweb-client's retries of a lost connection or a busy server (429, 503 ...): 3 attempts, 0.2 s then 0.4 s
#: apart (its default, 5 attempts with 1 s x 2^n back-off, keeps a request to a mistyped URL waiting ~30 s).
RETRY = {"max_attempts": 3, "wait_exponential_multiplier": 200}
# dicomweb-client logs every request's URL at INFO: study / series UIDs, which the service keeps out of its logs
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Auth:
    """Credentials for the PACS: ``basic`` (username, password) or ``bearer`` (token). Never printed."""

    type: str
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class DicomwebRef:
    """A study (and optionally one series) on a DICOMweb server."""

    url: str
    study: str
    series: str | None = None
    auth: Auth | None = None

    def public(self) -> dict:
        """What may be written down (job records, logs): no credentials, only their type."""
        return {"url": self.url, "study": self.study, "series": self.series,
                "auth": self.auth.type if self.auth else None}


def _uid(value, name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > 64 or not _UID.match(value):
        raise InputError(f"{name}: expected a DICOM UID (digits and dots, at most 64 characters)"
                         f"{', or null' if optional else ''}", 422)
    return value


def _auth(value) -> Auth | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError("dicomweb.auth: expected null or an object with 'type' basic or bearer", 422)
    kind = value.get("type")
    want = {"basic": ("username", "password"), "bearer": ("token",)}
    if kind not in want:
        raise InputError("dicomweb.auth.type: expected 'basic' or 'bearer'", 422)
    extra = set(value) - {"type", *want[kind]}
    if extra:
        raise InputError(f"dicomweb.auth: unknown field(s) {sorted(extra)} for type {kind!r}", 422)
    for k in want[kind]:
        if not isinstance(value.get(k), str) or not value[k]:
            raise InputError(f"dicomweb.auth.{k}: expected a non-empty string", 422)
    return Auth(kind, **{k: value[k] for k in want[kind]})


def parse_ref(value, name: str = "dicomweb") -> DicomwebRef:
    """A :class:`DicomwebRef` from its JSON object; InputError naming the field that is wrong."""
    if not isinstance(value, dict):
        raise InputError(f"{name}: expected an object with 'url' and 'study'", 422)
    extra = set(value) - {"url", "study", "series", "auth"}
    if extra:
        raise InputError(f"{name}: unknown field(s) {sorted(extra)}", 422)
    url = value.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{name}.url: expected an http(s) URL of a DICOMweb service", 422)
    if parts.username or parts.password:
        raise InputError(f"{name}.url: carries credentials; put them in {name}.auth", 422)
    return DicomwebRef(url.rstrip("/"), _uid(value.get("study"), f"{name}.study"),
                       _uid(value.get("series"), f"{name}.series", optional=True), _auth(value.get("auth")))


def parse_job_request(body: bytes) -> tuple[DicomwebRef, bool]:
    """``POST /v1/jobs`` with a JSON body: ``{"dicomweb": {...}, "store": bool}`` -> (reference, store)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"body: not valid JSON ({type(e).__name__})", 400) from e
    if not isinstance(doc, dict):
        raise InputError("body: expected a JSON object with 'dicomweb' (and optionally 'store')", 422)
    extra = set(doc) - {"dicomweb", "store"}
    if extra:
        raise InputError(f"body: unknown field(s) {sorted(extra)}", 422)
    if "dicomweb" not in doc:
        raise InputError("dicomweb: missing (an object with 'url', 'study', optional 'series' and 'auth')", 422)
    store = doc.get("store", False)
    if not isinstance(store, bool):
        raise InputError("store: expected true or false", 422)
    return parse_ref(doc["dicomweb"]), store


def _origin(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def check_allowed(ref: DicomwebRef, allow: str) -> None:
    """Refuse (403) a server the operator did not list: a service that fetches any URL a client names could be
    made to reach the cluster's internal endpoints (cloud metadata, the Ray dashboard). ``allow`` is a
    comma-separated list of DICOMweb base URLs (scheme, host and port must match; the reference's path must lie
    under the entry's) or ``*`` for any server; empty allows none."""
    entries = [e.strip() for e in allow.split(",") if e.strip()]
    if "*" in entries:
        return
    scheme, host, port, path = _origin(ref.url)
    for e in entries:
        e_scheme, e_host, e_port, e_path = _origin(e)
        if (scheme, host, port) == (e_scheme, e_host, e_port) and (path == e_path or path.startswith(e_path + "/")):
            return
    raise InputError(f"dicomweb.url: {ref.url} is not a DICOMweb server this service may reach (the operator "
                     "lists them in the serve setting dicomweb_allow / DUDOCROP_DICOMWEB_ALLOW)", 403)


# ---- talking to the PACS -------------------------------------------------------------------------------------------
def client(ref: DicomwebRef):
    """A ``DICOMwebClient`` for the reference's server, its session carrying the credentials."""
    import requests
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    if ref.auth is not None and ref.auth.type == "basic":
        session = create_session_from_user_pass(ref.auth.username, ref.auth.password)
    else:
        session = requests.Session()
        if ref.auth is not None:
            session.headers["Authorization"] = f"Bearer {ref.auth.token}"
    c = DICOMwebClient(ref.url, session=session, timeout=TIMEOUT_S)
    c.set_http_retry_params(**RETRY)
    return c


@contextlib.contextmanager
def _pacs_errors(ref: DicomwebRef, what: str):
    """The PACS's failures as InputErrors naming the field at fault (never the credentials)."""
    import requests

    try:
        yield
    except InputError:
        raise
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else 0
        if code in (401, 403):
            raise InputError(f"dicomweb.auth: {ref.url} refused the {what} (HTTP {code}): "
                             f"{'no credentials given' if ref.auth is None else 'credentials not accepted'}",
                             422) from None
        if code == 404:
            target = f"series {ref.series} of study {ref.study}" if ref.series else f"study {ref.study}"
            raise InputError(f"dicomweb.{'series' if ref.series else 'study'}: {ref.url} has no {target} "
                             f"(HTTP 404 on {what})", 422) from None
        raise InputError(f"dicomweb.url: {ref.url} answered HTTP {code} to the {what}", 422) from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise InputError(f"dicomweb.url: cannot reach the DICOMweb server {ref.url} ({type(e).__name__})",
                         422) from None
    except requests.RequestException as e:
        raise InputError(f"dicomweb.url: the {what} at {ref.url} failed ({type(e).__name__})", 422) from None


def _series_of(ref: DicomwebRef, c) -> str:
    """The series to retrieve: the named one, or the study's only series."""
    if ref.series:
        return ref.series
    found = c.search_for_series(study_instance_uid=ref.study, fields=["SeriesInstanceUID"])
    uids = sorted({s.get("0020000E", {}).get("Value", [""])[0] for s in found})
    if not uids:
        raise InputError(f"dicomweb.study: {ref.url} has no study {ref.study}", 422)
    if len(uids) > 1:
        raise InputError(f"dicomweb.series: study {ref.study} holds {len(uids)} series; name one (e.g. "
                         f"{uids[0]})", 422)
    return uids[0]


def retrieve(ref: DicomwebRef, limits: Limits | None = None) -> list[tuple[str, bytes]]:
    """The referenced series' instances as DICOM Part 10 files ``(name, bytes)``, the same list an upload of
    files gives :func:`~dudocrop.service.inputs.decode_study`. QIDO-RS counts the instances first (a series
    over ``limits.max_slices`` is refused before any pixel moves); WADO-RS then streams them, stopped as soon
    as their bytes pass ``limits.max_request_bytes``."""
    limits = limits or Limits()
    c = client(ref)
    with _pacs_errors(ref, "search (QIDO-RS)"):
        series = _series_of(ref, c)
        found = c.search_for_instances(study_instance_uid=ref.study, series_instance_uid=series,
                                       fields=["SOPInstanceUID"], get_remaining=True)
    if not found:
        field_ = "series" if ref.series else "study"
        raise InputError(f"dicomweb.{field_}: {ref.url} has no instances of series {series} in study "
                         f"{ref.study}", 422)
    if len(found) > limits.max_slices:
        raise InputError(f"dicomweb: series {series} holds {len(found)} instances, over the limit of "
                         f"{limits.max_slices} slices", 413)
    out, total = [], 0
    with _pacs_errors(ref, "retrieve (WADO-RS)"), quiet_pydicom():
        for i, ds in enumerate(c.iter_series(ref.study, series)):
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            blob = buf.getvalue()
            total += len(blob)
            check_size(total, limits, f"dicomweb: series {series} (after {i + 1} instances)")
            if i + 1 > limits.max_slices:
                raise InputError(f"dicomweb: series {series} sends more than {limits.max_slices} instances", 413)
            out.append((f"{i:05d}.dcm", blob))
    return out


def store(ref: DicomwebRef, files: list[bytes]) -> dict:
    """STOW-RS the DICOM Part 10 ``files`` (one derived series of ``ref.study``) to ``ref``'s server.
    Returns where they went: ``{"url", "study", "series", "instances"}``; RuntimeError when the server
    reports failed instances (a partial store is an error, not a result)."""
    import pydicom

    with quiet_pydicom():
        datasets = [pydicom.dcmread(io.BytesIO(b)) for b in files]
    series = sorted({str(d.SeriesInstanceUID) for d in datasets})
    studies = sorted({str(d.StudyInstanceUID) for d in datasets})
    if len(series) != 1 or studies != [ref.study]:
        raise ValueError(f"store: expected one series of study {ref.study}, got {len(series)} series of "
                         f"{len(studies)} studies")
    c = client(ref)
    with _pacs_errors(ref, "store (STOW-RS)"):
        res = c.store_instances(datasets, study_instance_uid=ref.study)
    failed = len(res.get("FailedSOPSequence", []) or []) if res is not None else 0
    if failed:
        raise RuntimeError(f"STOW-RS to {ref.url}: {failed} of {len(datasets)} instances refused")
    return {"url": ref.url, "study": ref.study, "series": series[0], "instances": len(datasets)}
