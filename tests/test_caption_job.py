"""Caption sidecars on real prepared shards (issue 4, ``ray_jobs/caption.py``): interruption and resume at row
granularity inside a shard and across shards, corrupt / leftover files, the manifest, the join for DuDoCLIP,
the pictures a VLM is shown, and the Fig. 6 table's plumbing.

Shards: three tiny synthetic shards (2 + 3 + 3 slices) built in-process by ``dudocrop.data.build`` — the same
functions ``ray_jobs/prepare_data.py`` runs in its tasks — so only one Ray job start is paid here.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dudocrop.captions import (
    CAPTION_TEXTS,
    CONTEXT_LENGTH,
    FIELDS,
    CaptionSettings,
    build_requests,
    caption_shard,
    clip_token_count,
    create_engine,
    evaluate_prompts,
    iter_captioned_records,
    read_captions,
    read_shard_with_captions,
    to_rgb,
    window_for,
)
from dudocrop.captions.captioning import pending_rows, settings_hash
from dudocrop.captions.engine import CaptionEngine
from dudocrop.captions.evaluate import CONDITIONS

SIZES = (2, 3, 3)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(data dir, [ShardInfo]): prepared tiny synthetic shards with a manifest, never written to by the tests."""
    from tests.shard_fixtures import tiny_caption_shards

    return tiny_caption_shards(tmp_path_factory.mktemp("shards"), SIZES, n_patients=4)


class Counting(CaptionEngine):
    """The template engine, counting requests; ``fail_after`` calls it raises (a killed worker)."""

    name = "template"  # same settings, same keys: what a restarted job would use

    def __init__(self, fail_after: int | None = None):
        self.inner = create_engine("template")
        self.calls, self.requests, self.fail_after = 0, 0, fail_after

    def settings(self) -> dict:
        return self.inner.settings()

    def caption(self, requests):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")  # not an Exception: nothing may swallow it
        self.calls += 1
        self.requests += len(requests)
        return self.inner.caption(requests)


# ---- resume inside a shard (library, no Ray) -----------------------------------------------------------
def test_interrupted_shard_resumes_to_the_uninterrupted_result(shards, tmp_path):
    data, infos = shards
    name, n = infos[1].name, infos[1].rows  # 3 slices
    cdir = tmp_path / "caps"
    with pytest.raises(KeyboardInterrupt):
        caption_shard(str(data), name, Counting(fail_after=1), captions_dir=str(cdir), batch_rows=1)
    side = cdir / "train-00001.captions.parquet"
    partial = pq.read_table(side)
    first = pq.read_table(data / name, columns=["case_id"])["case_id"].to_pylist()
    assert partial["case_id"].to_pylist() == first[:1]  # the finished batch survived the interruption
    assert not list(cdir.glob("*.tmp-*"))
    key = settings_hash(create_engine("template").settings(), CaptionSettings())
    assert pending_rows(str(data), name, key, str(cdir)) == n - 1
    with pytest.raises(ValueError, match=f"no captions for {n - 1} rows"):
        read_shard_with_captions(str(data), name, str(cdir))
    part = read_shard_with_captions(str(data), name, str(cdir), allow_missing=True)
    assert part["caption_x_tuple"].null_count == n - 1

    eng = Counting()
    info = caption_shard(str(data), name, eng, captions_dir=str(cdir), batch_rows=2)
    assert (info.rows, info.reused, info.captioned) == (n, 1, n - 1)
    assert eng.requests == (n - 1) * len(FIELDS)  # only the missing rows went to the engine
    clean = caption_shard(str(data), name, Counting(), captions_dir=str(tmp_path / "clean"))
    assert _sha(side) == clean.sha256 == info.sha256  # byte-identical to an uninterrupted run
    assert _sha(data / name) == infos[1].sha256  # the shard is only read
    with pytest.raises(ValueError, match="batch_rows"):
        caption_shard(str(data), name, eng, captions_dir=str(cdir), batch_rows=0)


