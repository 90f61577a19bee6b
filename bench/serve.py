"""Service benchmark: the MAR service (serve/) on this machine, a tiny model on CPU, real HTTP on localhost.

    python bench/serve.py --json                         # tiny untrained model built here, CPU
    python bench/serve.py --json --model outputs/train_all/models --out outputs/bench_serve

Measures, with an asyncio HTTP client (aiohttp; every phase bounded in requests and seconds):

* ``/v1/mar`` latency p50 / p95 and throughput at 1, 4 and 16 concurrent clients (one metal slice per request,
  so every request reaches the model deployment and its ``@serve.batch``), and the errors (non-200 answers);
* a job of 64 DICOM slices of which 8 hold metal: seconds to done, and the seconds the 56 metal-free slices
  would have cost at the job's own pace per metal slice (they are answered without diffusion);
* the model deployment's replica count over time while the load rises (1 -> 4 -> 16 clients) and falls (idle),
  saved as a PNG. The bench's autoscaling delays are short (``--upscale-delay``, ``--downscale-delay``) so the
  cycle fits in a minute or two; serve/config.yaml keeps production delays.

Timings come from untrained networks of the stated architecture (cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

APP = "dudocrop-bench"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--model", help="model folder / MLflow URI (default: a tiny untrained model built here)")
    ap.add_argument("--out", default="outputs/bench_serve", help="folder for serve_bench.json and the PNG")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends per phase")
    ap.add_argument("--phase-timeout", type=float, default=180.0, help="seconds a load phase may take at most")
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--upscale-delay", type=float, default=3.0)
    ap.add_argument("--downscale-delay", type=float, default=10.0)
    ap.add_argument("--job-slices", type=int, default=64)
    ap.add_argument("--job-metal", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=4, help="@serve.batch size (1: no batching)")
    return ap.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReplicaSampler(threading.Thread):
    """The model deployment's RUNNING replicas every ``period`` seconds (serve.status())."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.samples, self.phase, self._halt = period, [], "start", threading.Event()
        self.t0 = time.time()

    def run(self):
        from ray import serve

        while not self._halt.is_set():
            try:
                dep = serve.status().applications[APP].deployments["MARModel"]
                n = int(dep.replica_states.get("RUNNING", 0))
            except Exception:  # noqa: BLE001 - the app may still be deploying
                n = 0
            self.samples.append((round(time.time() - self.t0, 2), n, self.phase))
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join()


async def _load(url: str, body: bytes, clients: int, per_client: int, timeout: float) -> dict:
    import aiohttp

    lat, errors = [], {}
    deadline = time.time() + timeout

    async def client(session):
        for _ in range(per_client):
            if time.time() > deadline:
                return
            t = time.perf_counter()
            try:
                async with session.post(url + "/v1/mar", data=body,
                                        headers={"Content-Type": "application/octet-stream"}) as r:
                    await r.read()
                    status = r.status
            except Exception as e:  # noqa: BLE001 - counted as an error
                status = type(e).__name__
            if status == 200:
                lat.append(time.perf_counter() - t)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    t0 = time.perf_counter()
    timeout_cfg = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=timeout_cfg) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"clients": clients, "requests": len(lat) + sum(errors.values()), "ok": len(lat),
            "errors": sum(errors.values()), "error_kinds": errors,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
            "throughput_rps": round(len(lat) / wall, 3), "seconds": round(wall, 2)}


def _job(url: str, n: int, metal: int) -> dict:
    import requests

    from tests.serve_fixtures import dicom_bytes, study, wait_for_job

    metal_at = tuple(int(i) for i in np.linspace(0, n - 1, metal).round())
    dss = study(n, metal_at)
    files = [("files", (f"{i}.dcm", dicom_bytes(d), "application/dicom")) for i, d in enumerate(dss)]
    t0 = time.time()
    r = requests.post(url + "/v1/jobs", files=files, timeout=300)
    r.raise_for_status()
    jid = r.json()["id"]
    st = wait_for_job(url, jid, timeout=3600, poll=0.25)
    dt = time.time() - t0
    res = requests.get(f"{url}/v1/jobs/{jid}/result", timeout=120)
    per_metal = dt / max(1, st["with_metal"])
    return {"slices": n, "with_metal": st["with_metal"], "state": st["state"], "seconds": round(dt, 2),
            "result_bytes": len(res.content),
            "saved_seconds_estimate": round((n - st["with_metal"]) * per_metal, 1),
            "saved_how": "metal-free slices x the job's own seconds per metal slice (they skip diffusion)"}


