"""The browser viewer (issue 22).

Preview routes (``serve/viewer.py``) over a job store filled here, served by the app's own FastAPI object under
uvicorn (no Ray): the binary format, the result's slice order (DICOM and NIfTI), 404 / 409 naming the job or
slice, no path from a URL to the file system, and the app's bearer-token auth. Then the page in a real headless
Chromium (Debian's ``chromium`` + ``chromium-driver`` driven by Selenium) against the Serve app with a tiny model and
a token: log in, upload a study with simulated metal artifacts, wait for the job, page through slices, switch
the window, read the canvases' pixels, download the result, no console errors, a screenshot
(``DUDOCROP_SCREENSHOT=path`` saves it there too: ``docs/viewer.png`` was made so).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
import zipfile

import numpy as np
import pydicom
import pytest

from tests.serve_fixtures import (
    METAL_HU,
    artifact_study,
    dicom_bytes,
    nifti_volume_bytes,
    phantom,
    study,
    tiny_model_folder,
)

requests = pytest.importorskip("requests")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "viewer-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- preview routes on the app's FastAPI object, without Ray ---------------------------------------------------------
@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """``serve.app.api`` under uvicorn in a thread, its job store in a temporary folder: (url, store)."""
    import uvicorn

    from dudocrop.service.jobs import JobStore
    from serve.app import api

    store = JobStore(str(tmp_path_factory.mktemp("viewer-jobs")))
    api.state.job_store, api.state.token = store, None
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        assert time.time() - t0 < 30 and th.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", store
    server.should_exit = True
    th.join(10)
    api.state.job_store = api.state.token = None


def _hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _npy(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    a = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert a.dtype == np.dtype("<i2")
    return a


def test_page_and_static_files_and_no_path_from_a_url(bare):
    url, _ = bare
    r = requests.get(url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="static/viewer.js"' in r.text and "NOT FOR DIAGNOSTIC USE" in r.text
    js = requests.get(url + "/static/viewer.js", timeout=30)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "https://" not in js.text and "http://" not in js.text.replace("http://pacs", "")  # nothing remote
    assert requests.get(url + "/static/viewer.css", timeout=30).status_code == 200
    for bad in ("/static/..%2Fapp.py", "/static/%2e%2e%2fviewer.py", "/static/index.html", "/static/__init__.py"):
        r = requests.get(url + bad, timeout=30)
        assert r.status_code == 404, (bad, r.status_code)
    assert requests.get(url + "/viewer/config", timeout=30).json() == {"auth_required": False}


def test_dicom_previews_in_result_order_int16_and_errors(bare):
    from dudocrop.service.inputs import decode_study

    url, store = bare
    dss = study(5, (1, 3))
    order = [3, 0, 4, 1, 2]  # uploaded out of order: previews follow the result (along the slice normal)
    job = store.create(decode_study([(f"f{i}.dcm", dicom_bytes(dss[i])) for i in order]), {
        "with_metal": 2, "model_version": "test@0", "params": {"steps": 1, "k": 0.5, "alpha": 0.5, "beta": 0.5}})
    for i in range(4):
        corrected = _hu(dss[i]) - 100.0
        if i == 3:
            corrected[0, 0] = 1e6  # beyond int16: clipped, not wrapped
        store.put_slice(job, i, corrected, 7 * (i in (1, 3)))
    meta = requests.get(f"{url}/v1/jobs/{job}/slices", timeout=30).json()
    assert (meta["total"], meta["rows"], meta["cols"], meta["fmt"]) == (5, 64, 64, "dicom")
    assert meta["spacing_mm"] == [6.25, 6.25] and meta["finished"] == [0, 1, 2, 3]
    assert meta["positions_mm"] == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert [v >= METAL_HU for v in meta["max_hu"]] == [False, True, False, True, False]
    for i in range(4):
        r = requests.get(f"{url}/v1/jobs/{job}/slices/{i}", timeout=30)
        a = _npy(r)
        assert a.shape == (2, 64, 64) and r.headers["X-Metal-Pixels"] == str(7 * (i in (1, 3)))
        np.testing.assert_array_equal(a[0], _hu(dss[i]))
        want = _hu(dss[i]) - 100
        if i == 3:
            want[0, 0] = 32767
        np.testing.assert_array_equal(a[1], want)
    r = requests.get(f"{url}/v1/jobs/{job}/slices/4", timeout=30)
    assert r.status_code == 409 and "slice 4 is not finished" in r.json()["detail"] and job in r.json()["detail"]
    for bad in ("5", "-1"):
        r = requests.get(f"{url}/v1/jobs/{job}/slices/{bad}", timeout=30)
        assert r.status_code == 404 and f"no slice {bad}" in r.json()["detail"]
    assert requests.get(f"{url}/v1/jobs/{job}/slices/x", timeout=30).status_code == 422
    for path in ("/v1/jobs/" + "0" * 32 + "/slices", "/v1/jobs/" + "0" * 32 + "/slices/0",
                 "/v1/jobs/..%5C..%5Cjobs/slices", "/v1/jobs/nope/slices/0"):
        r = requests.get(url + path, timeout=30)
        assert r.status_code == 404 and "no job" in r.json()["detail"], (path, r.status_code)
    assert requests.get(url + "/v1/jobs/..%2F..%2Fjobs/slices", timeout=30).status_code == 404
    # the previews are in the order of the result series: finish, write the result, compare instance by instance
    store.put_slice(job, 4, _hu(dss[4]), 0)
    study_ = store.load_study(job)
    store.finalize(job, study_)
    zf = zipfile.ZipFile(io.BytesIO(store.result(job)))
    outs = [pydicom.dcmread(io.BytesIO(zf.read(n))) for n in sorted(zf.namelist())]
    for i, o in enumerate(outs):
        a = _npy(requests.get(f"{url}/v1/jobs/{job}/slices/{i}", timeout=30))
        assert o.SourceImageSequence[0].ReferencedSOPInstanceUID == dss[i].SOPInstanceUID
        ok = _hu(o) < 31000  # the DICOM result clips its own way at its int16 range (intercept -1024)
        assert ok.sum() >= 4095
        np.testing.assert_allclose(a[1][ok], _hu(o)[ok], atol=1)
    store.cancel(job)  # a finished job keeps its previews
    assert requests.get(f"{url}/v1/jobs/{job}/slices/0", timeout=30).status_code == 200


def test_nifti_previews_and_cancelled_job(bare, tmp_path):
    from dudocrop.service.inputs import decode_study

    url, store = bare
    vol = np.stack([phantom(metal=i == 1, shift_mm=3.0 * i) for i in range(3)])
    st = decode_study([("v.nii.gz", nifti_volume_bytes(vol, 6.25))])
    job = store.create(st, {"with_metal": 1, "model_version": "test@0", "params": {}})
    for i in range(3):
        store.put_slice(job, i, vol[i] + 10 * i, int(i == 1))
    meta = requests.get(f"{url}/v1/jobs/{job}/slices", timeout=30).json()
    assert meta["fmt"] == "nifti" and meta["positions_mm"] == [0.0, 2.5, 5.0] and meta["spacing_mm"] == [6.25, 6.25]
    for i in range(3):
        a = _npy(requests.get(f"{url}/v1/jobs/{job}/slices/{i}", timeout=30))
        np.testing.assert_array_equal(a[0], vol[i])
        np.testing.assert_array_equal(a[1], vol[i] + 10 * i)
    store.finalize(job, store.load_study(job))  # the result volume holds the previews' slices in their order
    from dudocrop.data.clinical import read_nifti

    path = os.path.join(str(tmp_path), "r.nii.gz")
    with open(path, "wb") as f:
        f.write(store.result(job))
    np.testing.assert_allclose(read_nifti(path)[0], vol + 10 * np.arange(3)[:, None, None])
    job2 = store.create(decode_study([("a.dcm", dicom_bytes(study(1, ())[0]))]), {"model_version": "t", "params": {}})
    store.cancel(job2)
    for path in (f"/v1/jobs/{job2}/slices", f"/v1/jobs/{job2}/slices/0"):
        r = requests.get(url + path, timeout=30)
        assert r.status_code == 409 and "cancelled" in r.json()["detail"] and job2 in r.json()["detail"]


def test_previews_take_the_apps_bearer_token(bare):
    from dudocrop.service.inputs import decode_study
    from serve.app import api

    url, store = bare
    job = store.create(decode_study([("a.dcm", dicom_bytes(study(1, ())[0]))]), {"model_version": "t", "params": {}})
    store.put_slice(job, 0, np.zeros((64, 64), np.float32), 0)
    api.state.token = "s3cret"
    try:
        assert requests.get(url + "/viewer/config", timeout=30).json() == {"auth_required": True}
        assert requests.get(url + "/", timeout=30).status_code == 200  # the page holds no data
        for path in (f"/v1/jobs/{job}/slices", f"/v1/jobs/{job}/slices/0"):
            for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = requests.get(url + path, headers=hdr, timeout=30)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (path, hdr)
            assert requests.get(url + path, headers={"Authorization": "Bearer s3cret"}, timeout=30).status_code == 200
    finally:
        api.state.token = None
