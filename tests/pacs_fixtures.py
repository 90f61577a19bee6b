"""A real PACS for the tests: Orthanc (Debian ``orthanc``) with its DICOMweb plugin (``orthanc-dicomweb``) on
127.0.0.1, its storage in a temporary folder, HTTP basic auth on (one user), started per test module.

    from tests.pacs_fixtures import orthanc  # noqa: F401 - the fixture

Skips with the reason when the ``Orthanc`` binary or the plugin is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

#: where Debian's orthanc-dicomweb puts the plugin (``dpkg -L orthanc-dicomweb``).
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*")
USER, PASSWORD = "mar", "pacs-test-secret"


@dataclass
class Orthanc:
    url: str  # REST root
    dicomweb: str  # DICOMweb root
    auth: tuple[str, str]

    @property
    def auth_json(self) -> dict:
        """The ``auth`` object of a job request for this server."""
        return {"type": "basic", "username": self.auth[0], "password": self.auth[1]}

    def get(self, path: str):
        import requests

        r = requests.get(self.url + path, auth=self.auth, timeout=60)
        r.raise_for_status()
        return r.json()

    def upload(self, blobs: list[bytes]) -> list[str]:
        """DICOM files into Orthanc with its REST ``POST /instances``; their Orthanc ids."""
        import requests

        ids = []
        for b in blobs:
            r = requests.post(self.url + "/instances", data=b, auth=self.auth, timeout=60)
            r.raise_for_status()
            ids.append(r.json()["ID"])
        return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> tuple[str | None, str | None]:
    plugin = next((p for g in PLUGIN_GLOBS for p in sorted(glob.glob(g))), None)
    return shutil.which("Orthanc") or (os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None, plugin


def start_orthanc(folder: str, users: dict[str, str] | None = None, timeout_s: float = 60.0):
    """``Orthanc <folder>/orthanc.json`` on free ports; returns (process, Orthanc) once ``/system`` answers."""
    import requests

    exe, plugin = orthanc_binary()
    if exe is None or plugin is None:
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    os.makedirs(folder, exist_ok=True)
    http, dicom = _free_port(), _free_port()
    cfg = {"Name": "dudocrop-test", "StorageDirectory": os.path.join(folder, "db"),
           "IndexDirectory": os.path.join(folder, "db"), "HttpPort": http, "DicomPort": dicom,
           "HttpBindAddress": "127.0.0.1", "RemoteAccessAllowed": False, "DicomServerEnabled": False,
           "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
           "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
           "StableAge": 1, "ConcurrentJobs": 1, "HttpThreadsCount": 8}
    path = os.path.join(folder, "orthanc.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    log = open(os.path.join(folder, "orthanc.log"), "wb")
    proc = subprocess.Popen([exe, path], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    auth = next(iter(users.items())) if users else ("", "")
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            log.close()
            with open(os.path.join(folder, "orthanc.log"), errors="replace") as f:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}: {f.read()[-2000:]}")
        try:
            if requests.get(url + "/system", auth=auth, timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.time() - t0 > timeout_s:
            proc.kill()
            raise RuntimeError(f"Orthanc did not answer {url}/system within {timeout_s} s")
        time.sleep(0.2)
    log.close()
    return proc, Orthanc(url, url + "/dicom-web", auth)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """One Orthanc per test module, basic auth on (user ``mar``)."""
    proc, server = start_orthanc(str(tmp_path_factory.mktemp("orthanc")), {USER: PASSWORD})
    yield server
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
