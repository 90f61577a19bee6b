"""Where DuDoCLIP's frozen CLIP comes from: an open_clip tag, a local file, a local directory, or nothing.

``pretrained`` may be

* ``None``: random weights. The model is flagged (``is_random=True``, ``pretrained_source=None``) so a run labels
  its metrics as random-weight.
* an open_clip tag (``laion2b_s34b_b79k``, ``openai``): looked up in the local caches only — the Hugging Face cache
  (``cache_dir`` or the default) and open_clip's URL cache (``cache_dir`` or ``~/.cache/clip``). A tag that is not
  cached fails AT ONCE with a message naming the tag, every place looked at and how to provide the weights; it is
  downloaded only with ``allow_download=True`` and ``HF_HUB_OFFLINE`` unset (open_clip alone would spend ≈47 s on
  retries offline, REFERENCE §5).
* a local file (``.pt``/``.pth``/``.bin``/``.safetensors``; OpenAI's TorchScript archives included).
* ``local-dir:<dir>`` (or a directory path): a folder with a weights file and optionally ``open_clip_config.json``
  (then the architecture comes from that file, as in open_clip), e.g. a Hugging Face snapshot folder.

OpenAI's CLIP was trained with QuickGELU: with the GELU architecture its features are silently wrong
(REFERENCE §5). The ``openai`` tag on a non-QuickGELU architecture (and any tag/architecture mismatch) is refused;
a local file that looks like OpenAI's (a TorchScript archive, or "openai" in its path) on a GELU architecture
gives a warning, since a file's origin can only be guessed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from dudocrop.clip.config import IN_CODE_ARCHS, IN_CODE_BASE

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
LOCAL_DIR_PREFIX = "local-dir:"
# the file names open_clip and the Hugging Face Hub use, best first (open_clip's own preference order)
_PREFERRED_IN_DIR = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                     "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_HOW_TO = ("Provide the weights offline as one of: pretrained='/path/to/weights.safetensors' (.pt/.pth/.bin too), "
           "pretrained='local-dir:/path/to/folder' (weights + open_clip_config.json, e.g. a Hugging Face snapshot), "
           "a pre-filled Hugging Face cache (cache_dir= or HF_HOME), or pretrained=None for random weights "
           "(runs are then labelled random-weight). Downloading needs allow_download=True and HF_HUB_OFFLINE unset.")


class WeightsNotFoundError(FileNotFoundError):
    """Requested CLIP weights are not on this machine (raised before any model is built or network is used)."""


@dataclass(frozen=True)
class WeightsSource:
    """What was asked for and what was found.

    ``kind``: ``random`` | ``tag`` | ``file`` | ``local-dir``; ``requested``: the ``pretrained`` value as given;
    ``path``: the resolved local weights file (``None`` for random); ``arch``: the open_clip architecture
    (``local-dir:<dir>`` when the folder's ``open_clip_config.json`` defines it); ``mean``/``std``: the CLIP input
    normalisation that belongs to these weights.
    """

    kind: Literal["random", "tag", "file", "local-dir"]
    arch: str
    requested: str | None = None
    path: str | None = None
    mean: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)
    std: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def describe(self) -> str | None:
        """One line for logs and MLflow; ``None`` for random weights (there is no source)."""
        if self.is_random:
            return None
        if self.kind == "tag":
            return f"open_clip:{self.arch}/{self.requested} ({self.path})"
        return f"{self.kind}:{self.path} (arch {self.arch})"


def hf_hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (any of 1/ON/YES/TRUE), checked at call time."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip's dependencies
        return False


def known_arch(arch: str) -> bool:
    return arch in IN_CODE_ARCHS or open_clip.get_model_config(arch) is not None


def arch_quick_gelu(arch: str) -> bool:
    cfg = IN_CODE_ARCHS.get(arch) or open_clip.get_model_config(arch) or {}
    return bool(cfg.get("quick_gelu", False))


def resolve_weights(arch: str, pretrained: str | None, *, cache_dir: str | None = None,
                    allow_download: bool = False) -> WeightsSource:
    """Find the weights ``pretrained`` names for ``arch`` on this machine, without building a model.

    Raises :class:`WeightsNotFoundError` at once when they are absent, ``ValueError`` for an unknown architecture
    or a QuickGELU mismatch. Downloads only with ``allow_download=True`` and ``HF_HUB_OFFLINE`` unset.
    """
    if pretrained is not None and (not isinstance(pretrained, str) or not pretrained.strip()):
        raise ValueError(f"pretrained must be None, an open_clip tag, a file path or 'local-dir:<dir>', "
                         f"got {pretrained!r}")
    is_dir_spec = pretrained is not None and (pretrained.startswith(LOCAL_DIR_PREFIX)
                                              or Path(pretrained).expanduser().is_dir())
    if not is_dir_spec and not known_arch(arch):
        raise ValueError(f"arch {arch!r} is neither an open_clip architecture nor an in-code one "
                         f"({sorted(IN_CODE_ARCHS)}); e.g. 'ViT-B-32', 'ViT-B-32-quickgelu'")
    if pretrained is None:
        return WeightsSource("random", arch)
    if pretrained.startswith("hf-hub:"):
        raise WeightsNotFoundError(
            f"pretrained={pretrained!r}: hub ids are not fetched at run time. Download the repository once and pass "
            f"'local-dir:<snapshot folder>'. {_HOW_TO}")
    if is_dir_spec:
        return _resolve_dir(arch, pretrained)
    if _looks_like_path(pretrained):
        return _resolve_file(arch, pretrained)
    return _resolve_tag(arch, pretrained, cache_dir=cache_dir, allow_download=allow_download)


def _looks_like_path(spec: str) -> bool:
    return ("/" in spec or "\\" in spec or spec.startswith(("~", ".")) or os.path.exists(spec)
            or spec.lower().endswith(WEIGHT_SUFFIXES + (".npz",)))


def _resolve_file(arch: str, spec: str) -> WeightsSource:
    p = Path(spec).expanduser()
    if not p.is_file():
        raise WeightsNotFoundError(f"CLIP weights file not found: {p.resolve()} (pretrained={spec!r}, arch {arch!r}). "
                                   f"{_HOW_TO}")
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(f"pretrained weights file must end in one of {WEIGHT_SUFFIXES}, got {p}")
    if not arch_quick_gelu(arch) and (_is_torchscript(p) or "openai" in str(p).lower()):
        warnings.warn(f"{p} looks like OpenAI's CLIP weights, which need the QuickGELU architecture "
                      f"('{arch}-quickgelu' or similar), but arch {arch!r} uses GELU: its features would be wrong",
                      UserWarning, stacklevel=3)
    return WeightsSource("file", arch, requested=spec, path=str(p.resolve()))


def _resolve_dir(arch: str, spec: str) -> WeightsSource:
    d = Path(spec[len(LOCAL_DIR_PREFIX):] if spec.startswith(LOCAL_DIR_PREFIX) else spec).expanduser()
    if not d.is_dir():
        raise WeightsNotFoundError(f"CLIP weights folder not found: {d.resolve()} (pretrained={spec!r}). {_HOW_TO}")
    weights = find_weights_in_dir(d)
    if weights is None:
        raise WeightsNotFoundError(f"no CLIP weights file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}) in "
                                   f"{d.resolve()} (pretrained={spec!r}). {_HOW_TO}")
    mean, std = tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)
    cfg_file = d / "open_clip_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        if "model_cfg" not in cfg:
            raise ValueError(f"{cfg_file} has no 'model_cfg' entry (open_clip's local-dir format)")
        pp = cfg.get("preprocess_cfg", {})
        mean, std = tuple(pp.get("mean", mean)), tuple(pp.get("std", std))
        # the folder's config defines the architecture, as open_clip's local-dir schema does
        arch = LOCAL_DIR_PREFIX + str(d.resolve())
    elif not known_arch(arch):
        raise ValueError(f"{d} has no open_clip_config.json, so arch must name a known architecture; got {arch!r}")
    return WeightsSource("local-dir", arch, requested=spec, path=str(weights.resolve()), mean=mean, std=std)


def find_weights_in_dir(d: Path) -> Path | None:
    """The weights file in ``d``: open_clip's preferred names first, then safetensors before the rest."""
    for name in _PREFERRED_IN_DIR:
        if (d / name).is_file():
            return d / name
    found = sorted((p for p in d.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES),
                   key=lambda p: (WEIGHT_SUFFIXES.index(p.suffix.lower()), p.name))
    if len(found) > 1:
        log.warning("several weights files in %s: %s; using %s", d, [p.name for p in found], found[0].name)
    return found[0] if found else None


def _resolve_tag(arch: str, tag: str, *, cache_dir: str | None, allow_download: bool) -> WeightsSource:
    if arch in IN_CODE_ARCHS:
        raise WeightsNotFoundError(f"arch {arch!r} is built in code and has no open_clip tags; pretrained={tag!r} "
                                   f"is not an existing file either. {_HOW_TO}")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise WeightsNotFoundError(f"pretrained={tag!r} is neither an existing file nor an open_clip tag for arch "
                                   f"{arch!r} (known tags: {tags}). {_HOW_TO}")
    tag_qg, arch_qg = bool(cfg.get("quick_gelu", False)), arch_quick_gelu(arch)
    if tag_qg != arch_qg:
        want = "a QuickGELU architecture (e.g. 'ViT-B-32-quickgelu')" if tag_qg else "a GELU architecture"
        raise ValueError(f"pretrained={tag!r} was trained with quick_gelu={tag_qg} but arch {arch!r} has "
                         f"quick_gelu={arch_qg}: its features would be silently wrong; use {want}")
    mean, std = tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))
    looked: list[str] = []
    for where, path in _tag_cache_candidates(cfg, cache_dir):
        looked.append(where)
        if path is not None:
            return WeightsSource("tag", arch, requested=tag, path=str(path), mean=mean, std=std)
    offline = hf_hub_offline()
    if allow_download and not offline:
        from open_clip.pretrained import download_pretrained

        log.info("downloading CLIP weights for %s/%s", arch, tag)
        path = download_pretrained(cfg, cache_dir=cache_dir)
        if path and Path(path).is_file():
            return WeightsSource("tag", arch, requested=tag, path=str(path), mean=mean, std=std)
        looked.append(f"download of {cfg.get('hf_hub') or cfg.get('url')}")
    reasons = [r for r, on in (("allow_download is False", not allow_download), ("HF_HUB_OFFLINE is set", offline))
               if on]
    why = " and ".join(reasons) or "the download returned no file"
    raise WeightsNotFoundError(f"CLIP weights for open_clip tag {tag!r} (arch {arch!r}) are not on this machine "
                               f"({why}). Looked in: {'; '.join(looked)}. {_HOW_TO}")


