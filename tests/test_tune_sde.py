"""The λ sweep (tune_spaces/sde.py, ray_jobs/tune_sde.py: Ray Train inside Ray Tune, ASHA, MLflow, restore), its
hand-over to stage 2 (train_sde --tuned, train_all --set tune_lambda=true) and the sweep pictures.

The fast tests need no Ray; the sweeps themselves train real (tiny) IR-SDEs in Tune trials and are ``slow``
(``python -m pytest tests/test_tune_sde.py -m slow``; ≈2-4 min each on 2 free cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dudocrop.sde.config import PAPER_LAMBDA_255
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.train import get_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the search space and the λ override -------------------------------------------------------------------------
def test_space_holds_the_papers_lambda_and_names_bad_values():
    from tune_spaces.sde import DEFAULT_LAMBDAS_255, sde_space

    grid = sde_space("grid", (20.0, 80.0))["lam_255"]["grid_search"]
    assert grid == [20.0, 80.0, PAPER_LAMBDA_255]  # the paper's 50 is always added, so each sweep compares with it
    assert len(sde_space()["lam_255"]["grid_search"]) >= 6 and PAPER_LAMBDA_255 in DEFAULT_LAMBDAS_255
    rnd = sde_space("random", (10.0, 150.0), lr=(1e-3, 2e-3), T=(50, 100))
    assert (rnd["lam_255"].lower, rnd["lam_255"].upper) == (10.0, 150.0)
    assert rnd["lr"]["grid_search"] == [1e-3, 2e-3] and rnd["T"]["grid_search"] == [50, 100]
    with pytest.raises(ValueError, match="lambdas_255"):
        sde_space("grid", (0.0, 50.0))
    with pytest.raises(ValueError, match="span the paper"):
        sde_space("random", (60.0, 150.0))
    with pytest.raises(ValueError, match="T must hold positive int"):
        sde_space("grid", T=(2.5,))


def test_lambda_override_changes_the_stationary_noise_of_the_forward_sde():
    """SDETrainConfig.lam replaces the preset's λ (Eq. 4-6): the forward process at t = T has mean ≈ μ and
    standard deviation ≈ λ (σ̄_T² = λ²(1 − e^{−2θ̄_T})), measured on samples."""
    for lam_255 in (20.0, 120.0):
        cfg = get_train_config("tiny", lam=lam_255 / 255.0, T=50)
        sde = IRSDE(cfg.sde_config())
        assert sde.config.lam == pytest.approx(lam_255 / 255.0) and sde.config.T == 50
        mu, x0 = torch.full((4, 1, 64, 64), 0.3), torch.full((4, 1, 64, 64), 0.6)
        xt = sde.q_sample(x0, mu, torch.full((4,), 50, dtype=torch.long), generator=torch.Generator().manual_seed(0))
        assert float(xt.std()) == pytest.approx(lam_255 / 255.0, rel=0.03)
        assert float(xt.mean()) == pytest.approx(0.3, abs=0.01)
    assert get_train_config("tiny").sde_config().lam == pytest.approx(PAPER_LAMBDA_255 / 255.0)
    with pytest.raises(ValueError, match="SDETrainConfig.lam"):
        get_train_config("tiny", lam=-0.1)
    with pytest.raises(ValueError, match="SDETrainConfig.T"):
        get_train_config("tiny", T=0)


# ---- hand-over to stage 2 ------------------------------------------------------------------------------------------
def test_train_sde_reads_the_chosen_lambda_and_set_wins(tmp_path):
    from ray_jobs import train_sde
    from ray_jobs.tune_sde import TUNED_FILE, record_choice

    models = str(tmp_path / "models")
    record_choice(models, {"domain": "image", "chosen": {"lam": 35 / 255, "lr": 1e-3}, "val_psnr": 30.0})
    record_choice(models, {"domain": "sinogram", "chosen": {"lam": 75 / 255}, "val_psnr": 40.0})
    path = os.path.join(models, TUNED_FILE)
    base = ["--data", "d", "--out", "o", "--tuned", path]
    assert train_sde.parse_args(base + ["--domain", "image"]).overrides == {"lam": 35 / 255, "lr": 1e-3}
    assert train_sde.parse_args(base + ["--domain", "sinogram"]).overrides == {"lam": 75 / 255}
    assert train_sde.parse_args(base + ["--set", "lam=0.2"]).overrides["lam"] == 0.2  # an explicit --set wins
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        train_sde.parse_args(["--data", "d", "--out", "o", "--tuned", str(bad)])
    from ray_jobs.tune_sde import tuned_overrides

    with pytest.raises(ValueError, match="bad.json"):
        tuned_overrides(str(bad), "image")


def test_train_all_runs_tune_lambda_before_stage_2_only_when_asked(tmp_path):
    from ray_jobs import train_all

    a = train_all.parse_args(["--out", str(tmp_path), "--set", "tune_lambda=true", "--set", "tune_lambda_steps=40"])
    p = train_all.resolve_preset(a)
    argv = train_all.stage_argv(p, str(tmp_path), None)
    assert train_all.STAGES.index("tune_lambda") < train_all.STAGES.index("sde_image")
    assert argv["tune_lambda"][argv["tune_lambda"].index("--steps") + 1] == "40"
    tuned = f"{tmp_path}/models/tuned_sde.json"
    for stage in ("sde_image", "sde_sinogram"):
        assert argv[stage][-2:] == ["--tuned", tuned]
        assert "tune_lambda" in train_all.DEPS[stage]  # a new choice re-runs stage 2
    # the stage's arguments parse as tune_sde's, with the preset's image_set (steps=...) as the base
    from ray_jobs import tune_sde

    t = tune_sde.parse_args(argv["tune_lambda"])
    assert t.steps == 40 and t.domain == "image" and t.models == f"{tmp_path}/models"
    off = train_all.stage_argv(train_all.resolve_preset(train_all.parse_args(["--out", str(tmp_path)])),
                               str(tmp_path), None)
    assert "--tuned" not in off["sde_image"]


def test_train_all_tune_lambda_stage_fits_the_tiny_presets_cluster(tmp_path, monkeypatch):
    """The stage as train_all builds it for the tiny preset, with no --steps of its own (the image_set's 300 steps),
    runs on a node with the preset's CPUs: its default validation interval divides the steps, and one trial (one
    Train worker + the trial function) fits. Both broke the real run: 300 % 37 stopped it, and a trial of the
    preset's 2 workers + 0.01 CPU waited forever on 2 CPUs."""
    from ray_jobs import common, train_all, tune_sde

    p = train_all.resolve_preset(train_all.parse_args(["--out", str(tmp_path), "--set", "tune_lambda=true"]))
    t = tune_sde.parse_args(train_all.stage_argv(p, str(tmp_path), None)["tune_lambda"])
    over = tune_sde.trial_config(t)
    assert over["steps"] == 300 and 300 % over["validate_every"] == 0 and over["validate_every"] <= 300 // 8
    monkeypatch.setattr(common, "cluster_cpus", lambda: float(p.workers * p.cpus_per_worker))
    monkeypatch.setattr(common, "cluster_gpus", lambda: 0.0)
    tune_sde.check_fits(t)  # fits: one 1-CPU worker per trial
    assert tune_sde.max_concurrent(t) == 1
    t.workers = p.workers  # the preset's 2 workers per trial would not: a clear error, not a hang
    with pytest.raises(SystemExit, match="--workers 2"):
        tune_sde.check_fits(t)


