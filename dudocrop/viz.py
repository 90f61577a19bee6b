"""Comparison panels as PNG, in the paper's layout (Figs. 8-13): images in the display window [-175, 275] HU on
the top row, error maps against the reference in [-400, 400] HU below, metal painted red, PSNR / SSIM under each
image.

Pixels are placed exactly (``Figure.figimage``, no resampling besides an integer nearest-neighbour zoom of small
images), so the PNG's size follows :func:`panel_size`. Matplotlib is used through its Agg canvas directly (no
pyplot state, no backend switch); files are written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from dudocrop.atomic import atomic_open
from dudocrop.metrics.image import CT_RANGE_HU, DISPLAY_WINDOW_HU, ERROR_WINDOW_HU, psnr, rmse, ssim

__all__ = ["panel_size", "save_panel"]

#: Images smaller than this are zoomed by an integer factor to at least this many pixels.
TILE_MIN_PX = 256
#: Gap between tiles and around the panel, pixels.
PAD_PX = 4
#: Height of the column-title band (top) and of the label band under each row, pixels (``annotate=True``).
TITLE_PX = 22
LABEL_PX = 20
_DPI = 100
_FONT_PT = 9
_METAL_RGB = (255, 0, 0)


def _zoom(image_hw: tuple[int, int], scale: int | None) -> int:
    if scale is None:
        return max(1, math.ceil(TILE_MIN_PX / max(image_hw)))
    if not (isinstance(scale, int) and not isinstance(scale, bool) and scale >= 1):
        raise ValueError(f"scale must be an int >= 1 or None, got {scale!r}")
    return scale


def panel_size(n_columns: int, image_hw: tuple[int, int], with_reference: bool, annotate: bool = True,
               scale: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels of the PNG :func:`save_panel` writes: ``n_columns`` tiles of ``scale`` x the
    image size (default: the smallest integer zoom reaching :data:`TILE_MIN_PX`), :data:`PAD_PX` gaps, two rows
    with a reference (one without), and with ``annotate`` a :data:`TITLE_PX` title band plus a :data:`LABEL_PX`
    band under each row."""
    s = _zoom(image_hw, scale)
    rows = 2 if with_reference else 1
    h = rows * image_hw[0] * s + (rows + 1) * PAD_PX + ((TITLE_PX + rows * LABEL_PX) if annotate else 0)
    w = n_columns * image_hw[1] * s + (n_columns + 1) * PAD_PX
    return h, w