def _tag_cache_candidates(cfg: dict, cache_dir: str | None):
    """(description, path or None) for every local place open_clip would have put the tag's weights."""
    if cfg.get("file"):
        p = Path(cfg["file"]).expanduser()
        yield f"file {p}", p if p.is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub:
        model_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        hf_cache = cache_dir or _default_hf_cache()
        for name in names:
            where = f"Hugging Face cache {hf_cache} for {model_id}/{name}"
            hit = try_to_load_from_cache(model_id, name, cache_dir=cache_dir) if try_to_load_from_cache else None
            yield where, Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None
    url = cfg.get("url", "")
    if url:
        p = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        yield f"open_clip URL cache {p}", p if p.is_file() else None


def _default_hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "(default HF cache)"


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original releases are TorchScript archives (a zip holding ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip logs "initialized randomly" when a model is built before its weights are loaded here; that
    line would contradict the run's log, so it alone is dropped while the model is built."""

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def create_clip(arch: str, pretrained: str | None = None, *, image_size: int | None = None,
                cache_dir: str | None = None, allow_download: bool = False):
    """Build an open_clip CLIP and load the weights ``pretrained`` names (see the module docstring).

    Returns ``(clip, source, tokenizer)``. The model is on the CPU in fp32 and carries ``clip.is_random`` and
    ``clip.pretrained_source`` (``None`` for random weights). Weights are resolved before anything is built, so
    absent weights cost no time. Under ``with torch.device("meta")`` the model is built on the meta device and no
    weights are loaded: its shapes only, at no memory cost (``load_dudoclip`` checks a file against them).
    """
    meta = torch.get_default_device().type == "meta"
    source = resolve_weights(arch, pretrained, cache_dir=cache_dir, allow_download=allow_download)
    build_name, kwargs, custom_text = source.arch, {}, False
    if source.arch in IN_CODE_ARCHS:
        build_name, kwargs = IN_CODE_BASE, {k: (dict(v) if isinstance(v, dict) else v)
                                            for k, v in IN_CODE_ARCHS[source.arch].items()}
    elif source.arch.startswith(LOCAL_DIR_PREFIX):
        # the folder's model_cfg, passed as overrides (open_clip's own local-dir build would look for weights
        # again with a narrower file pattern and log a misleading "no weights found")
        build_name, kwargs = IN_CODE_BASE, dict(_local_dir_model_cfg(source.arch))
        custom_text = bool(kwargs.pop("custom_text", False))
    default_size = _default_image_size(source.arch, kwargs)
    force_size = image_size if image_size is not None and image_size != default_size else None
    if force_size is not None and kwargs:
        # open_clip applies keyword overrides after force_image_size, so an in-code tower takes its size here
        kwargs["vision_cfg"] = {**kwargs.get("vision_cfg", {}), "image_size": force_size}
        force_size = None
    with _quiet_random_init_warning():
        # pretrained_text/image=False: a config with a Hugging Face text tower would otherwise fetch its base
        # weights from the hub here, before the CLIP weights are loaded over them
        clip = open_clip.create_model(build_name, pretrained=None, load_weights=False, force_image_size=force_size,
                                      force_custom_text=custom_text, pretrained_text=False, pretrained_image=False,
                                      device="meta" if meta else "cpu", **kwargs)
    if source.path is not None and not meta:
        _load_into(clip, Path(source.path), source.arch)
        log.info("CLIP weights: %s", source.describe())
    elif not meta:
        log.warning("CLIP weights: RANDOM (arch %s, no pretrained weights); metrics of this run are random-weight",
                    source.arch)
    clip.is_random = source.is_random
    clip.pretrained_source = source.describe()
    tok_name = IN_CODE_BASE if source.arch in IN_CODE_ARCHS else source.arch
    tokenizer = open_clip.get_tokenizer(tok_name)
    return clip, source, tokenizer


def _default_image_size(arch: str, kwargs: dict) -> int | None:
    if kwargs:
        cfg = kwargs
    else:
        cfg = open_clip.get_model_config(arch) or {}
    return cfg.get("vision_cfg", {}).get("image_size")


def _local_dir_model_cfg(arch: str) -> dict:
    cfg_file = Path(arch[len(LOCAL_DIR_PREFIX):]) / "open_clip_config.json"
    return json.loads(cfg_file.read_text(encoding="utf-8"))["model_cfg"]


def _load_into(clip: torch.nn.Module, path: Path, arch: str) -> None:
    try:
        if _is_torchscript(path):
            # OpenAI's archives: torch.load(weights_only=True) refuses TorchScript; their parameter names are
            # open_clip's CLIP names, plus three metadata entries
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            for k in ("input_resolution", "context_length", "vocab_size"):
                sd.pop(k, None)
            clip.load_state_dict(sd, strict=True)
        else:
            open_clip.load_checkpoint(clip, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"CLIP weights file {path} does not fit architecture {arch!r}: {first}") from e
