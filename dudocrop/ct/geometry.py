"""2-D fan-beam CT geometry: one frozen dataclass, named presets, and the ray/view vectors every
backend (numba, torch, astra) derives its work from, so conventions live in exactly one place.

Coordinate conventions (shared by FP, BP, FBP and the simulator):

* Image arrays are (H, W) = (rows, columns); row 0 is the top (anterior for a supine body), column 0
  the left of the displayed image. World coordinates are millimetres with the isocentre at the image
  centre, x to the right (increasing column), y up (decreasing row).
* View ``v`` has the source at angle ``beta_v = start_angle + direction * v * angular_range / n_views``
  measured from +y towards +x, so view 0 puts the source at the top (AAPM CT-MAR convention). The
  central ray ``e_c`` points from the source to the isocentre; the channel axis ``e_u`` is ``e_c``
  rotated by -90 degrees, so at view 0 (source at the top) channel index increases towards -x.
* Curved (equiangular) detectors: channel ``i`` sits at fan angle
  ``gamma_i = (i - (C - 1)/2 + channel_offset) * delta_gamma`` with
  ``delta_gamma = 2 atan(channel_spacing / (2 SDD))`` (REFERENCE §3: AAPM offset -1.25).
* Flat detectors: channel ``i`` sits at ``u_i = (i - (C - 1)/2 + channel_offset) * channel_spacing``
  on a line at distance SDD from the source.

The AAPM rotation direction and channel orientation were not verified against the challenge files
(no download here); ``direction`` flips the rotation if a release turns out mirrored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Literal

import numpy as np

DetectorKind = Literal["curved", "flat"]


@dataclass(frozen=True)
class FanBeamGeometry:
    """A 2-D fan-beam scan of a square image. Lengths in mm, angles in radians."""

    name: str
    image_size: int
    pixel_size: float
    n_views: int
    n_channels: int
    sid: float  # source to isocentre
    sdd: float  # source to detector
    detector: DetectorKind
    channel_spacing: float  # at the detector (arc length for curved, pitch for flat)
    channel_offset: float = 0.0  # in channels, added to the centred channel index
    angular_range: float = 2 * math.pi
    start_angle: float = 0.0
    direction: int = 1  # +1: source moves from +y towards +x

    def __post_init__(self) -> None:
        for f in ("image_size", "n_views", "n_channels"):
            v = getattr(self, f)
            if not isinstance(v, int | np.integer) or v < 2:
                raise ValueError(f"FanBeamGeometry.{f} must be an int >= 2, got {v!r}")
        for f in ("pixel_size", "sid", "sdd", "channel_spacing", "angular_range"):
            v = getattr(self, f)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"FanBeamGeometry.{f} must be a positive finite number, got {v!r}")
        if self.sdd <= self.sid:
            raise ValueError(f"FanBeamGeometry.sdd ({self.sdd}) must exceed sid ({self.sid})")
        if self.detector not in ("curved", "flat"):
            raise ValueError(f"FanBeamGeometry.detector must be 'curved' or 'flat', got {self.detector!r}")
        if self.direction not in (1, -1):
            raise ValueError(f"FanBeamGeometry.direction must be +1 or -1, got {self.direction!r}")
        if self.fov_radius * math.sqrt(2) >= self.sid:
            raise ValueError(
                f"FanBeamGeometry {self.name!r}: the image corners ({self.fov_radius * math.sqrt(2):.1f} mm) "
                f"reach the source orbit (sid={self.sid} mm)"
            )

    # ---- derived scalars -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def sino_shape(self) -> tuple[int, int]:
        return (self.n_views, self.n_channels)

    @property
    def fov_radius(self) -> float:
        """Half the side of the reconstructed square, mm."""
        return 0.5 * self.image_size * self.pixel_size

    @property
    def delta_gamma(self) -> float:
        """Fan-angle step of a curved detector (rad); REFERENCE §3: 2 atan(0.5/950) for AAPM."""
        return 2.0 * math.atan(0.5 * self.channel_spacing / self.sdd)

    @property
    def channel_pitch_at_iso(self) -> float:
        """Sampling distance of the channels at the isocentre, mm (the ramp filter's tau)."""
        if self.detector == "curved":
            return self.sid * self.delta_gamma
        return self.channel_spacing * self.sid / self.sdd

    @property
    def scan_radius(self) -> float:
        """Radius (mm) of the circle every view sees: reconstruction is exact only inside it."""
        half = self.n_channels / 2 - abs(self.channel_offset)  # the shorter side of an offset detector
        if self.detector == "curved":
            return self.sid * math.sin(half * self.delta_gamma)
        u = half * self.channel_spacing
        return self.sid * math.sin(math.atan(u / self.sdd))

    # ---- vectors shared by all backends ----------------------------------------------------------
    @cached_property
    def view_angles(self) -> np.ndarray:
        v = np.arange(self.n_views, dtype=np.float64)
        return self.start_angle + self.direction * v * self.angular_range / self.n_views

    @cached_property
    def channel_coords(self) -> np.ndarray:
        """Fan angle (curved, rad) or detector coordinate (flat, mm) of each channel centre."""
        i = np.arange(self.n_channels, dtype=np.float64) - (self.n_channels - 1) / 2 + self.channel_offset
        return i * (self.delta_gamma if self.detector == "curved" else self.channel_spacing)

    @cached_property
    def view_frames(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source (V,2), e_c (V,2), e_u (V,2)) in world mm for every view."""
        b = self.view_angles
        src = self.sid * np.stack([np.sin(b), np.cos(b)], axis=1)
        e_c = -src / self.sid
        e_u = np.stack([e_c[:, 1], -e_c[:, 0]], axis=1)  # e_c rotated by -90 degrees
        return src, e_c, e_u

    @cached_property
    def ray_directions(self) -> np.ndarray:
        """Unit direction (V, C, 2) of every measured ray, from the source through its channel."""
        _, e_c, e_u = self.view_frames
        c = self.channel_coords
        if self.detector == "curved":
            a, b = np.cos(c), np.sin(c)
        else:
            n = np.hypot(self.sdd, c)
            a, b = self.sdd / n, c / n
        return a[None, :, None] * e_c[:, None, :] + b[None, :, None] * e_u[:, None, :]

    @cached_property
    def pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """World x of each column and y of each row (mm)."""
        k = (np.arange(self.image_size, dtype=np.float64) - (self.image_size - 1) / 2) * self.pixel_size
        return k, -k

    # ---- variants --------------------------------------------------------------------------------
    def scaled(self, image_size: int, n_views: int | None = None, n_channels: int | None = None,
               name: str | None = None) -> FanBeamGeometry:
        """The same scanner and field of view sampled more coarsely (tests, previews)."""
        n_views = n_views or self.n_views
        n_channels = n_channels or self.n_channels
        fov = self.image_size * self.pixel_size
        span = self.n_channels * self.channel_spacing  # detector length is kept
        return replace(
            self,
            name=name or f"{self.name}@{image_size}",
            image_size=image_size,
            pixel_size=fov / image_size,
            n_views=n_views,
            n_channels=n_channels,
            channel_spacing=span / n_channels,
            channel_offset=self.channel_offset * n_channels / self.n_channels,  # same physical offset
        )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---- presets (REFERENCE §3) ----------------------------------------------------------------------

#: AAPM CT-MAR body: 512^2 over a 400 mm FOV, 1000 views over 360 deg, 900 equiangular channels.
AAPM_BODY = FanBeamGeometry(
    name="aapm_body", image_size=512, pixel_size=400.0 / 512, n_views=1000, n_channels=900,
    sid=550.0, sdd=950.0, detector="curved", channel_spacing=1.0, channel_offset=-1.25,
)
#: AAPM CT-MAR head: same scanner, 220.16 mm FOV (0.43 mm pixels).
AAPM_HEAD = replace(AAPM_BODY, name="aapm_head", pixel_size=0.43)
#: SynDeepLesion (InDuDoNet / ACDNet / DuDoDp): 416^2 at 0.3692 mm, 640 views, 641 flat bins over 434.5 mm,
#: source and detector 396.9 mm from the isocentre.
SYNDEEPLESION = FanBeamGeometry(
    name="syndeeplesion", image_size=416, pixel_size=0.3692, n_views=640, n_channels=641,
    sid=396.9, sdd=2 * 396.9, detector="flat", channel_spacing=434.5 / 641,
)
#: Unit-test and laptop-demo sizes of the same two scanners.
TINY = AAPM_BODY.scaled(64, n_views=96, n_channels=112, name="tiny")
TINY_FLAT = SYNDEEPLESION.scaled(64, n_views=96, n_channels=96, name="tiny_flat")
#: A mid size for the `small` training preset and quick benchmarks.
SMALL = AAPM_BODY.scaled(128, n_views=250, n_channels=225, name="small")

PRESETS: dict[str, FanBeamGeometry] = {
    g.name: g for g in (AAPM_BODY, AAPM_HEAD, SYNDEEPLESION, TINY, TINY_FLAT, SMALL)
}


def get_geometry(name_or_geometry: str | FanBeamGeometry) -> FanBeamGeometry:
    """Look a preset up by name (or pass a geometry through)."""
    if isinstance(name_or_geometry, FanBeamGeometry):
        return name_or_geometry
    try:
        return PRESETS[name_or_geometry]
    except KeyError:
        raise ValueError(
            f"unknown geometry {name_or_geometry!r}; presets: {', '.join(sorted(PRESETS))}"
        ) from None