# ---- the job: interrupted state across shards, one Ray run ---------------------------------------------
def test_caption_job_resumes_partial_corrupt_and_leftover_sidecars(shards, tmp_path, ray_session, capsys):
    from ray_jobs import caption as job

    data, infos = shards
    cdir = tmp_path / "caps"
    # the state a killed run leaves: shard 0 done, shard 1 one row in, shard 2 a torn file and a temporary
    done0 = caption_shard(str(data), infos[0].name, Counting(), captions_dir=str(cdir))
    with pytest.raises(KeyboardInterrupt):
        caption_shard(str(data), infos[1].name, Counting(fail_after=1), captions_dir=str(cdir), batch_rows=1)
    (cdir / "train-00002.captions.parquet").write_bytes(b"PAR1 torn write")
    (cdir / "train-00002.captions.parquet.tmp-deadbeef").write_bytes(b"partial")
    capsys.readouterr()

    args = ["--data", str(data), "--captions-dir", str(cdir), "--rows-per-write", "2"]
    m = job.run(job.parse_args(args))
    out = capsys.readouterr().out
    assert f"1 complete, 2 to caption ({SIZES[1] - 1 + SIZES[2]} rows); 1 stale temporaries removed" in out
    assert "[1/2]" in out and "[2/2]" in out and "rows/s" in out  # progress, one line per finished shard
    by = {s["shard"]: s for s in m["sidecars"]}
    assert (by[infos[0].name]["reused"], by[infos[0].name]["captioned"]) == (SIZES[0], 0)
    assert by[infos[0].name]["sha256"] == done0.sha256  # reused, not redone
    assert (by[infos[1].name]["reused"], by[infos[1].name]["captioned"]) == (1, SIZES[1] - 1)
    assert (by[infos[2].name]["reused"], by[infos[2].name]["captioned"]) == (0, SIZES[2])  # torn file redone
    assert m["totals"]["rows"] == sum(SIZES) and not list(cdir.glob("*.tmp-*"))
    # the manifest records engine and settings, and they key the rows
    manifest = json.loads((cdir / "manifest.json").read_text())
    assert manifest["engine"] == create_engine("template").settings()
    assert manifest["settings"] == {"qualified": True, "tuple_source": "residual", "context_length": CONTEXT_LENGTH}
    assert manifest["settings_hash"] == settings_hash(manifest["engine"], CaptionSettings())
    assert set(read_captions(str(data), infos[2].name, str(cdir))["settings_hash"].to_pylist()) == {
        manifest["settings_hash"]}
    assert manifest["cli"]["rows_per_write"] == 2 and set(manifest["prompts"]) == {"P1", "P2", "P3", "P4"}
    assert manifest["data_manifest_shards"] == {i.name: i.sha256 for i in infos}
    assert {i.name: _sha(data / i.name) for i in infos} == {i.name: i.sha256 for i in infos}  # arrays untouched

    sides = {s["sidecar"]: _sha(cdir / s["sidecar"]) for s in m["sidecars"]}
    m2 = job.run(job.parse_args(args))  # a re-run finds nothing to do and starts no work
    assert f"{len(SIZES)} complete, 0 to caption (0 rows)" in capsys.readouterr().out
    assert {s["sidecar"]: _sha(cdir / s["sidecar"]) for s in m2["sidecars"]} == sides


