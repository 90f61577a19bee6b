"""Fault injection for ``ray_jobs/train_all.py`` (issue 20): SIGKILL a run at a random moment inside each stage,
re-run, and compare the final models and report with an uninterrupted run.

    python bench/fault_inject.py --out outputs/fault_inject [--stages clip,sde_image] [--seed 0] [--json]

1. An uninterrupted ``train_all`` (the preset, default ``tiny``) into ``OUT/reference``; its stage times are the
   clock for step 2.
2. One chained sequence into ``OUT/faulty``: start ``train_all``; once the target stage is running, wait a
   seeded-random fraction (0.15-0.85) of that stage's reference time and SIGKILL the driver and every process it
   started (Ray's GCS, raylet and workers included; the tree is frozen with SIGSTOP first so nothing escapes),
   then re-run for the next target stage, and finally let it finish. A stage that completed before its kill
   moment is recorded as such (the kill then lands in whatever stage was running).
3. The final model files (tensors compared one by one), ``pipeline.json``, the fusion choice and the report's
   per-method numbers of the two runs are compared: max |difference| and whether they are identical.

Prints one table of kills and one of comparisons; ``--json`` prints both as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from dudocrop.procs import tree  # noqa: E402 - after the repository is on the path

RUNNING = re.compile(r"train_all: \[(\w+)\] running")
DONE = re.compile(r"train_all: \[(\w+)\] done in ([\d.]+)s")


# ---- killing a process tree ------------------------------------------------------------------------------------
def crash(p: subprocess.Popen) -> int:
    """SIGKILL ``p`` and every process it started; returns how many were killed."""
    frozen: set[int] = set()
    while (live := tree(p.pid)) - frozen:
        for pid in live - frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= live
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(frozen)


# ---- one train_all run -----------------------------------------------------------------------------------------
def run_train_all(out: Path, extra: list[str], log, kill_stage: str | None = None,
                  kill_after: float | None = None, timeout: float = 3600) -> dict:
    """Run train_all into ``out``; with ``kill_stage``, SIGKILL it ``kill_after`` s after that stage starts."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "ray_jobs" / "train_all.py"), "--out", str(out), *extra]
    log.write(f"\n==== {' '.join(cmd)} (kill in {kill_stage} after {kill_after}s)\n")
    log.flush()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    state = {"current": None, "started": None, "durations": {}, "ran": [], "skipped": []}
    lock = threading.Lock()

    def read():
        for line in p.stdout:
            log.write(line)
            log.flush()
            with lock:
                if m := RUNNING.search(line):
                    state["current"], state["started"] = m.group(1), time.time()
                    state["ran"].append(m.group(1))
                elif m := DONE.search(line):
                    state["durations"][m.group(1)] = float(m.group(2))
                    state["current"] = None
                elif m := re.search(r"train_all: \[(\w+)\] complete, skipped", line):
                    state["skipped"].append(m.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0, killed = time.time(), None
    while p.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.2)
        if kill_stage is None or killed:
            continue
        with lock:
            cur, started = state["current"], state["started"]
            past = kill_stage in state["durations"]
        if past or (cur == kill_stage and time.time() - started >= kill_after):
            if cur is None:  # between stages: wait for the next one to start
                continue
            n = crash(p)
            killed = {"stage": cur, "seconds_into_stage": round(time.time() - started, 1), "processes": n,
                      "target_finished_first": past}
    if p.poll() is None:
        crash(p)
        raise RuntimeError(f"train_all into {out} ran past {timeout}s")
    p.wait()
    reader.join(timeout=10)
    log.write(f"==== exit {p.returncode}{' (killed)' if killed else ''}\n")
    return {"returncode": p.returncode, "killed": killed, "durations": state["durations"], "ran": state["ran"],
            "skipped": state["skipped"], "seconds": round(time.time() - t0, 1)}


# ---- comparing two output folders ------------------------------------------------------------------------------
def _tensors(path: Path) -> dict:
    from dudocrop.serialization import load_torch

    blob = load_torch(path, "model file")
    return blob.get("weights") or blob.get("trainable") or {}


def _report_numbers(path: Path) -> dict[str, float]:
    """The report's numbers by (dataset, method, column), wall-clock timings left out."""
    out = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            key = f"{row.get('dataset', '')}/{row.get('method') or i}"
            for k, v in row.items():
                if "second" in k:
                    continue
                try:
                    out[f"{key}/{k}"] = float(v)
                except (TypeError, ValueError):
                    continue
    return out


