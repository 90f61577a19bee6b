"""ray_jobs/prepare_data.py end to end: kill the driver mid-run, resume, and get the files of an uninterrupted run.

The job runs as a subprocess (it starts its own local Ray, like ``python ray_jobs/prepare_data.py`` on a laptop)
and is crashed by SIGKILL to the driver and every process it started (its local Ray included).
"""

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dudocrop.ct.geometry import get_geometry
from dudocrop.data.build import SourceOptions, list_case_refs, plan_shards
from dudocrop.data.schema import records_to_table
from dudocrop.data.shards import MANIFEST_NAME, write_shard
from dudocrop.procs import alive, tree

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "ray_jobs" / "prepare_data.py"
# 6 one-slice patients in shards of 2: 4 shards (the per-patient split puts one patient in `test`)
ARGS = ["--source", "synthetic", "--geometry", "tiny", "--n-patients", "6", "--slices-per-patient", "1",
        "--shard-slices", "2", "--seed", "3"]
STATUS = re.compile(r"(\d+) shards \((\d+) already complete, (\d+) to build, (\d+) stale temporaries removed\)")


def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)  # always a fresh local cluster, never the test session's or a user's
    return env


def _popen(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(JOB), *ARGS, "--out", str(out)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run(out: Path, timeout: float = 300) -> str:
    p = _popen(out)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _crash(p)
        raise
    assert p.returncode == 0, log[-3000:]
    return log


def _status(log: str) -> tuple[int, int, int, int]:
    m = STATUS.search(log)
    assert m, log[-3000:]
    return tuple(int(x) for x in m.groups())


def _shards(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(out.glob("*.parquet"))}


def _complete(out: Path) -> set[str]:
    """Shards the job counts as finished: the parquet and, written after it, its ``.info.json`` checksum."""
    return {n for n, p in _shards(out).items() if p.with_name(p.name + ".info.json").exists()}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _stamp(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_ino, st.st_mtime_ns


def _crash(p: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started, the Ray workers included (they run in sessions of their
    own, so the driver's process group alone would let a worker finish its shard after the "crash").
    The tree is frozen first (SIGSTOP until no new process appears), so nothing escapes by forking meanwhile."""
    frozen: set[int] = set()
    while (live := tree(p.pid)) - frozen:
        for pid in live - frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= live
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.communicate()
    t0 = time.time()
    while any(alive(pid) for pid in frozen) and time.time() - t0 < 30:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in frozen)


def _kill_when_partial(out: Path, timeout: float = 300) -> set[str]:
    """Start the job and crash it once a shard is complete (parquet and checksum) but before the manifest exists.
    A shard whose checksum was not written yet when the crash lands is not a survivor: the resume rebuilds it."""
    p = _popen(out)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if _complete(out) and not (out / MANIFEST_NAME).exists():
                break
            assert p.poll() is None, f"job ended before it could be interrupted:\n{p.stdout.read()[-3000:]}"
            time.sleep(0.02)
        else:
            raise AssertionError("no shard appeared in time")
    finally:
        _crash(p)
    assert not (out / MANIFEST_NAME).exists()
    survivors = _complete(out)
    assert survivors
    return survivors


def test_interrupted_run_resumes_to_the_files_of_an_uninterrupted_run(tmp_path):
    total = len(plan_shards(list_case_refs(SourceOptions(source="synthetic", geometry="tiny", n_patients=6,
                                                         slices_per_patient=1, seed=3)), 2))
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"

    # 1. interrupted: the driver (and its local Ray) dies with some shards on disk and no manifest
    survivors = _kill_when_partial(resumed)
    before = {n: _stamp(resumed / n) for n in survivors}

    # 2. resumed: only the missing shards are built; the survivors are reused untouched
    log = _run(resumed)
    n, done, todo, _ = _status(log)
    assert (n, done, todo) == (total, len(survivors), total - len(survivors)), log[-2000:]
    assert {n: _stamp(resumed / n) for n in survivors} == before
    assert not list(resumed.glob("*.tmp-*"))

    # 3. uninterrupted reference in another folder
    _run(reference)

    # 4. same shard bytes, same manifest (counts, shard checksums, schema version, arguments)
    a, b = _shards(resumed), _shards(reference)
    assert sorted(a) == sorted(b) and len(a) == total
    assert {k: _sha(v) for k, v in a.items()} == {k: _sha(v) for k, v in b.items()}
    ma, mb = (json.loads((d / MANIFEST_NAME).read_text()) for d in (resumed, reference))
    assert ma == mb
    assert {s["name"]: s["sha256"] for s in ma["shards"]} == {k: _sha(v) for k, v in a.items()}
    assert ma["total_rows"] == 6 == sum(ma["counts"].values())

    # 5. re-running a complete output rebuilds nothing (no Ray, no shard touched, same manifest bytes)
    stamps = {k: _stamp(v) for k, v in b.items()}
    manifest_bytes = (reference / MANIFEST_NAME).read_bytes()
    log = _run(reference)
    assert _status(log)[1:3] == (total, 0), log[-2000:]
    assert "built" not in log
    assert {k: _stamp(v) for k, v in _shards(reference).items()} == stamps
    assert (reference / MANIFEST_NAME).read_bytes() == manifest_bytes


def test_resume_names_and_rebuilds_a_corrupted_shard(tmp_path, capsys):
    """The resume check (no Ray needed): a shard whose bytes differ from its sidecar is named and not reused."""
    from ray_jobs.prepare_data import completed_shards

    g = get_geometry("tiny")
    opts = SourceOptions(source="synthetic", geometry="tiny", n_patients=3, slices_per_patient=1, seed=3)
    specs = plan_shards(list_case_refs(opts), 1)
    rng = np.random.default_rng(0)
    for s in specs:  # any valid slice table will do: the check is about bytes, not content
        rec = {"case_id": s.refs[0].case_id, "patient_id": s.refs[0].patient_id, "source": "synthetic",
               "anatomy": "body", "split": s.split, "X_ma": rng.normal(size=g.image_shape),
               "X_ref": rng.normal(size=g.image_shape), "Y_ma": rng.random(g.sino_shape),
               "Y_ref": rng.random(g.sino_shape), "metal_mask": np.zeros(g.image_shape, np.float32),
               "metal_trace": np.zeros(g.sino_shape, np.float32)}
        info = write_shard(records_to_table([rec], g), str(tmp_path), s.name, s.split)
        (tmp_path / f"{s.name}.info.json").write_text(json.dumps(asdict(info)))
    assert set(completed_shards(str(tmp_path), specs)) == {s.name for s in specs}
    victim = tmp_path / specs[0].name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    done = completed_shards(str(tmp_path), specs)
    assert set(done) == {s.name for s in specs[1:]}
    assert str(victim) in capsys.readouterr().out
