"""Migrate the committed result files to the December 2026 redesign, and show that they are the same runs.

The redesign renamed class paths (``cwd_lightning.data.datamodule.SegmentationDataModule`` →
``cwd_lightning.data.SegmentationDataModule``, …), grouped the teacher-cache options
(``teacher_cache_views/_dir/_dtype`` → ``teacher_cache: {views, folder, dtype}``) and changed how a run's
identity is hashed (``runs/identity.py``). For every ``results/<table>/<row>/seed<k>.json`` this script:

1. respells the result's recorded ``resolved_config`` in the new names;
2. resolves the row's config at the current code (``sweeps.runner.resolved_config``);
3. checks that the two agree on every key the recorded config has (the recorded runs predate some keys, which
   the current config has at their defaults; those are listed), and refuses otherwise;
4. writes the current resolved config and its identity digest into the file, with a record of what changed
   appended to its ``migrations``.

``python scripts/migrate_results.py`` (``--check`` only reports). Run at the redesign, again when several
teachers added keys at their defaults (``terms[i].from_teacher``, ``model.teachers``, ``model.teacher_checkpoints``)
and when weight schedules, calibration, the time budget and logit standardisation did (``terms[i].schedule``,
``terms[i].calibration``, ``model.time_budget``, ``ChannelWiseDivergence.standardize``); kept as the record of
how the files were migrated. Keys at their defaults leave what a run computes unchanged; one code change did not:
the holistic rows predate the fix that keeps the discriminator's state out of the student's step. The results
made with the U-Net-R18 `shapes` teacher were not migrated further: they moved to
``results/archive/unet_r18_teacher`` when the default recipe changed (another teacher, schedule and tapped
tensors), and this script reads only ``results/<table>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cwd_lightning.runs.identity import flatten, identity_digest, run_identity  # noqa: E402
from cwd_lightning.runs.provenance import commit  # noqa: E402
from cwd_lightning.sweeps.runner import resolved_config, write_result  # noqa: E402
from cwd_lightning.sweeps.spec import Table  # noqa: E402

CLASS_PATHS = {
    "cwd_lightning.data.datamodule.SegmentationDataModule": "cwd_lightning.data.SegmentationDataModule",
    "cwd_lightning.data.detection_datamodule.DetectionDataModule": "cwd_lightning.data.DetectionDataModule",
    "cwd_lightning.models.dilated.build_dilated_segmentor": "cwd_lightning.models.build_dilated_segmentor",
    "cwd_lightning.models.zoo.torchvision_model": "cwd_lightning.models.torchvision_model",
    "cwd_lightning.models.zoo.smp_pretrained": "cwd_lightning.models.smp_pretrained",
    "cwd_lightning.tasks.detection.DetectionTask": "cwd_lightning.tasks.DetectionTask",
    "cwd_lightning.tasks.detection.build_detector": "cwd_lightning.models.build_detector",
    "cwd_lightning.tasks.segmentation.SegmentationTask": "cwd_lightning.tasks.SegmentationTask",
    "cwd_lightning.tasks.segmentation.build_segmentation_model": "cwd_lightning.models.build_segmentation_model",
}
OLD_CACHE_KEYS = {"teacher_cache_views": "views", "teacher_cache_dir": "folder", "teacher_cache_dtype": "dtype"}


def respell(config: dict) -> tuple[dict, list[str]]:
    """The recorded config in the new names, and what was renamed."""
    renamed: list[str] = []

    def visit(value):
        if isinstance(value, dict):
            return {key: visit(item) for key, item in value.items()}
        if isinstance(value, list):
            return [visit(item) for item in value]
        if isinstance(value, str) and value in CLASS_PATHS:
            renamed.append(f"{value} → {CLASS_PATHS[value]}")
            return CLASS_PATHS[value]
        return value

    config = visit(copy.deepcopy(config))
    model = config.get("model") or {}
    old = {key: model.pop(key) for key in list(model) if key in OLD_CACHE_KEYS}
    if old:
        views = old.get("teacher_cache_views") or 0
        model["teacher_cache"] = {OLD_CACHE_KEYS[key]: value for key, value in old.items()} if views else None
        renamed.append(f"model.{', model.'.join(sorted(old))} → model.teacher_cache")
    return config, sorted(set(renamed))


def migrate(result_path: Path, current: dict, check: bool) -> dict:
    result = json.loads(result_path.read_text())
    recorded, renamed = respell(result["resolved_config"])
    old, new = flatten(run_identity(recorded)), flatten(run_identity(current))  # names, seeds, groups aside
    differing = sorted(key for key in old if key not in new or new[key] != old[key])
    if differing:
        raise SystemExit(
            f"{result_path}: the recorded config differs from the current one beyond spelling: "
            + ", ".join(f"{key}: {old[key]!r} vs {new.get(key, '(absent)')!r}" for key in differing)
        )
    added = sorted(set(new) - set(old))
    digest = identity_digest(current)
    report = {"file": str(result_path.relative_to(REPO)), "renamed": renamed, "added_at_defaults": added,
              "digest": [result.get("config_digest"), digest]}  # fmt: skip
    if not check:
        result.update(resolved_config=current, config_digest=digest)
        history = result.pop("migrations", None) or ([result.pop("migrated")] if "migrated" in result else [])
        result["migrations"] = [*history, {"at_commit": commit(), "renamed": renamed, "added_at_defaults": added,
                                           "previous_digest": report["digest"][0]}]  # fmt: skip
        write_result(result_path, result)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report only; write nothing")
    args = parser.parse_args(argv)
    reports = []
    for table_file in sorted((REPO / "experiments" / "tables").glob("*.yaml")):
        table = Table.load(table_file)
        for row in table.rows:
            files = sorted((REPO / "results" / table.name / row.name).glob("seed*.json"))
            if not files:
                continue
            current = resolved_config(row, table, REPO / "experiments")
            reports += [migrate(path, current, args.check) for path in files]
    for report in reports:
        old, new = report["digest"]
        print(f"{report['file']}: digest {old} → {new}; renamed {len(report['renamed'])} name(s); added at "
              f"defaults: {', '.join(report['added_at_defaults']) or 'none'}")  # fmt: skip
    renamed = sorted({name for report in reports for name in report["renamed"]})
    print(f"{len(reports)} result files; every recorded key equal to the current config after respelling:")
    print("  " + "\n  ".join(renamed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
