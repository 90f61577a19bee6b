"""LPIPS (Zhang et al., CVPR 2018) for CT images, with the AlexNet backbone loaded from a local file only.

The ``lpips`` package ships its calibrated linear layers (``lpips/weights/v0.1/alex.pth``) but not the AlexNet
trunk: ``lpips.LPIPS(pretrained=True, net='alex', pnet_rand=False)`` calls ``torchvision.models.alexnet(
pretrained=True)``, which goes through ``torch.hub.load_state_dict_from_url`` and reads
``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` (``$TORCH_HOME/hub/checkpoints/...`` when
``TORCH_HOME`` is set), downloading it when the file is missing. Downloads are not allowed here, so this module

* looks for that file (or an explicit ``weights_path``) and raises :class:`LPIPSUnavailable` naming the path when
  it is absent; it never falls back to a random trunk (``pnet_rand=True`` alone is not LPIPS);
* builds the package's ``LPIPS`` module and copies the five AlexNet conv layers from the file into its trunk
  (the same tensors ``torchvision`` would load), checking every key and shape, before the module is used.
  ``tests/test_lpips.py`` checks that the result equals the package's own ``pnet_rand=False`` construction.

CT input convention (one place): images in HU, (N, 1, H, W), are clipped to :data:`LPIPS_WINDOW_HU` (the
paper's display window [-175, 275] HU, so LPIPS scores what a reader sees in Figs. 8-13), mapped linearly to
[-1, 1] (LPIPS' input range) and repeated to 3 channels. With ``metal_mask`` the metal pixels of ``x`` take the
reference's values first, as ``metrics.image.ssim`` does: the reference has no metal there. The tables report
LPIPS x 100 (Tables III-V); this module returns plain LPIPS.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from dudocrop.checks import check_tensor
from dudocrop.metrics.image import DISPLAY_WINDOW_HU, _check_mask, _check_window

__all__ = [
    "ALEXNET_FILENAME",
    "LPIPSMetric",
    "LPIPSUnavailable",
    "LPIPS_MIN_SIDE_PX",
    "LPIPS_WINDOW_HU",
    "alexnet_weights_path",
    "load_lpips",
    "lpips_available",
    "lpips_distance",
    "to_lpips_input",
]

#: torchvision's AlexNet ImageNet weights (AlexNet_Weights.IMAGENET1K_V1), the file torch.hub caches.
ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
#: HU window mapped to LPIPS' [-1, 1]: the paper's display window (Figs. 8-13).
LPIPS_WINDOW_HU = DISPLAY_WINDOW_HU
#: AlexNet's stride-4 conv and two stride-2 pools leave no feature map below 31 px; 32 is the smallest side.
LPIPS_MIN_SIDE_PX = 32

# lpips.pretrained_networks.alexnet slices torchvision's ``features`` into relu1..relu5 by these indices.
_TRUNK_LAYERS = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


class LPIPSUnavailable(FileNotFoundError):
    """The AlexNet backbone file is missing: LPIPS (and the PI of Eq. 18-19) cannot be computed."""


def alexnet_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The backbone file: ``weights_path`` if given, else ``torch.hub.get_dir()/checkpoints/`` +
    :data:`ALEXNET_FILENAME` (``$TORCH_HOME/hub/checkpoints/...``, where torchvision would cache it)."""
    if weights_path is not None:
        if not isinstance(weights_path, str | os.PathLike) or not str(weights_path):
            raise ValueError(f"weights_path must be a path to {ALEXNET_FILENAME} or None, got {weights_path!r}")
        return Path(weights_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILENAME


def _linear_layers_path() -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def lpips_available(weights_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(True, path) when the AlexNet backbone file and the package's linear layers exist; else (False, why).

    Only checks that the files exist (cheap); :func:`load_lpips` validates their contents."""
    try:
        import lpips  # noqa: F401
    except ImportError as e:
        return False, f"the lpips package is not installed ({e})"
    p = alexnet_weights_path(weights_path)
    if not p.is_file():
        return False, (f"AlexNet backbone not found at {p} (put torchvision's {ALEXNET_FILENAME} there or set "
                       "TORCH_HOME / pass weights_path; LPIPS is never computed with a random backbone)")
    lin = _linear_layers_path()
    if not lin.is_file():
        return False, f"the lpips package's linear layers are missing: {lin}"
    return True, str(p)


def _trunk_state(path: Path) -> dict[str, torch.Tensor]:
    """The five conv layers of torchvision's AlexNet state dict, renamed to lpips' ``net.sliceK.i`` keys."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"weights file {path} is not a readable torch state dict: {e}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"weights file {path} must hold torchvision's AlexNet state dict, got {type(sd).__name__}")
    out = {}
    for i, k in _TRUNK_LAYERS.items():
        for part in ("weight", "bias"):
            key = f"features.{i}.{part}"
            if key not in sd or not isinstance(sd[key], torch.Tensor):
                raise ValueError(f"weights file {path} lacks {key!r}: expected torchvision's AlexNet state dict "
                                 f"({ALEXNET_FILENAME})")
            out[f"net.slice{k}.{i}.{part}"] = sd[key]
    return out


_CACHE: dict[tuple, torch.nn.Module] = {}
_LOCK = threading.Lock()


def load_lpips(weights_path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The ``lpips.LPIPS`` AlexNet module (v0.1, eval mode, frozen) with the trunk from the local backbone file.

    Raises :class:`LPIPSUnavailable` (naming the path) when the file is missing and ValueError when it is not
    torchvision's AlexNet state dict. Cached per (file, modification time, device)."""
    ok, why = lpips_available(weights_path)
    if not ok:
        raise LPIPSUnavailable(why)
    path = alexnet_weights_path(weights_path).resolve()
    device = torch.device(device)
    key = (str(path), path.stat().st_mtime_ns, str(device))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        trunk = _trunk_state(path)
        import lpips

        with warnings.catch_warnings():
            # pnet_rand=True only stops torchvision from downloading; every trunk tensor is overwritten from the
            # local file below (keys and shapes checked), so no score ever comes from the random trunk.
            # torchvision warns about the legacy ``pretrained`` argument lpips passes.
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False)
        own = model.state_dict()
        for k, v in trunk.items():
            if own[k].shape != v.shape:
                raise ValueError(f"weights file {path}: {k} has shape {tuple(v.shape)}, AlexNet expects "
                                 f"{tuple(own[k].shape)}")
        missing = {k for k in own if k.startswith("net.")} - set(trunk)
        if missing:  # every trunk tensor must come from the file, none may stay random
            raise ValueError(f"weights file {path} does not cover the AlexNet trunk: {sorted(missing)}")
        model.load_state_dict(trunk, strict=False)
        model = model.eval().requires_grad_(False).to(device)
        _CACHE[key] = model
        return model


def to_lpips_input(x_hu: torch.Tensor, window: tuple[float, float] = LPIPS_WINDOW_HU) -> torch.Tensor:
    """(N, 1, H, W) HU -> (N, 3, H, W) float32 in [-1, 1]: clipped to ``window``, mapped linearly, 3 channels."""
    x = check_tensor(x_hu, "x_hu", ndim=4)
    if x.shape[1] != 1:
        raise ValueError(f"x_hu must have shape (N, 1, H, W), got {tuple(x.shape)}")
    lo, hi = _check_window(window, "window")
    y = (x.to(torch.float32).clamp(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
    return y.expand(-1, 3, -1, -1)


def lpips_distance(x, ref, model: torch.nn.Module, metal_mask=None, window: tuple[float, float] = LPIPS_WINDOW_HU,
                   batch_size: int = 16) -> torch.Tensor:
    """LPIPS per slice, (N,) float64 on ``x``'s device, between HU images ``x`` and ``ref`` (N, 1, H, W), with
    the module's conventions (window, [-1, 1], 3 channels, metal pixels of ``x`` replaced by ``ref``'s)."""
    x = check_tensor(x, "x", ndim=4)
    if x.shape[1] != 1:
        raise ValueError(f"x must have shape (N, 1, H, W), got {tuple(x.shape)}")
    ref = check_tensor(ref, "ref", ndim=4, shape=tuple(x.shape), context="x's shape").to(x.device)
    H, W = x.shape[-2:]
    if min(H, W) < LPIPS_MIN_SIDE_PX:
        raise ValueError(f"x must be at least {LPIPS_MIN_SIDE_PX} x {LPIPS_MIN_SIDE_PX} pixels for LPIPS "
                         f"(AlexNet's pooling), got {H} x {W}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if metal_mask is not None:
        m = _check_mask(metal_mask, "metal_mask", tuple(x.shape), x.device)
        x = torch.where(m, ref.to(x.dtype), x)
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            a = to_lpips_input(x[s:s + batch_size].to(dev), window)
            b = to_lpips_input(ref[s:s + batch_size].to(dev), window)
            out.append(model(a, b).reshape(-1).to(torch.float64))
    return torch.cat(out).to(x.device)


class LPIPSMetric:
    """Callable LPIPS for CT: ``LPIPSMetric()(x, ref, metal_mask=None)`` -> (N,) float64.

    Construction loads the backbone (raises :class:`LPIPSUnavailable` when the file is missing), so a caller
    learns at once whether LPIPS and PI can be reported. The callable fits :mod:`dudocrop.metrics.perceptual`'s
    ``distance`` argument."""

    def __init__(self, weights_path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 window: tuple[float, float] = LPIPS_WINDOW_HU, batch_size: int = 16) -> None:
        self.window = _check_window(window, "window")
        self.batch_size = batch_size
        self.weights_path = alexnet_weights_path(weights_path)
        self.model = load_lpips(weights_path, device)

    def __call__(self, x, ref, metal_mask=None) -> torch.Tensor:
        return lpips_distance(x, ref, self.model, metal_mask, self.window, self.batch_size)
