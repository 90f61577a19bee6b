"""How a slice reaches a vision-language model: an 8-bit RGB picture of one view in a stated window.

One function, :func:`to_rgb`, turns any view into a picture; :func:`window_for` states the window per view:

==========  ==============================  =============================================================
view        window                          why
==========  ==============================  =============================================================
X_ref/X_ma  [-175, 275] HU                  the paper's display window (§IV, Fig. 9-11)
X_r         [-400, 400] HU                  the paper's error window: metal saturates, streaks stay visible
Y_ref/Y_ma  [0, 2 mu_w R]                   a water disc filling the field of view (R = FOV radius) is white
Y_r         [-mu_w R / 2, +mu_w R / 2]      metal traces (≈ 0.1/mm x 10 mm) show well above the noise
==========  ==============================  =============================================================

Sinograms are not square: they are resized (bilinear) to a square of the longer side, never centre-cropped
(a LLaVA/CLIP processor would crop the views or channels away, REFERENCE §2). The grey value is repeated in the
three channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry
from dudocrop.ct.units import MU_WATER

VIEWS = ("X_ref", "X_ma", "X_r", "Y_ref", "Y_ma", "Y_r")


@dataclass(frozen=True)
class Window:
    lo: float
    hi: float
    unit: str

    def __post_init__(self):
        if not self.hi > self.lo:
            raise ValueError(f"Window needs hi > lo, got [{self.lo}, {self.hi}]")

    def describe(self) -> str:
        return f"[{self.lo:.4g}, {self.hi:.4g}] {self.unit}"


DISPLAY_WINDOW_HU = Window(-175.0, 275.0, "HU")
ERROR_WINDOW_HU = Window(-400.0, 400.0, "HU")


def window_for(view: str, geometry: FanBeamGeometry | str) -> Window:
    """The stated display window of a view (table above)."""
    g = get_geometry(geometry)
    full = 2.0 * MU_WATER * g.fov_radius
    if view in ("X_ref", "X_ma"):
        return DISPLAY_WINDOW_HU
    if view == "X_r":
        return ERROR_WINDOW_HU
    if view in ("Y_ref", "Y_ma"):
        return Window(0.0, full, "line integral")
    if view == "Y_r":
        return Window(-full / 4, full / 4, "line integral")
    raise ValueError(f"view must be one of {VIEWS}, got {view!r}")


def to_rgb(array: np.ndarray, window: Window, square: bool = False) -> Image.Image:
    """A 2-D array as an RGB picture: values clipped to ``window`` and mapped linearly to 0..255.

    ``square`` resizes a non-square array (a sinogram) to a square of its longer side, so no processor
    centre-crop can cut views or channels away."""
    a = np.asarray(array)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"array must be a 2-D float array (H, W) or (V, C), got {a.dtype} {a.shape}")
    g = np.clip((a.astype(np.float64) - window.lo) / (window.hi - window.lo), 0.0, 1.0)
    g = np.nan_to_num(g, nan=0.0)
    img = Image.fromarray(np.round(g * 255).astype(np.uint8), mode="L")
    if square and a.shape[0] != a.shape[1]:
        s = max(a.shape)
        img = img.resize((s, s), Image.Resampling.BILINEAR)
    return img.convert("RGB")


def view_image(array: np.ndarray, view: str, geometry: FanBeamGeometry | str) -> Image.Image:
    """The picture a captioner is shown for ``view`` (window from :func:`window_for`)."""
    return to_rgb(array, window_for(view, geometry), square=view.startswith("Y"))
