"""Whole-run presets for ``ray_jobs/train_all.py``: which data, which stage presets, how many workers.

The stage-level numbers live with their stages (``dudocrop.clip.config``, ``dudocrop.sde.train``,
``dudocrop.pipeline``); a run preset only picks a stage preset and, for CPU-sized runs, a few overrides
(``field=value`` strings handed to the stage's ``--set``).

* ``tiny``: the embedded default — a newcomer's laptop, minutes: 64² synthetic slices, tiny random-init CLIP
  towers, tiny U-Nets trained for a few hundred steps with ``small``'s recipe, so DuDoCROP ends on par with NMAR.
  It shows every stage working; its numbers are not quality.
* ``small``: 128² synthetic slices, more data and steps: quality on a CPU machine in about an hour.
* ``paper``: the paper's sizes and literal choices on a GPU cluster: AAPM body and head slices together, captions by
  LLaVA-v1.5-13b through vLLM, ViT-B-32, the 49 M U-Net with the paper's schedules (§IV-B), the Euler reverse step
  of Eq. 5 with no F̂_0 clipping, Eq. 11's min-max over the whole image; every stage that runs a model on the GPU.
  It needs the data root, the LLaVA folder and the test split (or a patient grouping) from the user
  (``RunPreset.missing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from dudocrop.sde.train import paper_steps

#: §IV-A: the test sets, body¹ (864 official body test slices) + body² (642 body slices held out of the official
#: data) + head (136 official head test slices); the paper preset evaluates all of them.
PAPER_TEST_SLICES = 864 + 642 + 136


@dataclass(frozen=True)
class RunPreset:
    name: str
    # data (ray_jobs/prepare_data.py)
    source: str = "synthetic"
    geometry: str = "tiny"
    n_patients: int = 12
    slices_per_patient: int = 2
    shard_slices: int = 8
    simulation: str = "aapm_like"
    phantom: str = "ellipse"  # synthetic clean slices: ellipse | patient (issue 25: organ texture, vessels, bowel)
    clinical_references: bool = False  # clinical: metal-free slices become references with simulated metal
    # AAPM (prepare_data.py): ``body``, ``head`` or ``mixed`` (both, each slice with its own FOV, paper §IV-A);
    # the regex whose group 1 is the patient id of a case id (splits are per patient); the test cases as a split
    # file (one case id per line) or a folder of the release's layout (paper: the official test sets)
    anatomy: str = "body"
    patient_regex: str | None = None
    test_split: str | None = None
    # captions (ray_jobs/caption.py): engine template | transformers | vllm, and the local LLaVA folder of a VLM
    caption_engine: str = "template"
    caption_model: str | None = None
    # stage presets and overrides (``--set field=value`` of each stage's job)
    clip_preset: str = "tiny"
    clip_set: tuple[str, ...] = ()
    sde_preset: str = "tiny"
    image_set: tuple[str, ...] = ()
    sinogram_set: tuple[str, ...] = ()
    residual_set: tuple[str, ...] = ()
    # inference settings (PipelineConfig fields, osro.FIELD for OSROConfig) the priors stage writes to pipeline.json
    pipeline_set: tuple[str, ...] = ()
    # Table V's "+ DuDoCLIP" rows: also train image / sinogram IR-SDEs without embeddings (Fig. 12 baseline)
    guidance_ablation: bool = False
    # resources
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpu: bool = False
    max_failures: int = 2
    # evaluation (ray_jobs/evaluate.py); eval_steps is also what priors and fusion sample with
    eval_split: str = "test"
    eval_slices: int = 8
    eval_steps: int | None = None  # None: the models' T
    # metal sweeps of PI_q / PI_s (Eq. 18-19, dudocrop.eval.sweeps.SWEEP_PRESETS), or "none"
    sweeps: str = "tiny"
    # OSRO factors k, α, β chosen with Ray Tune on the val split (ray_jobs/tune_fusion.py); fusion_points per factor
    fusion_split: str = "val"
    fusion_points: int = 5
    # what the preset is and is not, in a sentence or three: the first paragraph of its evaluation report
    about: str = ""
    # choose the IR-SDE's λ with Ray Tune before stage 2 (ray_jobs/tune_sde.py: the image domain, ASHA); the chosen
    # λ goes to <models>/tuned_sde.json, which sde_image / sde_sinogram read (``--tuned``). tune_lambda_steps:
    # training steps per trial (None: the SDE preset's)
    tune_lambda: bool = False
    tune_lambda_steps: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for f in ("n_patients", "slices_per_patient", "shard_slices", "workers", "eval_slices"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RunPreset.{f} must be an int >= 1, got {v!r}")
        if self.eval_steps is not None and (not isinstance(self.eval_steps, int) or self.eval_steps < 1):
            raise ValueError(f"RunPreset.eval_steps must be None or an int >= 1, got {self.eval_steps!r}")
        if self.tune_lambda_steps is not None and (not isinstance(self.tune_lambda_steps, int)
                                                   or self.tune_lambda_steps < 1):
            raise ValueError(f"RunPreset.tune_lambda_steps must be None or an int >= 1, got {self.tune_lambda_steps!r}")
        if not isinstance(self.fusion_points, int) or self.fusion_points < 2:
            raise ValueError(f"RunPreset.fusion_points must be an int >= 2, got {self.fusion_points!r}")
        if self.phantom not in ("ellipse", "patient"):
            raise ValueError(f"RunPreset.phantom must be 'ellipse' or 'patient', got {self.phantom!r}")
        if self.anatomy not in ("body", "head", "mixed"):
            raise ValueError(f"RunPreset.anatomy must be 'body', 'head' or 'mixed', got {self.anatomy!r}")
        if self.caption_engine not in ("template", "transformers", "vllm"):
            raise ValueError(f"RunPreset.caption_engine must be 'template', 'transformers' or 'vllm', got "
                             f"{self.caption_engine!r}")

    def missing(self) -> list[str]:
        """The fields a run of this preset still needs from the user (``--set FIELD=...``), with why."""
        need = []
        if self.caption_engine != "template" and not self.caption_model:
            need.append(f"caption_model (a local LLaVA folder for caption_engine={self.caption_engine!r})")
        if self.source == "aapm" and self.patient_regex is None and self.test_split is None:
            need.append("patient_regex or test_split (AAPM cases carry no patient id: without a grouping or a "
                        "named test set, slices of one patient could land in train and test)")
        return need


RUN_PRESETS: dict[str, RunPreset] = {
    # every stage on a laptop in minutes (DDP on 2 workers included), with small's recipe for a small network (see
    # "small" below): x0 output, image and sinogram models starting from NMAR, standardised image inputs, the affine
    # Norm, the measured-sinogram completion, 5 sampler steps. An untrained x0 network returns its μ, so both priors
    # start at NMAR and training only has to learn NMAR's residual error; fusion chosen on val can keep them there.
    # 24 patients: 4 val and 4 test slices (12 gave 2 and 2).
    "tiny": RunPreset(
        name="tiny", geometry="tiny", n_patients=24, slices_per_patient=2,
        clip_set=("epochs=4",),
        image_set=("steps=300", "validate_every=300", "parametrization=x0", "image_mu=nmar", "input_scale=20",
                   "loss_region=body", "lr=1e-3", "loss_form=x0"),
        sinogram_set=("steps=120", "validate_every=120", "parametrization=x0", "sinogram_mu=nmar"),
        residual_set=("steps=80", "validate_every=80", "parametrization=x0"),
        eval_slices=8, eval_steps=5, pipeline_set=("osro.norm=affine", "osro.completion=True"),
        about=("**Preset `tiny`**, the embedded quickstart: 64² synthetic slices, randomly initialised CLIP towers "
               "(no pretrained weights, so the captions' guidance is learned from scratch), 0.5 M-parameter U-Nets "
               "trained for a few minutes on a CPU, 4 val and 4 test slices. It shows every stage of DuDoCROP "
               "working, with the image and sinogram priors starting from NMAR; it is not the paper's model or its "
               "quality: `--preset small` is the CPU quality run, `--preset paper` the paper's on a GPU cluster."),
    ),
    # sized to finish in an hour on 2 cores: ≈0.5 s per SDE step with 2 workers, so three models of 1500 / 1500 /
    # 800 steps take ≈31 min; the unguided ablation models (another 2 x 1500 steps) are left out. 5 sampler steps:
    # on the val split the (noise-output, LI-μ) image / sinogram priors gave 28.2 / 40.9 dB with 3 steps, 30.0 /
    # 41.0 with 10 and 30.2 / 41.0 with 25, while sampling the training priors with 25 steps took 26 min of the hour.
    # The U-Nets output F̂_0 − μ (parametrization x0) and the sinogram model starts from NMAR (sinogram_mu nmar):
    # with the paper's noise output and the LI μ the 0.4 M-parameter sinogram model stayed below LI, its own start
    # (val, 800 steps: trace RMSE 10.3 vs LI's 9.5 per mille; x0 output 9.5; x0 + metal-centred crops 9.6), and the
    # NMAR completion's trace error is 13 % below LI's (SINOGRAM_MU). 5 fusion points per factor, decided on val
    # alone (docs/val_decisions.md, bench/fusion_grid_val.py): chosen on one half of val by patient and scored on
    # the other, the 11-point grid gained 0.012 dB over the 5-point one (38.693 vs 38.682 dB), under the 0.02 dB
    # the rule counts as a tie, at 10.6x the trials.
    # The image model starts from the NMAR image (image_mu nmar) with standardised inputs (input_scale 20), its loss
    # on F̂_0 (loss_form x0) over the body outside the metal, sampled in 64² windows like its crops: from X_ma it
    # ended 7.5 dB under NMAR, and without the standardisation the same U-Net barely learned (IMAGE_MU,
    # UNetConfig.in_scale, IRSDE.loss). Eq. 12's Norm is the affine fit (OSROConfig.norm): on 10 val slices the
    # paper's min-max took the image prior from 43.15 to 40.15 dB (NMAR: 42.12), the affine fit left it at 43.17
    # (bench/osro_norm.py). X_o then completes the measured sinogram across the trace (OSROConfig.completion, beyond
    # the paper; bench/completion_val.py, docs/val_decisions.md): on val +1.19 dB over Eq. 15 alone at the factors
    # chosen for each (tiny's val: +1.33 dB).
    "small": RunPreset(
        name="small", geometry="small", n_patients=80, slices_per_patient=2, shard_slices=16, phantom="patient",
        clip_set=("epochs=15",),
        image_set=("steps=1500", "parametrization=x0", "image_mu=nmar", "input_scale=20", "loss_region=body",
                   "sample_tile=64", "lr=1e-3", "loss_form=x0"),
        sinogram_set=("steps=1500", "parametrization=x0", "sinogram_mu=nmar"),
        residual_set=("steps=800", "parametrization=x0"), guidance_ablation=False, eval_slices=16, eval_steps=5,
        fusion_points=5, pipeline_set=("osro.norm=affine", "osro.completion=True"),
    ),
    # §IV-A/B literally (tests/test_paper_preset.py checks every number of §IV-B against it): train on body and head
    # slices together, captions by LLaVA-v1.5-13b (vLLM), and the paper's own inference choices, which the CPU
    # presets replace by measured alternatives: the Euler-Maruyama reverse step of Eq. 5 ("sde", not the public
    # code's posterior step), no clipping of F̂_0, Eq. 11's min-max over the whole image (not the body region).
    "paper": RunPreset(
        name="paper", source="aapm", geometry="aapm_body", anatomy="mixed", shard_slices=32, phantom="patient",
        caption_engine="vllm", clip_preset="paper", sde_preset="paper", workers=1, gpu=True,
        sinogram_set=(f"steps={paper_steps('sinogram')}",), residual_set=(f"steps={paper_steps('residual')}",),
        guidance_ablation=True, eval_slices=PAPER_TEST_SLICES, eval_steps=None, sweeps="paper",
        pipeline_set=("sampler=sde", "x0_clip=False", "osro_region=image"),
    ),
}


def get_run_preset(name: str, **overrides) -> RunPreset:
    if name not in RUN_PRESETS:
        raise ValueError(f"unknown run preset {name!r}; expected one of {sorted(RUN_PRESETS)}")
    known = {f.name for f in fields(RunPreset)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown RunPreset fields {bad}; known: {sorted(known)}")
    return replace(RUN_PRESETS[name], **overrides)