# ---- the join DuDoCLIP reads ---------------------------------------------------------------------------
def test_captioned_records_for_clip(shards, tmp_path):
    data, infos = shards
    cdir = str(tmp_path / "caps")
    caption_shard(str(data), infos[2].name, create_engine("template"), captions_dir=cdir)
    recs = list(iter_captioned_records(str(data), infos[2].name, cdir, columns=["X_ma", "X_ref", "Y_ma", "Y_ref"]))
    shard = pq.read_table(data / infos[2].name, columns=["case_id", "X_ma"])
    assert [r["case_id"] for r in recs] == shard["case_id"].to_pylist()  # shard order
    assert "metal_mask" not in recs[0]  # only the columns asked for (plus the join keys)
    g_shape = np.asarray(recs[0]["X_ma"]).shape
    assert recs[0]["X_ma"].dtype == np.float32 and g_shape == (64, 64)
    np.testing.assert_array_equal(recs[1]["X_ma"], shard["X_ma"].combine_chunks().to_numpy_ndarray()[1])
    for r in recs:
        for col in CAPTION_TEXTS.values():
            assert r[col] and clip_token_count(r[col]) <= CONTEXT_LENGTH
        assert r["caption_x_tuple"].startswith(f"metal: quantity {r['qspd_quantity']};")
        assert r["caption_y_tuple"].startswith("metal trace: quantity ")


# ---- what a VLM is shown -------------------------------------------------------------------------------
def test_requests_show_each_view_as_windowed_rgb(shards):
    data, infos = shards
    from dudocrop.data.shards import iter_records

    rec = next(iter(iter_records(pq.read_table(data / infos[0].name))))
    reqs = build_requests(rec, CaptionSettings())
    assert [r.view for r in reqs] == ["X_ref", "X_r", "Y_ref", "Y_r"]
    arrays = {"X_ref": rec["X_ref"], "X_r": rec["X_ma"] - rec["X_ref"], "Y_ref": rec["Y_ref"],
              "Y_r": rec["Y_ma"] - rec["Y_ref"]}
    for r in reqs:
        w = window_for(r.view, rec["geometry"])
        im = r.image
        assert im.mode == "RGB"
        px = np.asarray(im)
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
        if r.view.startswith("X"):
            assert im.size == (64, 64)
            want = np.round(np.clip((arrays[r.view] - w.lo) / (w.hi - w.lo), 0, 1) * 255)
            assert np.abs(px[..., 0].astype(int) - want).max() <= 1  # exactly the stated window
        else:
            assert im.size[0] == im.size[1] == max(arrays[r.view].shape)  # sinogram resized, never cropped
            assert np.array_equal(px, np.asarray(to_rgb(arrays[r.view], w, square=True)))
        assert w.describe() in r.text  # the qualified prompt states the window it was shown in
    trace = np.asarray(rec["metal_trace"]) > 0.5
    y_r = np.asarray(to_rgb(arrays["Y_r"], window_for("Y_r", rec["geometry"])))[..., 0]
    assert y_r[trace].mean() > y_r[~trace].mean() + 20  # the metal trace is bright in the residual picture


# ---- the Fig. 6 table ----------------------------------------------------------------------------------
class Fixed(CaptionEngine):
    name = "fixed"

    def __init__(self, text):
        self.text = text

    def caption(self, requests):
        return [self.text] * len(requests)


def test_prompt_table_conditions_and_scoring(shards):
    data, infos = shards
    from dudocrop.data.shards import iter_records

    recs = list(iter_records(pq.read_table(data / infos[1].name)))
    table = evaluate_prompts(recs, create_engine("template"))
    assert [r["condition"] for r in table] == [c[0] for c in CONDITIONS]
    for p in ("P1", "P2", "P3", "P4"):  # each prompt with and without its qualifier
        assert {r["qualified"] for r in table if r["prompt"] == p} == {True, False}
    views = {r["condition"]: r["view"] for r in table}
    assert (views["P2 on X_r"], views["P2 on X_ma"], views["P4 on Y_r"], views["P4 on Y_ma"]) == (
        "X_r", "X_ma", "Y_r", "Y_ma")
    assert all(r["captions"] == len(recs) and r["positive"] > 0 for r in table)
    # the scorer, not the engine, decides: a false statement is negative under every condition
    wrong = evaluate_prompts(recs, Fixed("MRI of the lungs with seven metal implants, 90 mm, in the skull"))
    assert all(r["negative"] >= 3 * len(recs) for r in wrong)
    assert all(r["positive"] == 0 and r["precision"] is None for r in evaluate_prompts(recs, Fixed("")))
