"""A PACS round trip (issue 22): a multi-slice CT study with metal (patient-like phantom, simulated implant) in a
real Orthanc with its DICOMweb plugin (``tests/pacs_fixtures.py``), corrected by a Serve job that names it
(WADO-RS in, STOW-RS of the derived series back) and by ``ray_jobs/mar_study.py`` (a folder, a NIfTI volume and
the PACS in), each checked in Orthanc / on disk against a direct ``DuDoCROP`` call on the same slices; the
refusals of a bad request, an unknown UID, refused credentials, an unreachable server and a series over the
limits."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import zipfile

import numpy as np
import pydicom
import pytest

from tests.pacs_fixtures import orthanc  # noqa: F401 - the module's Orthanc
from tests.serve_fixtures import (
    ct_study,
    dicom_bytes,
    metal_volume,
    nifti_volume_bytes,
    tiny_model_folder,
    wait_for_job,
)

requests = pytest.importorskip("requests")
pytest.importorskip("dicomweb_client")

APP = "dudocrop-pacs-test"
N, METAL_AT, SPACING = 6, (2, 3), 6.25  # the tiny model's grid: 64² at 6.25 mm
#: stored values are integers with slope 1: 0.5 HU of rounding, plus float reordering between two CPU runs
TOL_HU = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: a DICOMweb URL on a port nothing listens on (the unreachable-server case)
DEAD_PACS = f"http://127.0.0.1:{_free_port()}/dicom-web"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(str(tmp_path_factory.mktemp("pacs-model") / "model"), steps=1)


@pytest.fixture(scope="module")
def svc(ray_session, model, orthanc, tmp_path_factory):  # noqa: F811
    """The Serve app, one slice per model call (max_batch_size 1) so that each slice's sampler noise is the
    one a direct call on that slice alone draws; it may reach the test's Orthanc and a port nothing listens on."""
    from ray import serve

    from serve.app import app_with

    root = tmp_path_factory.mktemp("pacs-serve")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    allow = f"{orthanc.dicomweb},{DEAD_PACS}"
    app = app_with({"model_uri": model, "store": str(root / "jobs"), "max_batch_size": 1, "job_concurrency": 2,
                    "dicomweb_allow": allow},
                   model_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                   ingress_options={"ray_actor_options": {"num_cpus": 0.1}})
    serve.run(app, name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}", str(root / "jobs")
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def pacs_study(orthanc):  # noqa: F811 - the fixture imported above
    """The study in Orthanc: its instances (as uploaded) and their HU (as stored)."""
    dss = ct_study(metal_volume(N, METAL_AT, seed=3), SPACING)
    orthanc.upload([dicom_bytes(d) for d in dss])
    hu = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in dss])
    return dss, hu


@pytest.fixture(scope="module")
def expected(model, pacs_study):
    """What the service must give: per slice, a direct DuDoCROP call on it alone (seed 0, the model's steps and
    OSRO factors) with the input's metal put back (paper §IV-A's threshold mask); metal-free slices unchanged."""
    import torch

    from dudocrop.data.clinical import metal_mask_from_hu
    from dudocrop.pipeline.model import DuDoCROP

    m = DuDoCROP.load(model, precision="fp32", compile=False)
    _, hu = pacs_study
    out = hu.copy()
    for i in METAL_AT:
        with torch.no_grad():
            xo = m(torch.from_numpy(hu[i])[None, None]).X_o[0, 0].float().numpy()
        metal = metal_mask_from_hu(hu[i], m.config.metal_threshold_hu) > 0
        assert metal.any()
        out[i] = np.where(metal, hu[i], xo)
    return out



def _series(orthanc, study_uid):  # noqa: F811
    from dudocrop.service.dicomweb import DicomwebRef, client

    c = client(DicomwebRef(orthanc.dicomweb, study_uid, auth=_auth(orthanc)))
    return c, {s["0020000E"]["Value"][0] for s in c.search_for_series(study_instance_uid=study_uid)}


def _auth(orthanc):  # noqa: F811
    from dudocrop.service.dicomweb import _auth as parse_auth

    return parse_auth(orthanc.auth_json)


