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
    ct_study,
    dicom_bytes,
    metal_volume,
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
        store.put_slice(job, i, corrected, 7 * (i in (1, 3)), 1.2345 if i == 1 else None)
    meta = requests.get(f"{url}/v1/jobs/{job}/slices", timeout=30).json()
    assert (meta["total"], meta["rows"], meta["cols"], meta["fmt"]) == (5, 64, 64, "dicom")
    assert meta["spacing_mm"] == [6.25, 6.25] and meta["finished"] == [0, 1, 2, 3]
    assert meta["positions_mm"] == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert [v >= METAL_HU for v in meta["max_hu"]] == [False, True, False, True, False]
    for i in range(4):
        r = requests.get(f"{url}/v1/jobs/{job}/slices/{i}", timeout=30)
        a = _npy(r)
        assert a.shape == (2, 64, 64) and r.headers["X-Metal-Pixels"] == str(7 * (i in (1, 3)))
        assert r.headers.get("X-Consistency") == ("1.234" if i == 1 else None)
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


# ---- the page in a real browser against the Serve app ------------------------------------------------------------
@pytest.fixture(scope="module")
def svc_token(ray_session, tmp_path_factory, monkeypatch_module):
    """The Serve app (tiny untrained model, 1 step; ``DUDOCROP_VIEWER_MODEL`` names another model folder, e.g. a
    trained one for the README's screenshot) with a bearer token: its URL."""
    from ray import serve

    from serve.app import app_with

    root = tmp_path_factory.mktemp("viewer-serve")
    model = os.environ.get("DUDOCROP_VIEWER_MODEL") or tiny_model_folder(str(root / "model"), steps=1)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    monkeypatch_module.setenv("DUDOCROP_SERVE_TOKEN", TOKEN)
    app = app_with({"model_uri": model, "store": str(root / "jobs"), "max_batch_size": 4, "job_concurrency": 4},
                   model_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                   ingress_options={"ray_actor_options": {"num_cpus": 0.1}})
    serve.run(app, name="dudocrop-viewer-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete("dudocrop-viewer-test")
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _chrome(download_dir: str):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip: the dev extra)")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} is absent: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1000",
              "--force-device-scale-factor=1", "--disable-extensions", "--no-first-run"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": download_dir,
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)  # no Selenium Manager
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": download_dir})
    return driver


def _canvas(driver, name: str) -> np.ndarray:
    """The RGBA pixels on a canvas, (rows, cols, 4) uint8, as the page drew them."""
    data = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return [c.height, c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];",
        "cv-" + name)
    return np.asarray(data[2], np.uint8).reshape(data[0], data[1], 4)


