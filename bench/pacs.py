"""PACS round-trip benchmark (issue 22): a 32-slice CT study with metal in a local Orthanc (DICOMweb plugin),
corrected end to end on CPU with the tiny model, twice:

* the Serve app: ``POST /v1/jobs`` naming the study (WADO-RS retrieve) with ``store: true`` -> job done and the
  derived series stored back with STOW-RS (seconds from the POST to ``stored`` on the job);
* ``ray_jobs/mar_study.py --dicomweb ... --store`` (Ray Data over the slices, no endpoint), in this process.

    python bench/pacs.py --json                       # tiny untrained model built here, CPU, 32 slices, 8 with metal
    python bench/pacs.py --json --slices 32 --metal 8 --steps 1 --out outputs/bench_pacs

Needs Debian's ``orthanc`` and ``orthanc-dicomweb``. The study is ``tests/serve_fixtures.metal_volume`` (a
patient-like body scanned with the project's simulator, an implant through ``--metal`` middle slices). Timings
come from untrained networks of the tiny architecture (cost does not depend on the weights); both runs check
in Orthanc that the new series holds one instance per input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--out", default="outputs/bench_pacs", help="folder for pacs_bench.json")
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--metal", type=int, default=8, help="slices the implant runs through (the middle ones)")
    ap.add_argument("--steps", type=int, default=1, help="sampler steps of the tiny model")
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--job-concurrency", type=int, default=4)
    return ap.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instances(orthanc, study: str, series: str) -> int:
    from dudocrop.service.dicomweb import DicomwebRef, client, parse_ref

    auth = parse_ref({"url": orthanc.dicomweb, "study": study, "auth": orthanc.auth_json}).auth
    c = client(DicomwebRef(orthanc.dicomweb, study, auth=auth))
    return len(c.search_for_instances(study_instance_uid=study, series_instance_uid=series))


def main(argv=None) -> dict:
    a = parse_args(argv)
    import ray
    import requests
    import torch
    from ray import serve

    from ray_jobs import mar_study
    from serve.app import app_with
    from tests.pacs_fixtures import PASSWORD, USER, orthanc_binary, start_orthanc
    from tests.serve_fixtures import ct_study, dicom_bytes, metal_volume, tiny_model_folder, wait_for_job

    if None in orthanc_binary():
        raise SystemExit("bench/pacs.py needs Orthanc and its DICOMweb plugin (Debian: orthanc orthanc-dicomweb)")
    tmp = tempfile.mkdtemp(prefix="dudocrop-bench-pacs-")
    model = tiny_model_folder(os.path.join(tmp, "model"), steps=a.steps)
    lo = (a.slices - a.metal) // 2
    t = time.perf_counter()
    vol = metal_volume(a.slices, tuple(range(lo, lo + a.metal)), seed=1)
    dss = ct_study(vol, 6.25)
    build_s = time.perf_counter() - t
    proc, orthanc = start_orthanc(os.path.join(tmp, "orthanc"), {USER: PASSWORD})
    out: dict = {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_avg_1min_at_start": round(os.getloadavg()[0], 2), "slices": a.slices, "with_metal": a.metal,
                 "steps": a.steps, "model": "tiny, untrained (tests/serve_fixtures.tiny_model_folder)",
                 "study_build_s": round(build_s, 2)}
    try:
        t = time.perf_counter()
        orthanc.upload([dicom_bytes(d) for d in dss])
        out["upload_s"] = round(time.perf_counter() - t, 2)
        study, series = dss[0].StudyInstanceUID, dss[0].SeriesInstanceUID
        ref = {"url": orthanc.dicomweb, "study": study, "series": series, "auth": orthanc.auth_json}

        ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_with({"model_uri": model, "store": os.path.join(tmp, "jobs"), "max_batch_size": a.max_batch_size,
                        "job_concurrency": a.job_concurrency},
                       model_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                       ingress_options={"ray_actor_options": {"num_cpus": 0.1}})
        serve.run(app, name="bench-pacs", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        t = time.perf_counter()
        r = requests.post(url + "/v1/jobs", json={"dicomweb": ref, "store": True}, timeout=600)
        r.raise_for_status()
        accepted = time.perf_counter() - t
        st = wait_for_job(url, r.json()["id"], timeout=3600, poll=0.2)
        total = time.perf_counter() - t
        stored = st.get("stored") or {}
        out["serve_job"] = {"state": st["state"], "seconds_end_to_end": round(total, 2),
                            "seconds_to_202": round(accepted, 2), "job_elapsed_s": st["elapsed_s"],
                            "stored_instances": stored.get("instances"), "store_error": st.get("store_error"),
                            "in_orthanc": _instances(orthanc, study, stored["series"]) if stored else 0,
                            "how": "POST /v1/jobs (WADO-RS retrieve) -> 202 -> done with STOW-RS store, "
                                   f"max_batch_size {a.max_batch_size}, job_concurrency {a.job_concurrency}"}
        serve.delete("bench-pacs")
        serve.shutdown()

        os.environ[mar_study.PASSWORD_ENV] = PASSWORD
        t = time.perf_counter()
        s = mar_study.run(mar_study.parse_args(
            ["--dicomweb", orthanc.dicomweb, "--study", study, "--series", series, "--user", USER, "--store",
             "--out", os.path.join(tmp, "mar_study"), "--models", model, "--batch-size", str(a.max_batch_size)]),
            log=lambda m: print(m, file=sys.stderr))
        out["mar_study"] = {"seconds_end_to_end": round(time.perf_counter() - t, 2), "phases_s": s["seconds"],
                            "stored_instances": (s.get("stored") or {}).get("instances"),
                            "store_error": s.get("store_error"),
                            "in_orthanc": _instances(orthanc, study, s["stored"]["series"]) if "stored" in s else 0,
                            "how": "ray_jobs/mar_study.py --dicomweb --store in this process: WADO-RS, Ray Data "
                                   f"map_batches (1 actor, batch {a.max_batch_size}, actor start-up included), "
                                   "STOW-RS"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    from dudocrop.atomic import write_json

    write_json(os.path.join(a.out, "pacs_bench.json"), out)
    print(json.dumps(out, indent=1) if a.json else
          f"serve job {out['serve_job']['seconds_end_to_end']} s, mar_study {out['mar_study']['seconds_end_to_end']} s")
    return out


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
