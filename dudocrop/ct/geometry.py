"""2-D fan-beam CT geometry: one frozen dataclass, named presets, and the ray/view vectors every
backend (numba, torch, astra) derives its work from, so conventions live in exactly one place.

Coordinate conventions (shared by FP, BP, FBP and the simulator):

* Image arrays are (H, W) = (rows, columns); row 0 is the top (anterior for a supine body), column 0
  the left of the displayed image. World coordinates are millimetres with the isocentre at the image
  centre, x to the right (increasing column), y up (decreasing row).
* View ``v`` has the source at angle ``beta_v = start_angle + direction * v * angular_range / n_views``
  measured from +y towards +x, i.e. at ``sid * (sin beta_v, cos beta_v)``, so view 0 puts the source at
  the top. The central ray ``e_c`` points from the source to the isocentre; the channel axis ``e_u`` is
  ``e_c`` rotated by ``-90 * channel_direction`` degrees, so at view 0 (source at the top) channel index
  increases towards -x for ``channel_direction = +1`` and towards +x for ``-1``.
* Curved (equiangular) detectors: channel ``i`` sits at fan angle
  ``gamma_i = (i - (C - 1)/2 + channel_offset) * delta_gamma`` along ``e_u`` with
  ``delta_gamma = 2 atan(channel_spacing / (2 SDD))`` (REFERENCE §3: AAPM offset -1.25).
* Flat detectors: channel ``i`` sits at ``u_i = (i - (C - 1)/2 + channel_offset) * channel_spacing``
  along ``e_u`` on a line at distance SDD from the source.

The AAPM presets follow the CT-MAR challenge's own code, xcist/example ``AAPM_datachallenge`` (convention
version 2, :data:`CONVENTION_VERSION`; ``tiny`` and ``small`` keep version 1's mirror image, see the presets):

* ``AAPMProj.py`` (the challenge's forward projector, gecatsim's ``DD2FanProj``): ``y0 = sid/pixsize`` puts
  view 0's source at the top; ``alphas = (arange(nrdetcols) - (nrdetcols-1)/2 - 1.25) * dalpha`` with
  ``xds = sdd*sin(alphas)``, ``yds = sid - sdd*cos(alphas)`` puts channel ``i`` at fan angle ``alpha_i`` on
  the +x side for ``alpha_i > 0`` (``channel_direction = -1``, ``channel_offset = -1.25``);
  ``DD2FanProj`` rotates the source to ``(-y0 sin a, y0 cos a)`` for view angle ``a``, i.e. towards -x
  (``direction = -1``); the image is the row-major ``rawread(.., [512, 512, 1])`` array whose row
  ``r`` lies at ``y = (nrrows-1)/2 - r`` and column ``c`` at increasing x (the convention above, no flip);
  the sinogram is written ``[nrviews, nrdetcols]`` (views x channels, as ``sino_shape``).
* ``AAPMRecon.py`` (its FBP): ``reconType = 'fdk_equiAngle'``, ``startAngle = 0`` "with the X-ray source at
  the top", ``rotationDirection = 1``, ``detectorColOffset = -1.25``, ``viewsPerRotation = 1000``, the
  sinogram read as ``[1000, 1, 900]``.
* View spacing: ``AAPMProj.py`` spaces its views by ``2 pi / (V - 1)`` (``arange(nrviews)/(nrviews-1)``),
  while the simulator that made the challenge's sinograms (``AAPM_MAR_protocol.cfg``, ``viewsPerRotation =
  1000``) and the recon use ``2 pi / V``. The presets use ``2 pi / V``: a full rotation without a repeated
  view, which the FBP weights assume. ``docs/aapm_geometry.md`` gives the measured differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Literal

import numpy as np

DetectorKind = Literal["curved", "flat"]

#: Version of the geometry convention above. 2: the AAPM presets follow the CT-MAR challenge's rotation direction
#: and channel order; in version 1 they were its mirror image.
CONVENTION_VERSION = 2
#: For each convention version, the presets whose rays it changed: data and models made for one of these
#: under an older convention must be rebuilt (:func:`check_convention`).
CONVENTION_CHANGES: dict[int, tuple[str, ...]] = {2: ("aapm_body", "aapm_head")}


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
    channel_direction: int = 1  # +1: channel index runs towards -x at view 0; -1: towards +x (AAPM)

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
        for f in ("direction", "channel_direction"):
            if getattr(self, f) not in (1, -1):
                raise ValueError(f"FanBeamGeometry.{f} must be +1 or -1, got {getattr(self, f)!r}")
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
        e_u = self.channel_direction * np.stack([e_c[:, 1], -e_c[:, 0]], axis=1)  # e_c turned -90 deg * direction
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

#: AAPM CT-MAR body: 512^2 over a 400 mm FOV, 1000 views over 360 deg, 900 equiangular channels; rotation
#: direction and channel order as the challenge's AAPMProj.py (see the module docstring).
AAPM_BODY = FanBeamGeometry(
    name="aapm_body", image_size=512, pixel_size=400.0 / 512, n_views=1000, n_channels=900,
    sid=550.0, sdd=950.0, detector="curved", channel_spacing=1.0, channel_offset=-1.25,
    direction=-1, channel_direction=-1,
)
#: AAPM CT-MAR head: same scanner, 220.16 mm FOV (0.43 mm pixels).
AAPM_HEAD = replace(AAPM_BODY, name="aapm_head", pixel_size=0.43)
#: SynDeepLesion (InDuDoNet / ACDNet / DuDoDp): 416^2 at 0.3692 mm, 640 views, 641 flat bins over 434.5 mm,
#: source and detector 396.9 mm from the isocentre.
SYNDEEPLESION = FanBeamGeometry(
    name="syndeeplesion", image_size=416, pixel_size=0.3692, n_views=640, n_channels=641,
    sid=396.9, sdd=2 * 396.9, detector="flat", channel_spacing=434.5 / 641,
)
#: Unit-test and laptop-demo sizes of the same two scanners. ``tiny`` and ``small`` keep the AAPM scanner's
#: rotation and channel order of convention 1 (the mirror image of the challenge's): they only ever hold data this
#: project simulates with its own operator, so every tiny/small shard and model stays valid.
_AAPM_BODY_V1 = replace(AAPM_BODY, direction=1, channel_direction=1)
TINY = _AAPM_BODY_V1.scaled(64, n_views=96, n_channels=112, name="tiny")
TINY_FLAT = SYNDEEPLESION.scaled(64, n_views=96, n_channels=96, name="tiny_flat")
#: A mid size for the `small` training preset and quick benchmarks.
SMALL = _AAPM_BODY_V1.scaled(128, n_views=250, n_channels=225, name="small")

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


def check_convention(geometry_name: str, version, where: str) -> None:
    """Refuse data or a model made for preset ``geometry_name`` under convention ``version`` (None: written before
    versions were recorded, i.e. version 1) if a later convention changed that preset's rays: mixing the two
    would put the metal trace on the wrong channels and fuse mirrored images (Eq. 10-15). ``where`` names the
    file that recorded it, for the message."""
    if version is None:
        version = 1
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CONVENTION_VERSION:
        raise ValueError(f"{where}: geometry_convention must be an int in [1, {CONVENTION_VERSION}], got {version!r}")
    changed = [v for v in range(version + 1, CONVENTION_VERSION + 1) if geometry_name in CONVENTION_CHANGES.get(v, ())]
    if changed:
        raise ValueError(
            f"{where}: made for geometry {geometry_name!r} under geometry convention {version}, but convention "
            f"{changed[-1]} changed that preset (the AAPM presets now follow the CT-MAR challenge's rotation "
            f"direction and channel order; the old ones were their mirror image, docs/aapm_geometry.md): rebuild it "
            f"with this version (ray_jobs/prepare_data.py for shards, ray_jobs/train_all.py for models)"
        )
