"""PNG panels: exact pixel size, windows and red metal, atomic writes, bad input; the demo end to end."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import dudocrop.viz as viz
from dudocrop.metrics import DISPLAY_WINDOW_HU
from dudocrop.viz import LABEL_PX, PAD_PX, TITLE_PX, panel_size, save_panel


def _images(n=64):
    yy, xx = np.mgrid[:n, :n]
    ref = np.where((xx - n / 2) ** 2 / (0.4 * n) ** 2 + (yy - n / 2) ** 2 / (0.3 * n) ** 2 <= 1, 40.0, -1000.0)
    ref = ref.astype(np.float32)
    noisy = ref + np.random.default_rng(0).normal(0, 30, ref.shape).astype(np.float32)
    metal = np.zeros((n, n), dtype=bool)
    metal[30:34, 20:24] = True
    return ref, noisy, metal


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_panel_has_the_expected_pixel_size(tmp_path):
    ref, noisy, metal = _images()
    p = save_panel(tmp_path / "p.png", {"clean": ref, "noisy": noisy, "torch": torch.from_numpy(noisy)[None, None]},
                   reference=ref, metal_mask=metal)
    img = _png(p)
    # 64 px images are zoomed x4 to 256 px tiles: 3 tiles + 4 gaps wide; 2 rows, 3 gaps, titles, 2 label bands
    assert img.shape[:2] == (2 * 256 + 3 * PAD_PX + TITLE_PX + 2 * LABEL_PX, 3 * 256 + 4 * PAD_PX)
    assert img.shape[:2] == panel_size(3, ref.shape, with_reference=True)
    bare = _png(save_panel(tmp_path / "b.png", {"a": ref, "b": noisy}, annotate=False, scale=1))
    assert bare.shape[:2] == (64 + 2 * PAD_PX, 2 * 64 + 3 * PAD_PX) == panel_size(2, (64, 64), False, False, 1)


def test_panel_windows_and_red_metal(tmp_path):
    ref, _, metal = _images()
    img = ref.copy()
    img[10, 10] = DISPLAY_WINDOW_HU[1] + 100  # above the display window: white
    img[12, 10] = 0.5 * sum(DISPLAY_WINDOW_HU)  # mid-window: mid-grey
    err = ref.copy()
    err[12, 10] += 400  # the top of the error window: white on the error row
    out = _png(save_panel(tmp_path / "w.png", {"img": img, "err": err}, reference=ref, metal_mask=metal, scale=2))
    y0, x0 = PAD_PX + TITLE_PX, PAD_PX

    def px(row, col, tile_col=0, tile_row=0):
        y = y0 + tile_row * (64 * 2 + PAD_PX + LABEL_PX) + 2 * row
        x = x0 + tile_col * (64 * 2 + PAD_PX) + 2 * col
        return out[y, x]

    assert tuple(px(10, 10)) == (255, 255, 255)
    assert abs(int(px(12, 10)[0]) - 128) <= 1
    assert tuple(px(0, 0)) == (0, 0, 0)  # air below the window
    assert tuple(px(31, 21)) == (255, 0, 0)  # metal, painted red on every tile
    assert tuple(px(31, 21, tile_col=1, tile_row=1)) == (255, 0, 0)
    assert tuple(px(12, 10, tile_col=1, tile_row=1)) == (255, 255, 255)
    assert abs(int(px(5, 5, tile_col=1, tile_row=1)[0]) - 128) <= 1  # zero error: mid-grey


def test_panel_is_written_atomically(tmp_path, monkeypatch):
    ref, noisy, _ = _images()
    target = tmp_path / "a.png"
    seen = {}
    real_replace = os.replace

    def spy(src, dst):
        seen["src"], seen["dst"] = os.fspath(src), os.fspath(dst)
        seen["target_existed"] = os.path.exists(dst)
        with Image.open(src) as im:  # the temporary file is a complete PNG before it takes the name
            im.load()
        return real_replace(src, dst)

    monkeypatch.setattr(viz.os, "replace", spy)
    save_panel(target, {"x": noisy}, reference=ref)
    assert os.path.dirname(seen["src"]) == str(tmp_path) and seen["dst"] == str(target)
    assert not seen["target_existed"]
    assert sorted(os.listdir(tmp_path)) == ["a.png"]

    # a failure while writing leaves the previous file intact and no temporary behind
    before = target.read_bytes()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def broken(self, f, *a, **k):
        f.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_panel(target, {"x": ref}, reference=ref)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


def test_bad_input_names_the_argument(tmp_path):
    ref, noisy, metal = _images()
    p = tmp_path / "bad.png"
    nan = noisy.copy()
    nan[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"columns\['LI'\]"):
        save_panel(p, {"clean": ref, "LI": nan})
    with pytest.raises(ValueError, match=r"columns\['LI'\]"):
        save_panel(p, {"clean": ref, "LI": noisy[:32]})
    with pytest.raises(ValueError, match="columns"):
        save_panel(p, {})
    with pytest.raises(ValueError, match="reference"):
        save_panel(p, {"x": noisy}, reference=ref[:, :32])
    with pytest.raises(ValueError, match="metal_mask"):
        save_panel(p, {"x": noisy}, metal_mask=metal[:32])
    with pytest.raises(ValueError, match="error_window"):
        save_panel(p, {"x": noisy}, error_window=(400, -400))
    with pytest.raises(ValueError, match="path"):
        save_panel(tmp_path / "x.jpg", {"x": noisy})
    with pytest.raises(ValueError, match="scale"):
        save_panel(p, {"x": noisy}, scale=0)
    assert not p.exists()


def test_demo_runs_end_to_end(tmp_path, capsys):
    from dudocrop.demo import main

    res = main(["--out", str(tmp_path), "--geometry", "tiny", "--seed", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["phantom", "simulate", "X_ma", "LI", "NMAR", "panel"]
    assert os.path.exists(res["panel"]) and os.path.dirname(res["panel"]) == str(tmp_path)
    for k in ("X_ma", "LI", "NMAR"):
        assert np.isfinite(res[k]["rmse"]) and res[k]["time_s"] >= 0
    assert res["LI"]["rmse"] < res["X_ma"]["rmse"] and res["NMAR"]["rmse"] < res["X_ma"]["rmse"]
