"""DuDoCLIP (paper §III-B-1, Eq. 2-3): control net as a no-op at start, what one step trains, Eq. 3 with
duplicate captions, CT preprocessing, offline weights, retrieval after a short toy training. Tiny config only."""

from __future__ import annotations

import json
import math
import time

import open_clip
import pytest
import torch

from dudocrop.clip import (
    DuDoCLIP,
    WeightsNotFoundError,
    batch_loss,
    caption_gallery,
    contrastive_loss,
    create_clip,
    default_window,
    dudoclip_loss,
    encode_captions,
    evaluate_retrieval,
    get_model_config,
    get_train_config,
    preprocess_ct,
    resolve_weights,
    retrieval_accuracy,
    text_ids,
)
from dudocrop.clip.config import IN_CODE_ARCHS, TINY_ARCH, DuDoCLIPConfig, DuDoCLIPTrainConfig
from dudocrop.clip.preprocess import CLIP_MEAN, CLIP_STD
from dudocrop.ct.units import hu_to_mu


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DuDoCLIP.from_config("tiny")


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models are many small ops: one thread avoids OpenMP barrier stalls when the 2 cores are shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n, seed=0, size=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------------------- config
def test_presets_carry_the_paper_numbers_and_validate():
    paper, tiny_cfg = get_model_config("paper"), get_model_config("tiny")
    assert paper.arch == "ViT-B-32" and paper.image_size == 224 and paper.share_frozen_towers
    assert tiny_cfg.arch == TINY_ARCH and tiny_cfg.pretrained is None
    t = get_train_config("paper")
    assert (t.batch_size, t.lr, t.epochs) == (200, 2e-5, 1000)
    assert IN_CODE_ARCHS[TINY_ARCH]["text_cfg"]["vocab_size"] == 49408
    assert IN_CODE_ARCHS[TINY_ARCH]["text_cfg"]["context_length"] == 77
    for bad in ({"hu_window": (275.0, -175.0)}, {"domains": ("image", "pet")}, {"image_size": 8}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            DuDoCLIPConfig(**bad)
    with pytest.raises(ValueError, match="lr"):
        DuDoCLIPTrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="preset"):
        get_model_config("huge")


# ----------------------------------------------------------------------------------------------------- model
def test_control_net_starts_as_a_no_op(tiny):
    x = _images(4)
    assert tiny.is_random and tiny.pretrained_source is None
    with torch.no_grad():  # same kernels on both sides: bit-identical
        for domain in ("image", "sinogram"):
            emb = tiny.encode_ct(x, domain)
            plain = tiny.clip.encode_image(x, normalize=True)
            assert torch.equal(emb.content, plain)
            assert emb.content.shape == emb.control.shape == (4, tiny.embed_dim)
    emb = tiny.encode_ct(x, "image")  # grad mode picks other attention kernels: float tolerance
    torch.testing.assert_close(emb.content, tiny.clip.encode_image(x, normalize=True), atol=1e-6, rtol=0)
    assert emb.content.requires_grad  # the controls feed the frozen stream, so gradients reach the controller


def test_unshared_frozen_towers_are_copies_and_also_start_as_no_op():
    torch.manual_seed(0)
    m = DuDoCLIP.from_config("tiny", share_frozen_towers=False)
    assert m.frozen_tower("image") is not m.frozen_tower("sinogram")
    assert not any(p.requires_grad for p in m.domain_towers.parameters())
    x = _images(2, seed=1)
    with torch.no_grad():
        assert torch.equal(m.encode_ct(x, "sinogram").content, m.clip.encode_image(x, normalize=True))