def _image2d(x, name: str) -> np.ndarray:
    """(H, W) or (1, 1, H, W) float, numpy or torch -> float64 (H, W), validated."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point image in HU, got dtype {x.dtype}")
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim == 4 and x.shape[:2] == (1, 1):
        x = x[0, 0]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W) or (1, 1, H, W), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point image in HU, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return x.astype(np.float64)


def _mask2d(m, name: str, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    if not isinstance(m, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(m).__name__}")
    if m.ndim == 4 and m.shape[:2] == (1, 1):
        m = m[0, 0]
    if m.shape != shape:
        raise ValueError(f"{name} must have the images' shape {shape} (or (1, 1, *shape)), got {m.shape}")
    if m.dtype != np.bool_:
        if not np.isfinite(m).all() or (m < 0).any() or (m > 1).any():
            raise ValueError(f"{name} must be bool or hold values in [0, 1]")
        m = m > 0.5
    return m


def _window(w, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in w)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of HU values, got {w!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be a finite (low, high) pair with low < high, got {w!r}")
    return lo, hi


def _to_rgb(x: np.ndarray, window: tuple[float, float], metal: np.ndarray | None, s: int) -> np.ndarray:
    lo, hi = window
    g = np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if metal is not None:
        rgb[metal] = _METAL_RGB
    return np.repeat(np.repeat(rgb, s, axis=0), s, axis=1)


def _fmt_psnr(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def save_panel(path: str | os.PathLike, columns: Mapping[str, object], reference=None, metal_mask=None,
               window: tuple[float, float] = DISPLAY_WINDOW_HU,
               error_window: tuple[float, float] = ERROR_WINDOW_HU, annotate: bool = True,
               scale: int | None = None, metric_window: tuple[float, float] = CT_RANGE_HU,
               image_labels: Mapping[str, str] | None = None) -> Path:
    """Write a comparison panel PNG to ``path`` (atomically: a temporary file in the same folder, then
    ``os.replace``) and return the path.

    Args:
        path: target ``.png``; its folder is created if missing.
        columns: title -> image in HU, (H, W) or (1, 1, H, W), numpy or torch; drawn left to right in order.
        reference: the metal-free image in HU; adds the error row (image - reference, in ``error_window``) and
            PSNR / SSIM under each image (``metrics.psnr`` / ``metrics.ssim`` in ``metric_window``) and the RMSE
            in HU under each error map, metal pixels excluded.
        metal_mask: metal pixels, painted red on every tile.
        window: display window of the images; the paper's [-175, 275] HU by default.
        error_window: window of the error maps; the paper's [-400, 400] HU by default.
        annotate: draw column titles and the metric labels (False: the bare image grid).
        scale: integer zoom of every tile (default: reach :data:`TILE_MIN_PX` pixels).
        metric_window: window for the printed PSNR / SSIM (full CT range by default).
        image_labels: title -> text printed under that column's image instead of the computed PSNR / SSIM
            (e.g. the paper's "PSNR/SSIM/LPIPS×100" from the evaluation tables); needs ``reference``.

    The PNG's (height, width) is :func:`panel_size` ``(len(columns), (H, W), reference is not None, annotate,
    scale)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must name a .png file, got {str(path)!r}")
    if not isinstance(columns, Mapping) or len(columns) == 0:
        raise ValueError("columns must be a non-empty mapping of title -> HU image")
    imgs: dict[str, np.ndarray] = {}
    for k, v in columns.items():
        if not isinstance(k, str):
            raise ValueError(f"columns keys must be str titles, got {k!r}")
        imgs[k] = _image2d(v, f"columns[{k!r}]")
    shape = next(iter(imgs.values())).shape
    for k, v in imgs.items():
        if v.shape != shape:
            raise ValueError(f"columns[{k!r}] must have the shape of the first column {shape}, got {v.shape}")
    ref = None
    if reference is not None:
        ref = _image2d(reference, "reference")
        if ref.shape != shape:
            raise ValueError(f"reference must have the columns' shape {shape}, got {ref.shape}")
    if image_labels is not None:
        if ref is None:
            raise ValueError("image_labels need a reference (labels are drawn in the band under each image)")
        if not isinstance(image_labels, Mapping) or set(image_labels) != set(imgs) or not all(
                isinstance(v, str) for v in image_labels.values()):
            raise ValueError(f"image_labels must map every column title {list(imgs)} to a str, got {image_labels!r}")
    metal = None if metal_mask is None else _mask2d(metal_mask, "metal_mask", shape)
    window = _window(window, "window")
    error_window = _window(error_window, "error_window")
    metric_window = _window(metric_window, "metric_window")
    s = _zoom(shape, scale)

    H, W = panel_size(len(imgs), shape, ref is not None, annotate, s)
    th, tw = shape[0] * s, shape[1] * s
    canvas = np.zeros((H, W, 3), dtype=np.uint8)
    labels: list[tuple[float, float, str]] = []  # (x centre px, y centre px from the top, text)
    top = PAD_PX + (TITLE_PX if annotate else 0)
    rows = [("image", window)] + ([("error", error_window)] if ref is not None else [])
    t_ref = m_t = None
    if ref is not None:
        t_ref = torch.from_numpy(ref)[None, None]
        m_t = None if metal is None else torch.from_numpy(metal)[None, None]
    for c, (title, img) in enumerate(imgs.items()):
        x0 = PAD_PX + c * (tw + PAD_PX)
        xc = x0 + tw / 2
        if annotate:
            labels.append((xc, PAD_PX + TITLE_PX / 2, title))
        t_img = torch.from_numpy(img)[None, None]
        y0 = top
        for kind, win in rows:
            data = img if kind == "image" else img - ref
            canvas[y0:y0 + th, x0:x0 + tw] = _to_rgb(data, win, metal, s)
            if annotate and ref is not None:
                if kind == "image" and image_labels is not None:
                    text = image_labels[title]
                elif kind == "image":
                    p = float(psnr(t_img, t_ref, m_t, window=metric_window)[0])
                    q = float(ssim(t_img, t_ref, m_t, window=metric_window)[0])
                    text = f"PSNR {_fmt_psnr(p)} dB  SSIM {q:.4f}"
                else:
                    text = f"RMSE {float(rmse(t_img, t_ref, m_t)[0]):.1f} HU"
                labels.append((xc, y0 + th + LABEL_PX / 2, text))
            y0 += th + PAD_PX + (LABEL_PX if annotate else 0)

    fig = Figure(figsize=(W / _DPI, H / _DPI), dpi=_DPI, facecolor="black")
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    for xc, yc, text in labels:
        fig.text(xc / W, 1.0 - yc / H, text, color="white", ha="center", va="center", fontsize=_FONT_PT)
    canvas_agg = FigureCanvasAgg(fig)

    with atomic_open(path, "wb") as f:
        canvas_agg.print_png(f)
    return path
