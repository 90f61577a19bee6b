"""``python -m serve``: the MAR service on this machine (binds 127.0.0.1 unless ``--host`` says otherwise).

    python -m serve --model outputs/train_all/models            # the model train_all just trained, CPU
    python -m serve --model models:/dudocrop/3 --device cuda --steps 100 --max-batch-size 8

Every option falls back to its ``DUDOCROP_*`` environment variable (serve/settings.py), then the default; the
deployment options (replicas, autoscaling, queue bounds) are serve/config.yaml's for ``serve run``/``serve deploy``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", dest="model_uri", help="model folder, runs:/<id>/models or models:/<name>/<version>")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", choices=["auto", "on", "off"])
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--batch-wait-timeout-s", type=float)
    p.add_argument("--store", help="job store: a folder or a pyarrow file-system URI")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (no autoscaling here)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serve.app import app_with

    args = {k: v for k, v in vars(a).items() if v is not None and k not in ("host", "port", "replicas")}
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    app = app_with(args, model_options={"num_replicas": a.replicas})
    serve.run(app, name="dudocrop", route_prefix="/")
    print(f"serving on http://{a.host}:{a.port} (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ray's driver swallows SIGINT during a blocking serve.run
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()  # graceful: replicas drain their requests (graceful_shutdown_timeout_s)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