def test_one_step_moves_only_controllers_zero_layers_and_temperature():
    torch.manual_seed(0)
    m = DuDoCLIP.from_config("tiny")
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controllers.") or n == "logit_scale" for n in trainable)
    x = {d: _images(6, seed=i) for i, d in enumerate(m.domains)}
    plain = m.clip.encode_image(x["image"], normalize=True).detach()
    caps = {d: ([f"slice {i % 3}" for i in range(6)], [f"metal {i % 2}" for i in range(6)]) for d in m.domains}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    loss = batch_loss(m, x, caps)
    assert set(loss.terms) == {"image/content", "image/control", "sinogram/content", "sinogram/control"}
    opt.zero_grad()
    loss.total.backward()
    opt.step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    assert "logit_scale" in changed and "clip.logit_scale" not in changed
    assert all(f"controllers.{d}.zero.{i}.weight" in changed for d in m.domains for i in range(2))
    assert len(changed) == len(trainable)  # every controller tensor is on a path to the loss
    with torch.no_grad():
        assert (m.encode_ct(x["image"], "image").content - plain).abs().max() > 1e-4
    # compact checkpoints hold exactly what Eq. 3 trains and restore it
    state = m.trainable_state_dict()
    assert set(state) == trainable
    fresh = DuDoCLIP.from_config("tiny")
    fresh.clip.load_state_dict(m.clip.state_dict())
    fresh.load_trainable_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_ct(x["image"], "image").content,
                                   m.encode_ct(x["image"], "image").content)


def test_frozen_towers_stay_in_eval_mode(tiny):
    tiny.train()
    try:
        assert tiny.controllers["image"].training and not tiny.clip.training
        assert not any(mod.training for mod in tiny.clip.modules())
    finally:
        tiny.eval()


# ------------------------------------------------------------------------------------------------------ loss
def test_loss_without_duplicates_is_clip_loss():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(math.log(20.0))
    ref = open_clip.loss.ClipLoss()(a, b, scale.exp())
    torch.testing.assert_close(contrastive_loss(a, b, scale), ref)
    torch.testing.assert_close(contrastive_loss(a, b, scale, torch.arange(8)), ref)
    # 1/τ is capped at 100 as in CLIP
    torch.testing.assert_close(contrastive_loss(a, b, torch.tensor(9.0)),
                               open_clip.loss.ClipLoss()(a, b, torch.tensor(100.0)))


def test_identical_captions_are_not_negatives():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=-1).expand(5, -1)
    scale = torch.tensor(math.log(1 / 0.07))
    ids = text_ids(["a chest slice"] * 5)
    assert ids.tolist() == [0] * 5
    loss = contrastive_loss(img, txt, scale, ids)
    loss.backward()
    # one distinct text: nothing to contrast, so the loss is exactly 0 with zero gradient (not log 5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.all(img.grad.abs() < 1e-6)
    naive = contrastive_loss(img.detach(), txt, scale)  # duplicates as negatives
    assert float(naive) > math.log(5) - 0.5

    # partial duplicates: image -> text is cross-entropy over the DISTINCT texts, targets by caption identity
    caps = ["two", "one", "two", "three", "one", "two"]
    ids = text_ids(caps)
    assert ids.tolist() == [0, 1, 0, 2, 1, 0]
    distinct = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    s = 1 / 0.07
    logits = s * img @ distinct.T
    i2t = torch.nn.functional.cross_entropy(logits, ids)
    pos = ids.unsqueeze(0) == torch.arange(3).unsqueeze(1)
    t2i = (torch.logsumexp(logits.T, 1) - torch.logsumexp(logits.T.masked_fill(~pos, -math.inf), 1)).mean()
    got = contrastive_loss(img, distinct[ids], torch.tensor(math.log(s)), ids)
    torch.testing.assert_close(got, 0.5 * (i2t + t2i))