def _plot(samples, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from dudocrop.atomic import atomic_open

    t = [s[0] for s in samples]
    n = [s[1] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.step(t, n, where="post", color="C0")
    last = None
    for ti, _, ph in samples:
        if ph != last:
            ax.axvline(ti, color="0.8", lw=0.8)
            ax.text(ti, max(n) + 0.15, ph, fontsize=7, rotation=90, va="bottom")
            last = ph
    ax.set_xlabel("seconds")
    ax.set_ylabel("model replicas (RUNNING)")
    ax.set_ylim(0, max(n) + 1.2)
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title("serve autoscaling under rising and falling load (bench/serve.py)")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from dudocrop.atomic import write_json
    from serve.app import app_with
    from tests.serve_fixtures import npy_bytes, phantom, tiny_model_folder

    tmp = tempfile.mkdtemp(prefix="dudocrop-bench-serve-")
    model = a.model or tiny_model_folder(os.path.join(tmp, "model"), steps=a.steps)
    ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    autoscaling = {"min_replicas": 1, "max_replicas": a.max_replicas, "initial_replicas": 1,
                   "target_ongoing_requests": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
                   "upscale_delay_s": a.upscale_delay, "downscale_delay_s": a.downscale_delay}
    app = app_with({"model_uri": model, "store": os.path.join(tmp, "jobs"),
                     "max_batch_size": a.max_batch_size},
                    model_options={"autoscaling_config": autoscaling, "max_ongoing_requests": 8,
                                   "max_queued_requests": 256, "ray_actor_options": {"num_cpus": 1}},
                    ingress_options={"ray_actor_options": {"num_cpus": 0.25}})
    t0 = time.time()
    serve.run(app, name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    startup = time.time() - t0
    sampler = ReplicaSampler()
    sampler.start()
    body = npy_bytes(phantom())
    import requests

    health = requests.get(url + "/healthz", timeout=120).json()
    out = {"device": health["device"], "precision": health["precision"], "steps": health["steps"],
           "model": "tiny untrained (tests/serve_fixtures.py)" if not a.model else a.model,
           "max_batch_size": a.max_batch_size, "cpu_count": os.cpu_count(), "serve_run_seconds": round(startup, 1),
           "load_average_1min": round(os.getloadavg()[0], 1), "phases": []}
    try:
        for c in (int(x) for x in a.clients.split(",")):
            sampler.phase = f"{c} clients"
            out["phases"].append(asyncio.run(_load(url, body, c, a.requests_per_client, a.phase_timeout)))
        sampler.phase = "job"
        out["job"] = _job(url, a.job_slices, a.job_metal)
        sampler.phase = "idle"
        t_idle = time.time()
        while time.time() - t_idle < a.downscale_delay + 60:
            if sampler.samples and sampler.samples[-1][1] <= 1 and time.time() - t_idle > a.downscale_delay:
                break
            time.sleep(1.0)
    finally:
        sampler.stop()
        serve.shutdown()
        ray.shutdown()
    counts = [s[1] for s in sampler.samples]
    out["replicas"] = {"min": min(counts), "max": max(counts), "last": counts[-1],
                       "timeline": sampler.samples[:: max(1, len(sampler.samples) // 200)]}
    out["errors_total"] = sum(p["errors"] for p in out["phases"])
    os.makedirs(a.out, exist_ok=True)
    png = os.path.join(a.out, "serve_replicas.png")
    _plot(sampler.samples, png)
    out["png"] = png
    write_json(os.path.join(a.out, "serve_bench.json"), out)
    if a.json:
        print(json.dumps({k: v for k, v in out.items() if k != "replicas"} | {
            "replicas": {k: v for k, v in out["replicas"].items() if k != "timeline"}}, indent=1))
    else:
        for p in out["phases"]:
            print(f"{p['clients']:>3} clients: p50 {p['p50_ms']} ms, p95 {p['p95_ms']} ms, "
                  f"{p['throughput_rps']} req/s, {p['errors']} errors")
        print(f"job: {out['job']}")
        print(f"replicas: {out['replicas']['min']} -> {out['replicas']['max']} -> {out['replicas']['last']} ({png})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