def test_tune_sde_names_bad_arguments(capsys):
    from ray_jobs import tune_sde

    for argv, what in ((["--lambdas", "10,x"], "comma-separated"), (["--set", "lam=0.1"], "lam"),
                       (["--workers", "0"], "--workers")):
        with pytest.raises(SystemExit):
            tune_sde.parse_args(["--data", "d", "--out", "o", *argv])
        assert what in capsys.readouterr().err
    a = tune_sde.parse_args(["--data", "d", "--out", "o", "--steps", "50", "--interval", "20"])
    with pytest.raises(SystemExit, match="multiple of --interval"):
        tune_sde.trial_config(a)


# ---- pictures ------------------------------------------------------------------------------------------------------
def test_sweep_pictures_are_written(tmp_path):
    from PIL import Image

    from dudocrop.eval.sweep_plots import plot_fusion_surface, plot_sde_sweep, plot_steps_sweep

    trials = [{"trial_id": str(i), "lam_255": lam, "lr": None, "T": None, "steps": s, "val_psnr": v,
               "val_ssim": 0.9, "stopped_early": s < 40} for i, (lam, s, v) in
              enumerate(((15.0, 40, 30.0), (50.0, 40, 31.0), (110.0, 20, 25.0)))]
    history = [{"trial_id": t["trial_id"], "lam_255": t["lam_255"], "step": s, "val_psnr": t["val_psnr"] - 5 + s / 10}
               for t in trials for s in range(10, t["steps"] + 1, 10)]
    g = np.linspace(0, 1, 3)
    fusion = [{"k": k, "alpha": a, "beta": b, "psnr": 30 + k - (a - 0.5) ** 2 + b} for k in g for a in g for b in g]
    paths = [plot_sde_sweep(tmp_path / "sde.png", history, trials, 40, trials[1]),
             plot_fusion_surface(tmp_path / "fusion.png", fusion, {"k": 1.0, "alpha": 0.5, "beta": 1.0}),
             plot_steps_sweep(tmp_path / "steps.png", [{"steps": s, "psnr": 30 + np.log(s), "ssim": 0.9,
                                                         "seconds_per_slice": 0.01 * s} for s in (1, 2, 5)]),
             plot_steps_sweep(tmp_path / "steps_cpu.png", [{"steps": s, "psnr": 30 + np.log(s), "ssim": 0.9,
                                                             "seconds_per_slice": 0.02 * s,
                                                             "cpu_seconds_per_slice": 0.01 * s} for s in (1, 2, 5)])]
    for p in paths:
        im = np.asarray(Image.open(p))
        assert im.shape[0] > 300 and im.shape[1] > 800 and im.std() > 10, p  # a drawn picture, not a blank one