def _gray(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    return np.clip(np.round((hu - (level - width / 2)) / width * 255), 0, 255)


def test_browser_upload_progress_slices_windows_download(svc_token, tmp_path):
    """Headless Chromium: token, upload, job, slider, wheel, keys, window presets, canvas pixels, download."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = svc_token
    n = int(os.environ.get("DUDOCROP_VIEWER_SLICES", "6"))  # 32: the end-to-end measurement
    metal_at = tuple(range(n // 3, n // 3 + max(2, n // 4)))
    s = metal_at[len(metal_at) // 2]
    dss = ct_study(metal_volume(n, metal_at, seed=2), 6.25)
    paths = []
    for i, d in enumerate(dss):
        p = tmp_path / f"ct{i:02d}.dcm"
        p.write_bytes(dicom_bytes(d))
        paths.append(str(p))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    t0 = time.time()
    driver = _chrome(str(downloads))
    try:
        wait = WebDriverWait(driver, 240, poll_frequency=0.2)
        driver.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "auth-panel").is_displayed())  # the app has a token: asked
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#auth-form button").click()
        driver.find_element(By.ID, "files").send_keys("\n".join(reversed(paths)))
        driver.find_element(By.ID, "upload").click()
        t_click = time.time()
        wait.until(lambda d: d.find_element(By.ID, "cv-corrected").get_attribute("data-slice") is not None)
        shown_s = time.time() - t_click
        job = driver.find_element(By.ID, "job-id").text
        assert len(job) == 32
        prog = driver.find_element(By.ID, "progress")
        assert prog.get_attribute("value") == prog.get_attribute("max") == str(n)
        assert driver.find_element(By.ID, "job-text").text.startswith(
            f"done · {n}/{n} slices ({len(metal_at)} with metal)")
        slider = driver.find_element(By.ID, "slice")
        # it opens on the middle slice with metal, in the paper's window [-175, 275] HU
        assert slider.get_attribute("value") == str(s) and slider.get_attribute("max") == str(n - 1)
        cv = driver.find_element(By.ID, "cv-corrected")
        assert cv.get_attribute("data-window") == "450,50"

        def shown(i):
            wait.until(lambda d: all(d.find_element(By.ID, f"cv-{k}").get_attribute("data-slice") == str(i)
                                     for k in ("original", "corrected", "difference")))

        shown(s)
        hdr = {"Authorization": f"Bearer {TOKEN}"}
        pre = np.load(io.BytesIO(requests.get(f"{url}/v1/jobs/{job}/slices/{s}", headers=hdr, timeout=30).content))
        orig, corr = _canvas(driver, "original"), _canvas(driver, "corrected")
        outline = (orig[..., 0] == 255) & (orig[..., 1] == 40)  # the metal outline (red)
        metal = pre[0] >= 2500
        assert outline.any() and (outline <= metal).all()  # outlined pixels are metal pixels
        gray = ~outline
        # the canvases are the previews windowed to [-175, 275] HU (to one grey level), and the slice is corrected
        np.testing.assert_allclose(orig[..., 1][gray], _gray(pre[0], 450, 50)[gray], atol=1)
        np.testing.assert_allclose(corr[..., 1][gray], _gray(pre[1], 450, 50)[gray], atol=1)
        assert (np.abs(orig[..., 1].astype(int) - corr[..., 1]) > 8)[gray].sum() > 50, "no visible correction"
        shot = tmp_path / "viewer.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("DUDOCROP_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["DUDOCROP_SCREENSHOT"])

        slider.send_keys(Keys.ARROW_LEFT)  # the slider moves one slice
        shown(s - 1)
        assert "metal pixels" in driver.find_element(By.ID, "slice-text").text
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(cv), 0, 120).perform()  # wheel: next
        shown(s)
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)  # arrow key: next
        shown(s + 1)
        assert ("metal pixels" if s + 1 in metal_at else "no metal") in driver.find_element(By.ID, "slice-text").text

        def jump(i):
            driver.execute_script("const s = document.getElementById('slice'); s.value = arguments[0];"
                                  "s.dispatchEvent(new Event('input'));", i)
            shown(i)

        jump(n - 1)
        assert "no metal: passed through" in driver.find_element(By.ID, "slice-text").text
        o4, c4 = _canvas(driver, "original"), _canvas(driver, "corrected")
        np.testing.assert_array_equal(o4, c4)  # a metal-free slice comes back as it went in
        jump(s)
        before = _canvas(driver, "corrected")
        Select(driver.find_element(By.ID, "preset")).select_by_value("bone")
        wait.until(lambda d: d.find_element(By.ID, "cv-corrected").get_attribute("data-window") == "1800,400")
        after = _canvas(driver, "corrected")
        assert (before[..., 1] != after[..., 1]).sum() > 500  # the window switch changed the pixels
        np.testing.assert_allclose(after[..., 1][gray], _gray(pre[1], 1800, 400)[gray], atol=1)
        ww = driver.find_element(By.ID, "ww")
        ww.clear()
        ww.send_keys("1000")
        wait.until(lambda d: d.find_element(By.ID, "cv-corrected").get_attribute("data-window") == "1000,400")
        assert Select(driver.find_element(By.ID, "preset")).first_selected_option.get_attribute("value") == "custom"

        driver.find_element(By.ID, "download").click()
        got = downloads / f"{job}-result.zip"
        wait.until(lambda d: got.exists())
        zf = zipfile.ZipFile(got)
        assert len(zf.namelist()) == n
        out = pydicom.dcmread(io.BytesIO(zf.read(sorted(zf.namelist())[s])))
        np.testing.assert_allclose(_hu(out), pre[1], atol=1)  # the download is what the viewer showed

        # a NIfTI volume through the same form: a new job, its slices in the volume's order
        vol = np.stack([_hu(d) for d in dss[:3]])  # read_nifti's view of the file below
        nii = tmp_path / "vol.nii.gz"
        nii.write_bytes(nifti_volume_bytes(vol, 6.25))
        driver.execute_script("document.getElementById('files').value = '';")
        driver.find_element(By.CSS_SELECTOR, "#start > summary").click()
        driver.find_element(By.ID, "files").send_keys(str(nii))
        driver.find_element(By.ID, "upload").click()
        wait.until(lambda d: d.find_element(By.ID, "job-id").text not in ("", job))
        shown(2)  # the one metal slice of the three
        job2 = driver.find_element(By.ID, "job-id").text
        assert driver.find_element(By.ID, "slice").get_attribute("max") == "2"
        pre2 = np.load(io.BytesIO(requests.get(f"{url}/v1/jobs/{job2}/slices/2", headers=hdr, timeout=30).content))
        np.testing.assert_array_equal(pre2[0], np.rint(vol[2]))
        o2 = _canvas(driver, "original")
        gray2 = ~((o2[..., 0] == 255) & (o2[..., 1] == 40))
        assert (~gray2).any()  # metal outlined
        w, lev = map(float, driver.find_element(By.ID, "cv-original").get_attribute("data-window").split(","))
        assert (w, lev) == (1000, 400)  # the window chosen above stays across jobs
        np.testing.assert_allclose(o2[..., 1][gray2], _gray(vol[2], w, lev)[gray2], atol=1)

        # the PACS form posts the contract's JSON (fetch stubbed here: the PACS half is tested with Orthanc)
        driver.execute_script(
            "window._posted = []; const real = window.fetch; window.fetch = (u, o) => {"
            "  if (o && o.method === 'POST') { const h = new Headers(o.headers);"
            "    window._posted.push([String(u), h.get('content-type'), h.get('authorization'), o.body]);"
            "    return Promise.resolve(new Response(JSON.stringify({detail: 'stub refused'}), {status: 400})); }"
            "  return real(u, o); };")
        driver.find_element(By.CSS_SELECTOR, "#start > summary").click()
        driver.find_element(By.CSS_SELECTOR, "#start details > summary").click()  # the parameters
        for fid, v in (("pacs-url", "http://pacs.example:8042/dicom-web"), ("pacs-study", "1.2.3"),
                       ("pacs-user", "u"), ("pacs-pass", "p"), ("p-steps", "3")):
            if fid == "pacs-user":
                Select(driver.find_element(By.ID, "pacs-auth")).select_by_value("basic")
            driver.find_element(By.ID, fid).send_keys(v)
        driver.find_element(By.ID, "pacs-store").click()  # off
        driver.find_element(By.ID, "pacs-go").click()
        wait.until(lambda d: d.find_element(By.ID, "message").is_displayed())
        assert "stub refused" in driver.find_element(By.ID, "message").text
        (u, ctype, auth, body), = driver.execute_script("return window._posted")
        assert u.startswith("v1/jobs?") and "steps=3" in u and "seed=0" in u
        assert ctype == "application/json" and auth == f"Bearer {TOKEN}"
        import json

        assert json.loads(body) == {"dicomweb": {"url": "http://pacs.example:8042/dicom-web", "study": "1.2.3",
                                                 "series": None,
                                                 "auth": {"type": "basic", "username": "u", "password": "p"}},
                                    "store": False}

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
    st = requests.get(f"{url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    print(f"browser test: {n} slices ({len(metal_at)} with metal): upload click to slices on screen {shown_s:.1f} s, "
          f"job {st['elapsed_s']:.1f} s, whole test {time.time() - t0:.1f} s")
