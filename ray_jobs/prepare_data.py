"""Prepare slice shards with Ray Data: list cases -> read or simulate -> derive traces -> write Parquet shards.

    python ray_jobs/prepare_data.py --source synthetic --geometry tiny --out outputs/data     # embedded default
    python ray_jobs/prepare_data.py --source aapm --root /data/CT-MAR --geometry aapm_body --out s3://bucket/aapm
    python ray_jobs/prepare_data.py --source clinical --root /data/CTPelvic1K --geometry aapm_body --out ...
    ray job submit --working-dir . -- python ray_jobs/prepare_data.py ...      # unchanged on a cluster

Idempotent and resumable: shards are planned deterministically, each written atomically with a sidecar holding
its checksum; a re-run rebuilds only shards that are missing or whose bytes no longer match, then writes the
manifest (counts, shard checksums, schema version, the exact arguments).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from dudocrop.ct.geometry import get_geometry
from dudocrop.data.build import (
    ShardSpec,
    SourceOptions,
    build_shard,
    list_case_refs,
    plan_shards,
    shard_fingerprint,
)
from dudocrop.data.schema import SCHEMA_VERSION
from dudocrop.data.shards import (
    ShardInfo,
    atomic_write_bytes,
    cleanup_temporaries,
    file_sha256,
    resolve,
    write_manifest,
)
from dudocrop.lock import folder_lock


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["synthetic", "aapm", "clinical"], default="synthetic")
    ap.add_argument("--root", help="AAPM release root, or a NIfTI file / folder of NIfTI files or DICOM series")
    ap.add_argument("--out", default="outputs/data", help="local path or any pyarrow filesystem URI")
    ap.add_argument("--geometry", default="tiny", help="a dudocrop.ct.geometry preset")
    ap.add_argument("--anatomy", choices=["body", "head", "mixed"], default="body",
                    help="AAPM mixed: body and head cases together, each in its own FOV (paper §IV-A)")
    ap.add_argument("--layout-json", help="AAPM layout overrides (JSON file of AAPMLayout fields)")
    ap.add_argument("--patient-regex", help="AAPM: regex whose group 1 is the patient id of a case id (overrides "
                                            "the layout's; r'^(.*)$': every case its own patient)")
    ap.add_argument("--test-split", help="AAPM: the test cases, a file of case ids (one per line) or a folder in "
                                         "the release's layout; the rest is split into train / val by patient")
    ap.add_argument("--n-patients", type=int, default=8, help="synthetic: number of phantom patients")
    ap.add_argument("--slices-per-patient", type=int, default=2, help="synthetic: slices per patient")
    ap.add_argument("--simulation", default="aapm_like", help="synthetic: simulator settings preset")
    ap.add_argument("--phantom", choices=["ellipse", "patient"], default="ellipse",
                    help="synthetic: clean slices from smooth ellipse phantoms or patient-like ones (organ texture, "
                         "vessels, bowel, random contrast; dudocrop.ct.patients)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-slices", type=int, default=8, help="slices per shard (bounds shard size)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--address", default=None, help="Ray address (default: join a cluster if one runs, "
                                                    "else start a local one)")
    ap.add_argument("--cpus-per-shard", type=float, default=1.0)
    ap.add_argument("--clinical-references", action="store_true",
                    help="clinical: train on real anatomy: the metal-free slices become references and get metal "
                         "from the simulator (default: the slices with metal, without references)")
    ap.add_argument("--skip-bad", action="store_true", help="clinical: skip unreadable or unusable inputs and "
                    "slices (NaN voxels, not CT, truncated, metal covering the body, ...), name them in skipped.json "
                    "instead of stopping at the first")
    ap.add_argument("--dicom-rescale", type=float, nargs=2, metavar=("SLOPE", "INTERCEPT"), default=None,
                    help="clinical DICOM: the rescale to HU for slices without RescaleSlope / RescaleIntercept "
                         "(default: such slices are refused)")
    return ap.parse_args(argv)


def options_from_args(a: argparse.Namespace) -> SourceOptions:
    layout = {}
    if a.layout_json:
        with open(a.layout_json) as f:
            layout = json.load(f)
    if getattr(a, "patient_regex", None) is not None:
        layout = {**layout, "patient_regex": a.patient_regex}
    test_split = getattr(a, "test_split", None)
    return SourceOptions(source=a.source, geometry=a.geometry, root=a.root, layout=layout, anatomy=a.anatomy,
                         n_patients=a.n_patients, slices_per_patient=a.slices_per_patient, seed=a.seed,
                         simulation=a.simulation, phantom=getattr(a, "phantom", "ellipse"),
                         clinical_references=bool(getattr(a, "clinical_references", False)),
                         test_split=test_split or None,
                         dicom_rescale=tuple(a.dicom_rescale) if getattr(a, "dicom_rescale", None) else None)


def _sidecar(name: str) -> str:
    return f"{name}.info.json"


def completed_shards(out: str, specs: list[ShardSpec], opts: SourceOptions | None = None) -> dict[str, ShardInfo]:
    """Shards already written whose bytes still match the checksum in their sidecar and, when ``opts`` is given,
    that were built from the same slices and options (the sidecar's ``options_sha256``, build.shard_fingerprint)."""
    fs, base = resolve(out)
    done = {}
    for s in specs:
        side = f"{base}/{_sidecar(s.name)}"
        path = f"{base}/{s.name}"
        try:
            with fs.open_input_stream(side) as f:
                record = json.loads(f.read())
            recorded = record.pop("options_sha256", None)
            info = ShardInfo(**record)
        except (FileNotFoundError, OSError, ValueError, TypeError):
            continue
        if opts is not None and recorded != shard_fingerprint(s, opts):
            print(f"prepare_data: shard {path} was built from other slices or options (geometry, seed, ...) than "
                  "this run's; rebuilding it", flush=True)
            continue
        try:
            ok = file_sha256(fs, path) == info.sha256 and info.rows == len(s.refs)
        except (FileNotFoundError, OSError):
            ok = False
        if ok:
            done[s.name] = info
        else:
            print(f"prepare_data: shard {path} does not match its recorded checksum; rebuilding it", flush=True)
    return done


def report_skipped(out: str, skipped: list[dict]) -> None:
    """Print one line per skipped input or slice and write them to ``<out>/skipped.json`` (atomically; an empty
    list when nothing was skipped, so the file always describes the latest listing)."""
    for s in skipped:
        where = s["input"] + ("" if s["slice"] is None else f" slice {s['slice']}")
        why = " ".join(s["error"].removeprefix(s["input"] + ": ").split())  # errors start with the file they name
        print(f"prepare_data: skipped {where}: {why}", flush=True)
    fs, base = resolve(out)
    fs.create_dir(base, recursive=True)
    atomic_write_bytes(fs, f"{base}/skipped.json", json.dumps(skipped, indent=2).encode())
    print(f"prepare_data: {len(skipped)} bad inputs or slices skipped (listed in {out}/skipped.json)", flush=True)


def run(a: argparse.Namespace) -> dict:
    """Build the missing or stale shards and write the manifest, holding ``--out``'s lock (dudocrop.lock)."""
    with folder_lock(a.out, "prepare_data " + json.dumps(vars(a), default=str)):
        return _run(a)


def _run(a: argparse.Namespace) -> dict:
    import numba
    import ray

    opts = options_from_args(a)
    g = get_geometry(opts.geometry)
    t0 = time.time()
    skipped: list[dict] | None = [] if getattr(a, "skip_bad", False) else None
    refs = list_case_refs(opts, skipped)
    if skipped is not None:
        report_skipped(a.out, skipped)
        if not refs:
            raise ValueError(f"prepare_data: every input under {opts.root} was skipped as bad ({len(skipped)})")
    specs = plan_shards(refs, a.shard_slices, a.val_fraction, a.test_fraction)
    removed = cleanup_temporaries(a.out)
    done = completed_shards(a.out, specs, opts)
    todo = [s for s in specs if s.name not in done]
    print(f"prepare_data: listed {len(refs)} slices from {opts.source} -> {len(specs)} shards "
          f"({len(done)} already complete, {len(todo)} to build, {removed} stale temporaries removed) "
          f"in {time.time() - t0:.1f}s", flush=True)

    infos = dict(done)
    if todo:
        if not ray.is_initialized():
            ray.init(address=a.address, log_to_driver=False)
        out = a.out
        cpus = a.cpus_per_shard

        def build(row: dict) -> dict:
            # one numba thread per CPU the task holds, so parallel tasks do not oversubscribe the node
            numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, int(cpus))))
            spec = ShardSpec.from_json(row["spec"])
            info = build_shard(spec, opts, out)
            fs, base = resolve(out)
            record = {**asdict(info), "options_sha256": shard_fingerprint(spec, opts)}
            atomic_write_bytes(fs, f"{base}/{_sidecar(spec.name)}", json.dumps(record).encode())
            return {"info": json.dumps(asdict(info))}

        t1 = time.time()
        ds = ray.data.from_items([{"spec": s.to_json()} for s in todo], override_num_blocks=len(todo))
        results = ds.map(build, num_cpus=cpus).take_all()
        for r in results:
            info = ShardInfo(**json.loads(r["info"]))
            infos[info.name] = info
        n = sum(len(s.refs) for s in todo)
        dt = time.time() - t1
        print(f"prepare_data: built {len(todo)} shards ({n} slices) in {dt:.1f}s = {n / dt:.2f} slices/s", flush=True)

    # where the data lives and which cluster built it do not change the content: left out so manifests compare
    args_record = {k: v for k, v in vars(a).items() if k not in ("address", "out")}
    manifest = write_manifest(a.out, [infos[s.name] for s in specs],
                              geometry=g.to_dict(), args={"options": asdict(opts), "cli": args_record})
    print(f"prepare_data: manifest with {manifest['total_rows']} rows {manifest['counts']} "
          f"(schema v{SCHEMA_VERSION}) written to {a.out}", flush=True)
    return manifest


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