def _untimed(x):
    """``x`` without wall-clock timings (keys naming seconds), which no two runs share."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if "second" not in k}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


def compare(ref: Path, got: Path) -> list[dict]:
    rows = []
    for folder in ("models", "models_plain"):
        for f in sorted((ref / folder).glob("*.pt")) if (ref / folder).is_dir() else []:
            a, b = _tensors(f), _tensors(got / folder / f.name)
            if set(a) != set(b):
                rows.append({"item": f"{folder}/{f.name}", "max_abs_diff": None, "identical": False,
                             "note": "different tensor names"})
                continue
            d = max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a),
                    default=0.0)
            rows.append({"item": f"{folder}/{f.name}", "max_abs_diff": d, "identical": d == 0.0,
                         "note": f"{len(a)} tensors"})
    for name in ("models/pipeline.json", "fusion/fusion.json"):
        if (ref / name).exists():
            same = _untimed(json.loads((ref / name).read_text())) == _untimed(json.loads((got / name).read_text()))
            rows.append({"item": name, "max_abs_diff": None, "identical": same,
                         "note": "JSON equal but for wall-clock *seconds" if same else "JSON differs"})
    for csv_path in sorted((ref / "report").glob("*.csv")):
        a, b = _report_numbers(csv_path), _report_numbers(got / "report" / csv_path.name)
        common = sorted(set(a) & set(b))
        d = max((abs(a[k] - b[k]) for k in common if a[k] == a[k] and b[k] == b[k]), default=0.0)
        rows.append({"item": f"report/{csv_path.name}", "max_abs_diff": d, "identical": d == 0.0 and set(a) == set(b),
                     "note": f"{len(common)} numbers"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/fault_inject")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--stages", default="", help="comma-separated stages to kill in (default: every stage run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-reference", action="store_true", help="keep an existing complete OUT/reference")
    ap.add_argument("--compare-only", action="store_true", help="only compare OUT/reference with OUT/faulty")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    if a.compare_only:
        print(json.dumps(compare(out / "reference", out / "faulty"), indent=2))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    extra = ["--preset", a.preset]
    with open(out / "fault_inject.log", "a") as log:
        ref_dir = out / "reference"
        ref = run_train_all(ref_dir, extra, log)
        if ref["returncode"]:
            raise SystemExit(f"the uninterrupted run failed; see {out / 'fault_inject.log'}")
        durations = ref["durations"] or {s: 30.0 for s in ref["skipped"]}
        if ref["skipped"] and not a.reuse_reference and not ref["durations"]:
            print("fault_inject: OUT/reference was already complete; stage times default to 30 s", file=sys.stderr)
        targets = [s for s in (a.stages.split(",") if a.stages else list(durations)) if s]
        faulty, kills = out / "faulty", []
        for stage in targets:
            if (faulty / "stages" / f"{stage}.json").exists():
                kills.append({"target": stage, "killed": None, "note": "already complete before its turn"})
                continue
            after = round(rng.uniform(0.15, 0.85) * durations.get(stage, 30.0), 1)
            r = run_train_all(faulty, extra, log, kill_stage=stage, kill_after=after)
            kills.append({"target": stage, "planned_seconds_into_stage": after,
                          "reference_stage_seconds": durations.get(stage), "killed": r["killed"],
                          "returncode": r["returncode"], "resumed_skipping": r["skipped"]})
            if r["killed"] is None:
                break
        final = run_train_all(faulty, extra, log)
        if final["returncode"]:
            raise SystemExit(f"the re-run after the kills failed; see {out / 'fault_inject.log'}")
    comparison = compare(ref_dir, faulty)
    result = {"preset": a.preset, "seed": a.seed, "reference_seconds": ref["seconds"], "kills": kills,
              "final_run": {"seconds": final["seconds"], "skipped": final["skipped"], "ran": final["ran"]},
              "comparison": comparison, "all_identical": all(r["identical"] for r in comparison)}
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"uninterrupted run: {ref['seconds']} s; final re-run after the kills: {final['seconds']} s "
          f"(skipped {len(final['skipped'])} complete stages, ran {final['ran']})")
    print("| target stage | killed in | s into stage (ref. stage s) | processes killed |")
    print("|---|---|---|---|")
    for k in kills:
        kd = k.get("killed") or {}
        print(f"| {k['target']} | {kd.get('stage', k.get('note', 'not killed'))} | "
              f"{kd.get('seconds_into_stage', '')} ({k.get('reference_stage_seconds', '')}) | "
              f"{kd.get('processes', '')} |")
    print("| output | max abs diff | identical | note |")
    print("|---|---|---|---|")
    for r in comparison:
        print(f"| {r['item']} | {r['max_abs_diff']} | {r['identical']} | {r['note']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