# ---- the sweep (slow: real training runs in Tune trials) -------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny synthetic shards: 16 train + 4 val slices (no embeddings: the sweeps train the plain IR-SDE)."""
    from tests.shard_fixtures import tiny_train_val_shards

    out = str(tmp_path_factory.mktemp("tune-shards"))
    tiny_train_val_shards(out)
    return out


def _argv(data, out, models, lambdas, steps=40, interval=10):
    return ["--data", data, "--out", out, "--models", models, "--no-embeddings", "--lambdas", lambdas,
            "--steps", str(steps), "--interval", str(interval), "--grace", str(interval), "--max-concurrent", "1",
            "--set", "patch=32", "--set", "val_slices=2", "--set", "val_steps=4"]


def _asha_replay(hist, order, grace: int, rf: float, max_t: int) -> set:
    """The trials AsyncHyperBandScheduler stops, replayed from the reports of trials run one at a time in
    ``order`` (its rule: at the first rung a report passes, stop when the value is under the rf-quantile of the
    values earlier trials recorded there)."""
    import numpy as np

    rungs = [(m, {}) for m in sorted((grace * rf ** k for k in range(32) if grace * rf ** k < max_t), reverse=True)]
    stopped = set()
    for lam in order:
        for _, r in hist[hist.lam_255 == lam].sort_values("step").iterrows():
            for m, rec in rungs:
                if r.step >= m and lam in rec:
                    break
                if r.step < m:
                    continue
                if rec and r.val_psnr < np.nanpercentile(list(rec.values()), (1 - 1 / rf) * 100):
                    stopped.add(lam)
                rec[lam] = r.val_psnr
                break
    return stopped