def test_eq3_sums_both_pairs_of_both_domains(tiny):
    x = {d: tiny.preprocess(torch.full((3, 1, 32, 40), 50.0), d, window=(0.0, 100.0)) for d in tiny.domains}
    caps = (["a", "b", "c"], ["m1", "m1", "m2"])
    out = tiny(x)
    texts = {d: encode_captions(tiny, *caps) for d in tiny.domains}
    assert texts["image"].control_ids.tolist() == [0, 0, 1]
    loss = dudoclip_loss(out.embeddings, texts, out.logit_scale)
    torch.testing.assert_close(loss.total, sum(loss.terms.values()))
    one = contrastive_loss(out.embeddings["sinogram"].control, texts["sinogram"].control, tiny.logit_scale,
                           texts["sinogram"].control_ids)
    torch.testing.assert_close(loss.terms["sinogram/control"], one)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument(tiny):
    x = _images(2)
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        tiny.encode_ct(x[0], "image")
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, 224, 224\)"):
        tiny.encode_ct(x[:, :1], "image")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images contains NaN"):
        tiny.encode_ct(bad, "image")
    with pytest.raises(ValueError, match="domain must be one of"):
        tiny.encode_ct(x, "pet")
    with pytest.raises(ValueError, match="domain must be one of"):
        tiny({"pet": x})
    with pytest.raises(ValueError, match="ct contains NaN"):
        tiny.preprocess(torch.full((1, 1, 8, 8), float("nan")), "image")
    with pytest.raises(ValueError, match="ct must have 4 dimensions"):
        tiny.preprocess(torch.zeros(8, 8), "image")
    with pytest.raises(ValueError, match="texts must hold at least one caption"):
        tiny.encode_text([])
    with pytest.raises(ValueError, match="texts must be a list of strings"):
        tiny.encode_text("one caption, not a list")
    with pytest.raises(ValueError, match="captions must hold at least one caption"):
        text_ids([])
    with pytest.raises(ValueError, match=r"captions\['image'\] content list is empty"):
        batch_loss(tiny, {"image": x}, {"image": ([], [])})
    with pytest.raises(ValueError, match=r"captions\['image'\] content list has 3 captions for 2 images"):
        batch_loss(tiny, {"image": x}, {"image": (["a", "b", "c"], ["m", "m", "m"])})
    with pytest.raises(ValueError, match="captions must be a mapping with the same domains"):
        batch_loss(tiny, {"image": x}, {"sinogram": (["a", "b"], ["m", "m"])})
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="text_emb must match image_emb's shape"):
        contrastive_loss(a, a[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="text_ids must be an integer tensor of shape"):
        contrastive_loss(a, a, torch.tensor(1.0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must hold one index per image"):
        retrieval_accuracy(a, a, torch.arange(3))


# ------------------------------------------------------------------------------------------------ preprocess
def test_preprocess_windows_resizes_without_cropping_and_normalises():
    lo, hi = -175.0, 275.0
    # left half at the window's bottom, right half above its top: after the map, 0 and 1 (clipped)
    ct = torch.cat([torch.full((2, 1, 16, 8), lo), torch.full((2, 1, 16, 8), 3000.0)], dim=3)
    out = preprocess_ct(ct, (lo, hi))
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1), torch.tensor(CLIP_STD).view(1, 3, 1)
    torch.testing.assert_close(out[:, :, :, 0], ((0 - mean) / std).expand(2, 3, 224))
    torch.testing.assert_close(out[:, :, :, -1], ((1 - mean) / std).expand(2, 3, 224))
    # a non-square sinogram is resized, never centre-cropped: marks in its first/last view and channel survive
    sino = torch.zeros(1, 1, 96, 112)
    sino[..., 0, :] = sino[..., -1, :] = sino[..., :, 0] = sino[..., :, -1] = 8.0
    u = preprocess_ct(sino, (0.0, 8.0)) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(
        1, 3, 1, 1)
    for edge in (u[0, 0, 0, :], u[0, 0, -1, :], u[0, 0, :, 0], u[0, 0, :, -1]):
        assert float(edge.min()) > 0.5
    assert float(u[0, 0, 100:124, 100:124].max()) < 0.05
    assert preprocess_ct(ct.double(), (lo, hi)).dtype == torch.float64  # dtype and device follow the input
    assert default_window("image") == (lo, hi)
    w = default_window("sinogram", "tiny")  # [0, 2 mu_w R], R = 200 mm
    assert w == (0.0, pytest.approx(2 * hu_to_mu(0.0) * 200.0))
    with pytest.raises(ValueError, match="geometry"):
        default_window("sinogram")


def test_model_preprocess_uses_the_config_windows(tiny):
    hu = torch.linspace(-500, 500, 64).repeat(1, 1, 64, 1)
    torch.testing.assert_close(tiny.preprocess(hu, "image"), preprocess_ct(hu, (-175.0, 275.0)))
    sino = torch.rand(2, 1, 96, 112) * 8
    torch.testing.assert_close(tiny.preprocess(sino, "sinogram", geometry="tiny"), preprocess_ct(sino, (0.0, 8.0)))


# --------------------------------------------------------------------------------------------------- weights
def test_random_weights_are_flagged():
    clip, source, tok = create_clip(TINY_ARCH, None)
    assert clip.is_random and clip.pretrained_source is None and source.is_random and source.describe() is None
    assert tok(["a caption"]).shape == (1, 77)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_file_and_local_dir_load(tmp_path, suffix):
    torch.manual_seed(3)
    ref, _, _ = create_clip(TINY_ARCH, None)
    sd = ref.state_dict()
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    clip, source, _ = create_clip(TINY_ARCH, str(path))
    assert not clip.is_random and source.kind == "file" and str(path) in clip.pretrained_source
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in sd.items())
    # a folder in open_clip's local-dir layout: the architecture comes from its open_clip_config.json
    d = tmp_path / "snapshot"
    d.mkdir()
    path.rename(d / f"open_clip_model{suffix}")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": IN_CODE_ARCHS[TINY_ARCH]}))
    m = DuDoCLIP.from_config("tiny", pretrained=f"local-dir:{d}")
    assert not m.is_random and m.source.kind == "local-dir"
    assert all(torch.equal(v, m.clip.state_dict()[k]) for k, v in sd.items())
    # weights of another architecture are refused by name
    other = tmp_path / "other.pt"
    torch.save({**sd, "text_projection": torch.zeros(64, 32)}, other)
    with pytest.raises(ValueError, match="does not fit architecture 'dudoclip-tiny'"):
        create_clip(TINY_ARCH, str(other))


def test_absent_weights_fail_at_once_naming_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "nope" / "clip.safetensors"
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        DuDoCLIP.from_config("tiny", pretrained=str(missing))
    with pytest.raises(WeightsNotFoundError, match="'no_such_tag'.*known tags"):
        resolve_weights("ViT-B-32", "no_such_tag")
    with pytest.raises(WeightsNotFoundError, match="local-dir:/path/to/folder"):
        DuDoCLIP.from_config("tiny", pretrained=f"local-dir:{tmp_path / 'empty'}")
    # a real tag that is not cached: refused before a ViT-B-32 is built; the message lists the places looked at
    with pytest.raises(WeightsNotFoundError, match=r"'laion2b_s34b_b79k'.*HF_HUB_OFFLINE is set.*Looked in"):
        DuDoCLIP.from_config("paper", cache_dir=str(tmp_path), allow_download=True)
    with pytest.raises(WeightsNotFoundError, match="allow_download is False"):
        resolve_weights("ViT-B-32-quickgelu", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("ViT-B-32", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


def test_openai_weights_need_quickgelu(tmp_path):
    with pytest.raises(ValueError, match="quick_gelu=True.*ViT-B-32-quickgelu"):
        resolve_weights("ViT-B-32", "openai", cache_dir=str(tmp_path))
    f = tmp_path / "openai_ViT-B-32.pt"
    f.write_bytes(b"\0")
    with pytest.warns(UserWarning, match="QuickGELU"):
        resolve_weights("ViT-B-32", str(f))
    with pytest.raises(ValueError, match="arch 'ViT-B-99'"):
        resolve_weights("ViT-B-99", None)


# ------------------------------------------------------------------------------------------------- retrieval
def test_retrieval_accuracy_counts_ranks_and_punishes_ties():
    t = torch.eye(4)
    assert retrieval_accuracy(t, t, torch.arange(4), ks=(1, 5)) == {"top1": 1.0, "top5": 1.0}
    shifted = retrieval_accuracy(t, t, torch.tensor([1, 2, 3, 0]), ks=(1, 4))
    assert shifted == {"top1": 0.0, "top4": 1.0}
    collapsed = torch.ones(4, 4) / 2  # every text alike: no credit for a tie
    assert retrieval_accuracy(t, collapsed, torch.arange(4), ks=(1,))["top1"] == 0.0
    gallery, targets = caption_gallery(["b", "a", "b"])
    assert gallery == ["b", "a"] and targets.tolist() == [0, 1, 0]


# ---------------------------------------------------------------------------------------------- toy training
SIZES = (("small", 90.0), ("medium", 125.0), ("large", 160.0))
COUNTS = ("one", "two", "three")


def toy_slices(n: int, gen: torch.Generator, img: int = 64, views: int = 96, chans: int = 112, fov: float = 200.0):
    """CT-like toy data: a water disc (small / medium / large body) holding k = 1..3 metal discs, as an HU image
    and its exact parallel-beam sinogram (line integrals; 96 views x 112 channels, not square). Content caption:
    the body size; control caption: the metal count. Captions lead with the varying word because random text
    towers map captions that differ only at their end to nearly the same embedding."""
    body = torch.randint(0, len(SIZES), (n,), generator=gen)
    count = torch.randint(1, len(COUNTS) + 1, (n,), generator=gen)
    c = (torch.arange(img) + 0.5) * (2 * fov / img) - fov
    yy, xx = torch.meshgrid(-c, c, indexing="ij")
    th = torch.arange(views) * math.pi / views
    s = (torch.arange(chans) + 0.5) * (2 * fov / chans) - fov
    X, Y = torch.empty(n, 1, img, img), torch.empty(n, 1, views, chans)
    for i in range(n):
        R = SIZES[int(body[i])][1]
        discs = [(0.0, 0.0, R, 0.0)]
        while len(discs) < 1 + int(count[i]):
            r0 = (R - 30) * torch.rand(1, generator=gen).sqrt().item()
            a = 2 * math.pi * torch.rand(1, generator=gen).item()
            x0, y0 = r0 * math.cos(a), r0 * math.sin(a)
            if all((x0 - d[0]) ** 2 + (y0 - d[1]) ** 2 > 46.0 ** 2 for d in discs[1:]):
                discs.append((x0, y0, 16.0, 3000.0))
        hu = torch.full((img, img), -1000.0)
        sino = torch.zeros(views, chans)
        for j, (x0, y0, r, h) in enumerate(discs):
            hu[(xx - x0) ** 2 + (yy - y0) ** 2 <= r * r] = h
            dmu = hu_to_mu(h) - (hu_to_mu(0.0) if j else 0.0)  # metal sits inside water
            d = s[None, :] - (x0 * torch.cos(th)[:, None] + y0 * torch.sin(th)[:, None])
            sino += 2 * dmu * (r * r - d * d).clamp(min=0).sqrt()
        X[i, 0] = hu + 10.0 * torch.randn(img, img, generator=gen)
        Y[i, 0] = sino
    content = [f"{SIZES[b][0]} abdomen" for b in body.tolist()]
    control = [f"{COUNTS[k - 1]} metal implant" + ("s" if k > 1 else "") for k in count.tolist()]
    return X, Y, content, control


def test_toy_training_raises_retrieval_above_chance_and_untrained():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_train, steps, batch = 256, 250, 16
    Xtr, Ytr, ctr, mtr = toy_slices(n_train, gen)
    Xte, Yte, cte, mte = toy_slices(128, gen)
    m = DuDoCLIP.from_config("tiny")
    data = {"image": (m.preprocess(Xtr, "image"), m.preprocess(Xte, "image")),
            "sinogram": (m.preprocess(Ytr, "sinogram", geometry="tiny"),
                         m.preprocess(Yte, "sinogram", geometry="tiny"))}

    def top1():
        r = {d: evaluate_retrieval(m, data[d][1], d, cte, mte) for d in data}
        return {f"{d}/{p}": r[d][f"{p}/top1"] for d in data for p in ("content", "control")}, r

    before, r0 = top1()
    chance = {k: r0[k.split("/")[0]][f"{k.split('/')[1]}/chance_top1"] for k in before}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    m.train()
    for _ in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        loss = batch_loss(m, {d: data[d][0][idx] for d in data},
                          {d: ([ctr[i] for i in idx], [mtr[i] for i in idx]) for d in data})
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    after, _ = top1()
    print("top-1 before", before, "after", after, "chance", chance)
    for d in data:  # per domain, the mean over its two pairs (content, control)
        mean_after = (after[f"{d}/content"] + after[f"{d}/control"]) / 2
        mean_before = (before[f"{d}/content"] + before[f"{d}/control"]) / 2
        mean_chance = (chance[f"{d}/content"] + chance[f"{d}/control"]) / 2
        assert mean_after > mean_chance + 0.15, (d, after)
        assert mean_after > mean_before + 0.15, (d, before, after)
    assert sum(after.values()) / 4 > sum(before.values()) / 4 + 0.2