def _check_derived(dss, derived, expected_hu, hu_in):
    """The derived instances (any order) against the inputs: one per input, the same study and geometry, the
    derived-image attributes, pixels within TOL_HU of the direct call, metal and metal-free slices exact."""
    assert len(derived) == len(dss)
    src = {d.SOPInstanceUID: i for i, d in enumerate(dss)}
    seen = set()
    for d in derived:
        assert d.StudyInstanceUID == dss[0].StudyInstanceUID and d.SeriesInstanceUID != dss[0].SeriesInstanceUID
        assert d.FrameOfReferenceUID == dss[0].FrameOfReferenceUID
        assert list(d.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        i = src[d.SourceImageSequence[0].ReferencedSOPInstanceUID]
        seen.add(i)
        assert d.SourceImageSequence[0].ReferencedSOPClassUID == dss[i].SOPClassUID
        assert d.DerivationDescription.startswith("DuDoCROP") and "NOT FOR DIAGNOSTIC USE" in d.SeriesDescription
        assert [float(v) for v in d.ImagePositionPatient] == [float(v) for v in dss[i].ImagePositionPatient]
        got = d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
        if i in METAL_AT:
            assert "no metal" not in d.DerivationDescription
            np.testing.assert_allclose(got, expected_hu[i], atol=TOL_HU)
            assert np.abs(got - hu_in[i]).max() > 5  # the model ran (an untrained model changes the body)
        else:
            assert "no metal" in d.DerivationDescription
            np.testing.assert_array_equal(got, hu_in[i])
    assert seen == set(range(len(dss)))


def test_built_study_is_a_valid_ct_volume(pacs_study, tmp_path):
    """The test study itself: one series of a volume (z steps of SliceThickness, shared frame of reference),
    metal only in METAL_AT, and (when dicom3tools is installed) no dciodvfy error in any instance."""
    dss, hu = pacs_study
    assert len({(d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID) for d in dss}) == 1
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert np.allclose(np.diff(z), float(dss[0].SliceThickness)) and [float(d.SliceLocation) for d in dss] == z
    assert [int(d.InstanceNumber) for d in dss] == list(range(1, N + 1))
    assert [i for i in range(N) if (hu[i] > 2500).sum() >= 2] == list(METAL_AT)
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    for i in (0, METAL_AT[0]):
        p = tmp_path / f"{i}.dcm"
        p.write_bytes(dicom_bytes(dss[i]))
        r = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors


def test_serve_job_from_orthanc_stores_the_derived_series_back(svc, orthanc, pacs_study, expected):  # noqa: F811
    url, jobs = svc
    dss, hu = pacs_study
    study_uid = dss[0].StudyInstanceUID
    body = {"dicomweb": {"url": orthanc.dicomweb, "study": study_uid, "series": dss[0].SeriesInstanceUID,
                         "auth": orthanc.auth_json}, "store": True}
    r = requests.post(url + "/v1/jobs", json=body, timeout=120)
    assert r.status_code == 202, r.text
    assert r.json()["total"] == N and r.json()["with_metal"] == len(METAL_AT)
    st = wait_for_job(url, r.json()["id"])
    assert st["state"] == "done" and "store_error" not in st, st
    stored = st["stored"]
    assert stored["study"] == study_uid and stored["instances"] == N and stored["url"] == orthanc.dicomweb
    assert st["source"] == {"url": orthanc.dicomweb, "study": study_uid, "series": dss[0].SeriesInstanceUID,
                            "auth": "basic"}
    for root, _, names in os.walk(jobs):  # the password is nowhere in the job store
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                assert orthanc.auth[1].encode() not in f.read(), n
    # in Orthanc: the new series sits in the same study, one instance per input
    c, series = _series(orthanc, study_uid)
    assert stored["series"] in series and dss[0].SeriesInstanceUID in series
    assert len(c.search_for_instances(study_instance_uid=study_uid, series_instance_uid=stored["series"])) == N
    derived = list(c.iter_series(study_uid, stored["series"]))
    _check_derived(dss, derived, expected, hu)
    rest = {x["MainDicomTags"]["SeriesInstanceUID"]: x for x in orthanc.get("/series?expand")}  # Orthanc's own view
    assert rest[stored["series"]]["ParentStudy"] == rest[dss[0].SeriesInstanceUID]["ParentStudy"]
    assert len(rest[stored["series"]]["Instances"]) == N
    # the job's zip result holds the same instances that went to the PACS
    z = requests.get(f"{url}/v1/jobs/{st['id']}/result", timeout=60)
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        uids = {pydicom.dcmread(io.BytesIO(zf.read(n))).SOPInstanceUID for n in zf.namelist()}
    assert uids == {d.SOPInstanceUID for d in derived}


def test_bad_pacs_requests_get_a_4xx_naming_the_field(svc, orthanc, pacs_study):  # noqa: F811
    url, _ = svc
    dss, _ = pacs_study
    good = {"url": orthanc.dicomweb, "study": dss[0].StudyInstanceUID, "series": dss[0].SeriesInstanceUID,
            "auth": orthanc.auth_json}

    def post(body, raw=None):
        r = requests.post(url + "/v1/jobs", data=raw if raw is not None else json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=120)
        return r.status_code, r.json()["detail"]

    assert post(None, b"{not json") == (400, "body: not valid JSON (JSONDecodeError)")
    for other in ("http://169.254.169.254/latest/meta-data", orthanc.dicomweb.replace("/dicom-web", "/other"),
                  orthanc.dicomweb.replace("http://", "https://")):  # not listed: refused before any request
        code, msg = post({"dicomweb": {**good, "url": other}})
        assert code == 403 and msg.startswith("dicomweb.url:") and "dicomweb_allow" in msg, (other, msg)
    code, msg = post({"dicomweb": {**good, "study": "not-a-uid"}})
    assert code == 422 and msg.startswith("dicomweb.study:")
    code, msg = post({"dicomweb": good, "store": "yes"})
    assert code == 422 and msg.startswith("store:")
    code, msg = post({"dicomweb": {**good, "auth": {"type": "basic", "username": "mar"}}})
    assert code == 422 and msg.startswith("dicomweb.auth.password:")
    code, msg = post({"dicomweb": {**good, "url": "http://mar:pw@127.0.0.1:1/dicom-web"}})
    assert code == 422 and msg.startswith("dicomweb.url:") and "pw" not in msg
    code, msg = post({"dicomweb": {**good, "study": "1.2.3.4.5", "series": None}})
    assert code == 422 and msg.startswith("dicomweb.study:") and "1.2.3.4.5" in msg
    code, msg = post({"dicomweb": {**good, "series": "1.2.3.4.5"}})
    assert code == 422 and msg.startswith("dicomweb.series:") and "1.2.3.4.5" in msg
    code, msg = post({"dicomweb": {**good, "auth": {"type": "basic", "username": "mar", "password": "wrong"}}})
    assert code == 422 and msg.startswith("dicomweb.auth:") and "HTTP 401" in msg and "wrong" not in msg
    code, msg = post({"dicomweb": {**good, "auth": {"type": "bearer", "token": "t0ken"}}})  # Orthanc: basic only
    assert code == 422 and msg.startswith("dicomweb.auth:") and "HTTP 401" in msg and "t0ken" not in msg
    code, msg = post({"dicomweb": {**good, "auth": None}})
    assert code == 422 and msg.startswith("dicomweb.auth:") and "no credentials" in msg
    t0 = time.perf_counter()
    code, msg = post({"dicomweb": {**good, "url": DEAD_PACS}})
    assert code == 422 and msg.startswith("dicomweb.url: cannot reach")
    assert time.perf_counter() - t0 < 15  # dicomweb-client's default retries kept this request waiting ~30 s
    assert requests.get(url + "/healthz", timeout=60).status_code == 200


def test_retrieve_refuses_a_series_over_the_limits(orthanc, pacs_study):  # noqa: F811
    from dudocrop.service.dicomweb import DicomwebRef, retrieve
    from dudocrop.service.inputs import InputError, Limits

    dss, _ = pacs_study
    ref = DicomwebRef(orthanc.dicomweb, dss[0].StudyInstanceUID, dss[0].SeriesInstanceUID, _auth(orthanc))
    assert len(retrieve(ref)) == N
    with pytest.raises(InputError, match=f"holds {N} instances, over the limit of 4 slices") as e:
        retrieve(ref, Limits(max_slices=4))
    assert e.value.status == 413
    with pytest.raises(InputError, match="over the limit of 20000 bytes") as e:
        retrieve(ref, Limits(max_request_bytes=20000))  # one 64² instance is ~9 kB
    assert e.value.status == 413


@pytest.mark.slow  # a second Ray Data actor start-up (15-50 s here); the DICOMweb test below runs by default
def test_mar_study_folder_in(ray_session, model, pacs_study, expected, tmp_path):
    from ray_jobs.mar_study import main

    dss, hu = pacs_study
    src = tmp_path / "study"
    src.mkdir()
    for i, d in enumerate(dss[::-1]):  # file order is not slice order
        (src / f"x{i}.dcm").write_bytes(dicom_bytes(d))
    out = tmp_path / "out"
    s = main(["--input", str(src), "--out", str(out), "--models", model, "--batch-size", "1"])
    assert s["slices"] == N and s["with_metal"] == len(METAL_AT) and s["fmt"] == "dicom"
    derived = [pydicom.dcmread(out / n) for n in s["files"]]
    _check_derived(dss, derived, expected, hu)
    assert json.loads((out / "summary.json").read_text())["files"] == s["files"]


@pytest.mark.slow  # ~10 s more of Ray Data start-up for what the folder test covers but the NIfTI codec
def test_mar_study_nifti_in(ray_session, model, pacs_study, expected, tmp_path):
    from dudocrop.data.clinical import read_nifti
    from ray_jobs.mar_study import main

    _, hu = pacs_study
    nii = tmp_path / "v.nii.gz"
    nii.write_bytes(nifti_volume_bytes(hu, SPACING))
    s = main(["--input", str(nii), "--out", str(tmp_path / "nout"), "--models", model, "--batch-size", "1"])
    assert s["files"] == ["result.nii.gz"] and s["with_metal"] == len(METAL_AT)
    vol = read_nifti(str(tmp_path / "nout" / "result.nii.gz"))[0]
    np.testing.assert_allclose(vol, expected, atol=TOL_HU)


def test_mar_study_from_orthanc_with_store(ray_session, model, orthanc, pacs_study, expected, tmp_path,  # noqa: F811
                                          monkeypatch):
    from ray_jobs.mar_study import PASSWORD_ENV, main

    dss, hu = pacs_study
    study_uid = dss[0].StudyInstanceUID
    monkeypatch.setenv(PASSWORD_ENV, orthanc.auth[1])
    s = main(["--dicomweb", orthanc.dicomweb, "--study", study_uid, "--series", dss[0].SeriesInstanceUID,
              "--user", orthanc.auth[0], "--store", "--out", str(tmp_path / "out"), "--models", model,
              "--batch-size", "1"])
    assert s["stored"]["instances"] == N and s["stored"]["study"] == study_uid
    assert s["input"]["auth"] == "basic" and orthanc.auth[1] not in (tmp_path / "out" / "summary.json").read_text()
    c, series = _series(orthanc, study_uid)
    assert s["stored"]["series"] in series
    _check_derived(dss, list(c.iter_series(study_uid, s["stored"]["series"])), expected, hu)


def test_job_request_parsing_names_the_field_and_hides_credentials():
    """No PACS needed: the JSON body's refusals, and credentials kept out of repr and the public record."""
    from dudocrop.service.dicomweb import parse_job_request
    from dudocrop.service.inputs import InputError

    ok = {"url": "http://pacs:8042/dicom-web/", "study": "1.2.3", "series": None,
          "auth": {"type": "bearer", "token": "s3cret"}}
    ref, store = parse_job_request(json.dumps({"dicomweb": ok, "store": True}).encode())
    assert store and ref.url == "http://pacs:8042/dicom-web" and ref.auth.token == "s3cret"
    assert "s3cret" not in repr(ref) and "s3cret" not in json.dumps(ref.public())
    assert ref.public() == {"url": "http://pacs:8042/dicom-web", "study": "1.2.3", "series": None, "auth": "bearer"}
    bad = {b"[1]": "body:", json.dumps({"dicomweb": ok, "extra": 1}): "body: unknown field(s) ['extra']",
           json.dumps({"store": True}): "dicomweb: missing",
           json.dumps({"dicomweb": {**ok, "url": "ftp://x"}}): "dicomweb.url:",
           json.dumps({"dicomweb": {**ok, "study": "1." + "2" * 70}}): "dicomweb.study:",
           json.dumps({"dicomweb": {**ok, "series": 5}}): "dicomweb.series:",
           json.dumps({"dicomweb": {**ok, "auth": {"type": "digest"}}}): "dicomweb.auth.type:",
           json.dumps({"dicomweb": {**ok, "auth": {"type": "bearer", "token": ""}}}): "dicomweb.auth.token:"}
    for body, want in bad.items():
        with pytest.raises(InputError) as e:
            parse_job_request(body if isinstance(body, bytes) else body.encode())
        assert str(e.value).startswith(want) and e.value.status == 422, (body, str(e.value))


def test_only_the_listed_dicomweb_servers_are_reached():
    """``dicomweb_allow``: scheme, host and port must match and the path must lie under the entry's; ``*`` is any;
    empty is none (no PACS)."""
    from dudocrop.service.dicomweb import DicomwebRef, check_allowed
    from dudocrop.service.inputs import InputError

    allow = "http://pacs.example:8042/dicom-web, https://archive.example/wado"
    for url in ("http://pacs.example:8042/dicom-web", "http://PACS.example:8042/dicom-web/",
                "https://archive.example:443/wado/rs", "https://archive.example/wado"):
        check_allowed(DicomwebRef(url, "1.2"), allow)
    for url in ("http://pacs.example:8043/dicom-web", "https://pacs.example:8042/dicom-web",
                "http://pacs.example:8042/dicom-webx", "http://pacs.example:8042/", "http://archive.example/wado",
                "https://archive.example.evil/wado", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(InputError, match="dicomweb_allow") as e:
            check_allowed(DicomwebRef(url, "1.2"), allow)
        assert e.value.status == 403
    check_allowed(DicomwebRef("http://anything:1/x", "1.2"), "*")
    with pytest.raises(InputError, match="dicomweb_allow"):
        check_allowed(DicomwebRef("http://pacs.example:8042/dicom-web", "1.2"), "")