def test_asha_replay_agrees_with_rays_scheduler():
    """The slow test's replay of ASHA's rule stops the same trials as Ray's AsyncHyperBandScheduler fed the same
    reports (random values, trials one at a time, a trial missing a report as after a worker restart)."""
    import numpy as np
    import pandas as pd
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    rng = np.random.default_rng(0)
    for case in range(20):
        sched = AsyncHyperBandScheduler(time_attr="step", metric="val_psnr", mode="max", max_t=41, grace_period=10,
                                        reduction_factor=2)
        rows, stopped = [], set()
        for lam in (2.0, 250.0, 50.0, 75.0):
            trial = Trial("__fake", trial_id=f"t{case}_{lam:g}", stub=True)
            sched.on_trial_add(None, trial)
            for step in (10, 20, 30, 40):
                if lam == 2.0 and step == 20:
                    continue  # the report a killed worker never made
                v = float(rng.normal(5, 1))
                rows.append({"lam_255": lam, "step": step, "val_psnr": v})
                if sched.on_trial_result(None, trial, {"step": step, "val_psnr": v}) == TrialScheduler.STOP:
                    stopped.add(lam)
                    break
        assert _asha_replay(pd.DataFrame(rows), (2.0, 250.0, 50.0, 75.0), 10, 2, 41) == stopped, case


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_stops_weak_trials_resumes_a_killed_worker_and_logs_to_mlflow(data, tmp_path, ray_session):
    """Three λ, one trial at a time, in the order 2, 250, 50: ASHA stops a trial whose val PSNR at a rung is below
    the rung's cut, and the next trial still starts (the stopped trial's resources came back); a worker of the first
    trial dies after its step-20 checkpoint and the trial resumes from it; MLflow holds a parent run with one child
    per trial; the choice is recorded. Which trials ASHA stops is checked against its rule replayed on the reported
    values, not against a measured ordering; the one premise is that λ·255 = 250 is weak at step 10: with the noise
    output the sampler's error is the network's noise error times σ_t ∝ λ (Eq. 4-6), 125 times λ·255 = 2's (measured
    before on tiny models: the early val PSNR falls with λ, 5.8 dB at 2, 4.9 dB at 15)."""
    import mlflow
    import pandas as pd

    from ray_jobs import tune_sde

    out, models = str(tmp_path / "sweep"), str(tmp_path / "models")
    marker = str(tmp_path / "killed")
    a = tune_sde.parse_args(_argv(data, out, models, "2,250,50"))
    s = tune_sde.run(a, extra_config={"2.0": {"fail_at_step": 20, "fail_marker": marker}})
    t = {row["lam_255"]: row for row in s["trials_table"]}
    assert sorted(t) == [2.0, 50.0, 250.0]
    assert not any(row["error"] for row in t.values())
    hist = pd.read_csv(os.path.join(out, "history.csv"))
    r10 = hist[hist.step == 10].set_index("lam_255").val_psnr
    assert r10[250.0] < r10[2.0], f"the premise (λ·255 = 250 weak at step 10) failed: {r10.to_dict()}"
    stopped = {lam for lam, row in t.items() if row["stopped_early"]}
    assert stopped == _asha_replay(hist, (2.0, 250.0, 50.0), grace=10, rf=a.reduction, max_t=41), (stopped, hist)
    assert 250.0 in stopped and t[250.0]["steps"] < 40, t
    # the trial after the stopped one started (and reported) on the one CPU trials get: its resources came back
    assert (hist.lam_255 == 50.0).sum() >= 1
    # the first trial's worker died after the step-20 checkpoint; the run went on from step 20, no step repeated
    assert os.path.exists(marker)
    first = hist[hist.lam_255 == 2.0].sort_values("step")
    assert not t[2.0]["stopped_early"] and t[2.0]["steps"] == 40
    assert first.step.is_unique and first.resumed_from.iloc[0] == 0 and first.resumed_from.iloc[-1] == 20
    rec = json.load(open(os.path.join(models, tune_sde.TUNED_FILE)))["image"]
    assert rec["lam_255"] == s["lam_255"] and rec["chosen"]["lam"] == pytest.approx(s["lam_255"] / 255)
    assert rec["paper"]["lam_255"] == PAPER_LAMBDA_255
    client = mlflow.MlflowClient(s["tracking_uri"])
    children = client.search_runs([client.get_run(s["mlflow_parent_run_id"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{s['mlflow_parent_run_id']}'")
    assert len(children) == 3
    assert os.path.getsize(os.path.join(out, "sweep.png")) > 10_000


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_restore_after_the_driver_is_killed_does_not_rerun_finished_trials(data, tmp_path, ray_session):
    """The sweep's driver (a separate process on the test's Ray cluster) is killed once two trials have finished;
    running it again restores the Tuner: the two finished trials keep their results (no new report), the others
    run to the end."""
    import ray

    from ray_jobs import tune_sde

    out, models = str(tmp_path / "sweep"), str(tmp_path / "models")
    argv = _argv(data, out, models, "25,75", steps=20, interval=10) + ["--grace", "20"]  # no ASHA cut here
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ray_jobs", "tune_sde.py"), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    exp = os.path.join(out, "tune", "sde_image")

    def finished():
        n = 0
        for d in (os.listdir(exp) if os.path.isdir(exp) else []):
            f = os.path.join(exp, d, "result.json")
            if os.path.isfile(f):
                lines = [json.loads(x) for x in open(f) if x.strip()]
                n += any(r.get("step") == 20 for r in lines)
        return n

    t0 = time.time()
    while finished() < 2 and proc.poll() is None and time.time() - t0 < 1500:
        time.sleep(2)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {d: open(os.path.join(exp, d, "result.json")).read() for d in os.listdir(exp)
            if os.path.isfile(os.path.join(exp, d, "result.json"))}
    done = {d: r for d, r in done.items() if '"step": 20' in r}
    assert len(done) == 2
    s = tune_sde.run(tune_sde.parse_args(argv))
    assert s["restored"] and s["trials"] == 3
    for d, before in done.items():  # finished trials were not run again: their results are unchanged
        assert open(os.path.join(exp, d, "result.json")).read() == before, d
    assert all(row["steps"] == 20 for row in s["trials_table"])


def test_steps_sweep_names_bad_arguments_and_a_missing_model_folder(tmp_path, capsys):
    from ray_jobs import steps_sweep

    a = steps_sweep.parse_args(["--data", "d", "--models", "m", "--out", "o", "--steps", "10,1,3,3"])
    assert a.step_list == [1, 3, 10]
    for bad in ("0,1", "a,2"):
        with pytest.raises(SystemExit):
            steps_sweep.parse_args(["--data", "d", "--models", "m", "--out", "o", "--steps", bad])
        assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="pipeline.json is missing"):
        steps_sweep.run(steps_sweep.parse_args(["--data", "d", "--models", str(tmp_path), "--out", "o"]))

