"""The dataset table: which RIS datasets and split partitions exist, how their prepared folders are named.

One source for the names every stage uses: `refbench prepare` (which partitions to write),
`refbench synth` (which refs pickles to write), the loaders (which prepared folder names are
valid) and the CLI (the choices of `--dataset` and `--split-by`). The shard schema tag that a
prepared folder's manifest carries lives here too: the writer stamps it, the reader checks it.
"""

from __future__ import annotations

from pathlib import Path

PARTITIONS: tuple[tuple[str, str], ...] = (  # (dataset, split partition) pairs, as the refer toolkit ships them
    ("refcoco", "unc"),  # RefCOCO, UNC splits train/val/testA/testB
    ("refcoco+", "unc"),  # RefCOCO+, UNC splits train/val/testA/testB
    ("refcocog", "umd"),  # G-Ref, UMD splits train/val/test (the one papers report)
    ("refcocog", "google"),  # G-Ref, Google splits train/val
)
DATASETS: tuple[str, ...] = tuple(dict.fromkeys(d for d, _ in PARTITIONS))  # refcoco, refcoco+, refcocog
SPLIT_BYS: tuple[str, ...] = tuple(dict.fromkeys(s for _, s in PARTITIONS))  # unc, umd, google
GRES_PARTITIONS: tuple[tuple[str, str], ...] = (("grefcoco", "unc"),)  # generalized RIS (refbench.data.sources.grefer): several or no targets
GRES_DATASETS: tuple[str, ...] = tuple(dict.fromkeys(d for d, _ in GRES_PARTITIONS))  # grefcoco
DEFAULT_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}  # when --split-by is omitted
SCHEMA, SCHEMA_VERSION = "refbench-shards", 1  # the shard contract a manifest declares (docs/shards.md)


def dataset_name(dataset: str, split_by: str) -> str:
    """The folder name of a prepared dataset, e.g. "refcoco+_unc"."""
    return f"{dataset}_{split_by}"


def prepared_names() -> list[str]:
    """Every valid prepared-dataset folder name, in table order."""
    return [dataset_name(d, s) for d, s in PARTITIONS + GRES_PARTITIONS]


def split_bys_of(dataset: str) -> list[str]:
    """The partitions `dataset` comes in."""
    return [s for d, s in PARTITIONS + GRES_PARTITIONS if d == dataset]


def is_gres(name: str) -> bool:
    """Whether a dataset ("grefcoco") or prepared folder name ("grefcoco_unc") is generalized RIS."""
    return name in GRES_DATASETS or name in [dataset_name(d, s) for d, s in GRES_PARTITIONS]


def prepare_command(name: str, shards_root: str | Path) -> str:
    """The `refbench prepare` command that creates the prepared dataset `name` under `shards_root`."""
    dataset, _, split_by = name.rpartition("_")
    return f"refbench prepare --dataset {dataset} --split-by {split_by} --data data --out {shards_root}"
