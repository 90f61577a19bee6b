"""The service's settings: one frozen dataclass, filled from defaults < ``DUDOCROP_*`` environment < builder args
(``serve run serve.app:build_app model_uri=...``, ``python -m serve --model ...``, or ``args:`` in
``serve/config.yaml``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

#: environment variable per field (the bearer token is only ever read from the environment, never from a file)
ENV_PREFIX = "DUDOCROP_"
TOKEN_ENV = "DUDOCROP_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeSettings:
    """``model_uri``: a model folder, ``runs:/<id>/models`` or ``models:/<name>/<version>``. ``device``: ``auto``
    (CUDA when the replica has a GPU), ``cpu`` or ``cuda``. ``precision``: ``auto`` (bf16 on CUDA, fp32 on CPU),
    ``fp32`` or ``bf16``. ``compile``: torch.compile the U-Nets (``auto``: on CUDA only) and warm up every batch
    size before the replica reports healthy. ``steps``: sampler steps (None: the model's). ``max_batch_size`` /
    ``batch_wait_timeout_s``: ``@serve.batch`` across requests. ``store``: where jobs live (folder or pyarrow
    URI). ``job_concurrency``: metal slices of one job in flight at once. ``max_request_mb`` / ``max_decoded_mb``:
    bounds on a request body and on what its archives may expand to (413 beyond). ``dicomweb_allow``: the
    DICOMweb servers a PACS job may name, comma-separated base URLs or ``*`` (empty: PACS jobs refused)."""

    model_uri: str = "outputs/train_all/models"
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    steps: int | None = None
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    store: str = "outputs/serve/jobs"
    job_concurrency: int = 8
    max_request_mb: float = 256.0
    max_decoded_mb: float = 2048.0
    retry_after_s: int = 5
    dicomweb_allow: str = ""

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"ServeSettings.device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"ServeSettings.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"ServeSettings.compile must be auto, on or off, got {self.compile!r}")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ValueError(f"ServeSettings.steps must be in [1, 1000], got {self.steps!r}")
        if not 1 <= self.max_batch_size <= 256:
            raise ValueError(f"ServeSettings.max_batch_size must be in [1, 256], got {self.max_batch_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _cast(name: str, value, kind):
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"setting {name}: cannot read {value!r} as {kind.__name__}") from e


def settings_from(args: dict | None = None, environ=None) -> ServeSettings:
    """Defaults, then ``DUDOCROP_<FIELD>`` environment variables, then ``args``; unknown args are refused by name."""
    environ = os.environ if environ is None else environ
    args = dict(args or {})
    known = {f.name: f for f in fields(ServeSettings)}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"unknown serve setting(s) {unknown}; expected {sorted(known)}")
    values = {}
    for name in known:
        kind = {"steps": int, "max_batch_size": int, "job_concurrency": int, "retry_after_s": int,
                "batch_wait_timeout_s": float, "max_request_mb": float, "max_decoded_mb": float}.get(name, str)
        if name in args:
            values[name] = _cast(name, args[name], kind)
        elif ENV_PREFIX + name.upper() in environ:
            values[name] = _cast(name, environ[ENV_PREFIX + name.upper()], kind)
    if values.get("model_uri") is None:
        values.pop("model_uri", None)
    return ServeSettings(**values)
