import math

import numpy as np
import pytest

from dudocrop.ct.geometry import AAPM_BODY, PRESETS, FanBeamGeometry, get_geometry


def test_aapm_preset_matches_the_challenge_scanner():
    g = AAPM_BODY
    assert g.sino_shape == (1000, 900) and g.image_shape == (512, 512)
    assert g.delta_gamma == pytest.approx(2 * math.atan(0.5 / 950))
    assert g.delta_gamma == pytest.approx(1.0526e-3, rel=1e-4)
    # gamma_i = (i - 449.5 - 1.25) * dgamma (REFERENCE §3)
    assert g.channel_coords[0] == pytest.approx((0 - 449.5 - 1.25) * g.delta_gamma)
    assert get_geometry("aapm_head").pixel_size == pytest.approx(0.43)


def test_view_zero_has_the_source_at_the_top_and_rays_are_unit():
    for g in PRESETS.values():
        src, e_c, e_u = g.view_frames
        assert src[0] == pytest.approx([0.0, g.sid])
        assert np.allclose(np.linalg.norm(g.ray_directions, axis=-1), 1.0)
        assert np.allclose((e_c * e_u).sum(-1), 0.0)
        # every ray of the central channel passes through the isocentre (up to the channel offset)
        mid = g.ray_directions[:, (g.n_channels - 1) // 2]
        cross = src[:, 0] * mid[:, 1] - src[:, 1] * mid[:, 0]
        assert np.abs(cross).max() < g.sid * 2 * (abs(g.channel_offset) + 1) * g.channel_pitch_at_iso / g.sid


def test_scan_covers_the_body_fov():
    assert AAPM_BODY.scan_radius > 240  # the 400 mm body field fits inside the fan
    for g in PRESETS.values():
        assert g.scan_radius > 0.9 * g.fov_radius


def test_scaled_keeps_fov_and_fan():
    t = AAPM_BODY.scaled(128, n_views=250, n_channels=225)
    assert t.fov_radius == pytest.approx(AAPM_BODY.fov_radius)
    assert t.n_channels * t.delta_gamma == pytest.approx(AAPM_BODY.n_channels * AAPM_BODY.delta_gamma, rel=1e-3)


@pytest.mark.parametrize(
    "field,value,match",
    [("image_size", 1, "image_size"), ("sdd", 100.0, "sdd"), ("detector", "spiral", "detector"),
     ("pixel_size", float("nan"), "pixel_size"), ("direction", 0, "direction"),
     ("channel_direction", 2, "channel_direction"), ("pixel_size", 5.0, "corners")],
)
def test_bad_geometry_is_rejected_by_name(field, value, match):
    kw = AAPM_BODY.to_dict() | {field: value}
    with pytest.raises(ValueError, match=match):
        FanBeamGeometry(**kw)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="aapm_body"):
        get_geometry("nope")
