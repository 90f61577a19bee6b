"""Tiny synthetic shards for the caption tests (fake and real engines)."""

from __future__ import annotations


def tiny_caption_shards(out, sizes: tuple[int, ...], n_patients: int) -> tuple:
    """(out, [ShardInfo]): train shards of ``sizes`` tiny synthetic slices each, with a manifest, in ``out``."""
    from dudocrop.ct.geometry import get_geometry
    from dudocrop.data.build import ShardSpec, SourceOptions, build_shard, list_case_refs
    from dudocrop.data.shards import write_manifest

    opts = SourceOptions(source="synthetic", geometry="tiny", n_patients=n_patients, slices_per_patient=2)
    refs = list_case_refs(opts)
    infos, k = [], 0
    for i, n in enumerate(sizes):
        infos.append(build_shard(ShardSpec(f"train-{i:05d}.parquet", "train", tuple(refs[k:k + n])), opts, str(out)))
        k += n
    write_manifest(str(out), infos, get_geometry("tiny").to_dict(), {"test": True})
    return out, infos


def tiny_train_val_shards(out: str, n_train: int = 16, n_patients: int = 10) -> list:
    """[ShardInfo]: one train shard of the first ``n_train`` tiny synthetic slices and one val shard of the rest
    (2 slices per patient), with a manifest, in ``out``."""
    from dudocrop.ct.geometry import get_geometry
    from dudocrop.data.build import ShardSpec, SourceOptions, build_shard, list_case_refs
    from dudocrop.data.shards import write_manifest

    opts = SourceOptions(source="synthetic", geometry="tiny", n_patients=n_patients, slices_per_patient=2)
    refs = list_case_refs(opts)
    infos = [build_shard(ShardSpec("train-00000.parquet", "train", tuple(refs[:n_train])), opts, out),
             build_shard(ShardSpec("val-00000.parquet", "val", tuple(refs[n_train:])), opts, out)]
    write_manifest(out, infos, get_geometry("tiny").to_dict(), {"test": True})
    return infos
