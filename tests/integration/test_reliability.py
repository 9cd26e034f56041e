"""Nothing lost, nothing silent: exact resume after SIGKILL, every refusal in one line with nothing changed,
no non-finite model saved, bad samples skipped on request, atomic checkpoint writes."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cwd_lightning.cli import main
from cwd_lightning.data import SHAPES_CLASSES, voc_to_coco
from cwd_lightning.safe_load import load_weights_only
from tests.helpers import REPO, run_cli, tiny_cwd_fit, tiny_overrides

CWD = str(REPO / "experiments" / "shapes_cwd.yaml")


TEACHER_NET = str(REPO / "experiments" / "common" / "shapes_student_net.yaml")


def _cwd_args(teacher_run, tiny_shapes, runs: Path, experiment: str, steps: int) -> list[str]:
    return [*tiny_cwd_fit(teacher_run, tiny_shapes, runs, experiment, steps), "--trainer.val_check_interval", "4"]


def _student(path: Path) -> dict[str, torch.Tensor]:
    state = load_weights_only(path, "checkpoint")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def _train_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(float(row["step"])) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_student(teacher_run, tiny_shapes, tmp_path, monkeypatch):
    """24 images, batch 4: 6 steps an epoch; checkpoints at steps 4 and 8; the process is killed as step 9
    starts (epoch 1, third batch), resumed from last.ckpt (step 8, mid-epoch) and run to step 11."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the killer callback lives in tests/
    runs = tmp_path / "runs"
    straight = run_cli(*_cwd_args(teacher_run, tiny_shapes, runs, "straight", 11), "--trainer.callbacks", "[]",
                       cwd=tmp_path)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]

    killer = '[{"class_path": "tests.integration.process_killer.KillAtStep", "init_args": {"step": 9}}]'
    killed = run_cli(*_cwd_args(teacher_run, tiny_shapes, runs, "killed", 11), "--trainer.callbacks", killer,
                     cwd=tmp_path)  # fmt: skip
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    run_dir = runs / "killed"
    assert load_weights_only(run_dir / "last.ckpt", "checkpoint")["global_step"] == 8
    run_id = (run_dir / "wandb_id").read_text().strip()

    resumed = run_cli("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last",
                      "--trainer.callbacks", "[]", cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = _student(runs / "straight" / "last.ckpt"), _student(run_dir / "last.ckpt")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    steps = _train_steps(run_dir)
    assert sorted(steps) == _train_steps(runs / "straight") == list(range(11))
    assert not [s for s, n in Counter(steps).items() if n > 1]
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert load_weights_only(run_dir / "last.ckpt", "checkpoint")["run_id"] == run_id


# ---------------------------------------------------------------- every refusal: its message, nothing changed
class Env:
    """One case's world: a copy of a finished-and-resumable run, a copy of the data, a teacher file."""

    def __init__(self, root: Path, base_run: Path, onecycle_run: Path, data: Path) -> None:
        self.root, self.runs = root, root / "runs"
        self.run = self.runs / base_run.name
        shutil.copytree(base_run, self.run)
        self.onecycle = self.runs / "onecycle"
        shutil.copytree(onecycle_run, self.onecycle)
        self.data = root / "data" / "shapes"
        shutil.copytree(data, self.data)
        self.teacher = yaml.safe_load((self.run / "config.yaml").read_text())["model"]["teacher_checkpoint"]

    def fit(self, experiment: str = "fresh", config: str = CWD, data: Path | None = None) -> list[str]:
        """A fresh fit of a tiny shapes_cwd into runs/<experiment>."""
        return ["fit", "--config", config, "--experiment", experiment, "--runs_root", str(self.runs),
                "--model.teacher", TEACHER_NET, "--model.teacher_checkpoint", self.teacher,
                *tiny_overrides(data or self.data, 4)]  # fmt: skip

    def det_fit(self) -> list[str]:
        """A fresh fit of the tiny detection baseline on the copied data (COCO json of the XML)."""
        for split in ("train", "val"):
            if not (self.data / "annotations" / f"instances_{split}.json").is_file():
                voc_to_coco(self.data, split, SHAPES_CLASSES[1:])
        return ["fit", "--config", str(REPO / "experiments" / "shapes_det_student.yaml"), "--runs_root",
                str(self.runs), "--experiment", "det", "--data.init_args.root", str(self.data),
                "--data.init_args.shapes", "null", "--data.init_args.image_size", "32",
                "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
                "--trainer.max_steps", "2"]  # fmt: skip

    def resume(self, ckpt: str = "last.prev.ckpt", run: Path | None = None) -> list[str]:
        run = run or self.run
        return ["fit", "--config", str(run / "config.yaml"), "--runs_root", str(self.runs), "--experiment", run.name,
                "--ckpt_path", str(run / ckpt) if ckpt.endswith(".ckpt") else ckpt]  # fmt: skip


def _other_teacher(env: Env) -> str:
    state = load_weights_only(env.teacher, "teacher")["state_dict"]
    path = env.root / "other_teacher.pt"
    torch.save({k[len("student."):]: v + 1 if v.is_floating_point() else v for k, v in state.items()
                if k.startswith("student.")}, path)  # fmt: skip
    return str(path)


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def _first(env: Env, split: str) -> str:
    return (env.data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]


def _edit_coco(env: Env, change) -> None:
    path = env.data / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _case_fit_over_a_run(env):
    return env.fit(experiment=env.run.name)


def _case_fit_into_a_folder_with_best_only(env):
    (env.run / "last.ckpt").unlink()
    (env.run / "last.prev.ckpt").unlink()
    return env.fit(experiment=env.run.name)


def _case_fit_into_a_folder_with_foreign_metrics(env):
    (env.runs / "other").mkdir()
    (env.runs / "other" / "metrics.csv").write_text("step,val/mIoU\n3,0.5\n")
    return env.fit(experiment="other")


def _case_resume_with_another_teacher(env):
    return [*env.resume(), "--model.teacher_checkpoint", _other_teacher(env)]


def _case_resume_a_truncated_checkpoint(env):
    _truncate(env.run / "last.ckpt")
    return env.resume("last")


def _case_resume_random_bytes(env):
    (env.run / "last.ckpt").write_bytes(
        random.Random(0).randbytes(4096)
    )  # fixed bytes: a random draw may look like a pickle
    return env.resume("last")


def _case_resume_a_pickled_object(env):
    torch.save({"state_dict": {}, "model": torch.nn.Linear(2, 2)}, env.run / "last.ckpt")
    return env.resume("last")


def _case_resume_a_finished_run(env):
    return env.resume("last")


def _case_resume_a_missing_checkpoint(env):
    return env.resume("nothing.ckpt")


def _case_resume_another_runs_checkpoint(env):
    (env.run / "wandb_id").write_text("0123456789ab\n")
    return env.resume()


def _case_resume_into_a_folder_of_an_unknown_run(env):
    target = env.runs / "unknown"
    target.mkdir()
    (target / "metrics.csv").write_text("step,val/mIoU\n3,0.5\n")
    return [*env.resume(), "--experiment", "unknown"]


def _case_resume_one_cycle_with_another_length(env):
    return [*env.resume("last", run=env.onecycle), "--trainer.max_steps", "4"]


def _case_validate_a_missing_checkpoint(env):
    return ["validate", "--config", str(env.run / "config.yaml"), "--runs_root", str(env.runs), "--ckpt_path",
            str(env.run / "nothing.ckpt")]  # fmt: skip


def _case_unknown_option(env):
    return [*env.fit(), "--trainer.max_step", "3"]


def _case_unknown_key_in_a_yaml(env):
    (env.root / "typo.yaml").write_text("model:\n  lr_schedul: poly\n")
    return [*env.fit(), "--config", str(env.root / "typo.yaml")]


def _case_unknown_class_argument(env):
    return [*env.fit(), "--data.init_args.batch_sise", "3"]


def _case_unknown_optimizer_argument(env):
    return [*env.fit(), "--model.optimizer.init_args.lrr", "0.1"]


def _case_unknown_loss_argument_in_a_yaml(env):
    (env.root / "term.yaml").write_text(
        "model:\n  terms:\n    - name: cwd_logits\n      student: segmentation_head\n      teacher: segmentation_head\n"
        "      loss: {class_path: cwd_lightning.losses.ChannelWiseDivergence, init_args: {tua: 4.0}}\n"
    )
    return [*env.fit(), "--config", str(env.root / "term.yaml")]


def _case_unknown_term_field(env):
    return [*env.fit(), "--model.terms.cwd_logits.wieght", "3"]


def _case_selector_that_does_not_fit_the_output(env):
    return [*env.fit(), "--model.terms.cwd_logits.student", "segmentation_head/0"]


def _case_term_of_an_unknown_teacher(env):
    return [*env.fit(), "--model.terms.cwd_logits.from_teacher", "vit"]


def _case_negative_weight(env):
    return [*env.fit(), "--model.terms.cwd_logits.weight", "-1"]


def _case_tau_zero(env):
    return [*env.fit(), "--model.terms.cwd_logits.loss.init_args.tau", "0"]


def _case_bad_on_non_finite(env):
    return [*env.fit(), "--model.on_non_finite", "ignore"]


def _case_data_classes_differ_from_the_task(env):
    return [*env.fit(), "--data.init_args.num_classes", "12"]


def _case_student_classes_differ_from_the_task(env):
    return [*env.fit(), "--model.student.init_args.num_classes", "5"]


def _case_teacher_classes_differ_from_the_task(env):
    return [*env.fit(), "--model.teacher.init_args.num_classes", "5"]


def _case_empty_train_split(env):
    (env.data / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    return env.fit()


def _case_empty_val_split(env):
    (env.data / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    return env.fit()


def _case_missing_image(env):
    (env.data / "JPEGImages" / f"{_first(env, 'train')}.jpg").unlink()
    return env.fit()


def _case_broken_image(env):
    (env.data / "JPEGImages" / f"{_first(env, 'val')}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return env.fit()


def _case_mask_class_out_of_range(env):
    _write_png(env.data / "SegmentationClass" / f"{_first(env, 'train')}.png", np.full((32, 32), 40))
    return env.fit()


def _case_mask_of_another_size(env):
    _write_png(env.data / "SegmentationClass" / f"{_first(env, 'train')}.png", np.zeros((16, 32)))
    return env.fit()


def _case_split_smaller_than_a_batch(env):
    return [*env.fit(), "--data.init_args.batch_size", "64"]


def _case_embedded_data_of_another_spec(env):
    return [*env.fit(), "--data.init_args.shapes", '{"num_train": 25, "num_val": 8, "image_size": 32, "seed": 1}']


def _case_coco_annotations_of_missing_images(env):
    args = env.det_fit()
    _edit_coco(env, lambda d: d["annotations"].append({**d["annotations"][0], "id": 10**6, "image_id": 10**6}))
    return args


def _case_coco_negative_box(env):
    args = env.det_fit()

    def negative(data):
        data["annotations"][0]["bbox"][2] = -5.0

    _edit_coco(env, negative)
    return args


def _case_voc_xml_negative_box(env):
    args = env.det_fit()
    xml = env.data / "Annotations" / f"{(env.data / 'ImageSets' / 'Main' / 'train.txt').read_text().split()[0]}.xml"
    text = xml.read_text()
    start, end = text.index("<xmin>") + 6, text.index("</xmin>")
    xml.write_text(text[:start] + "1000" + text[end:])
    return [*args, "--data.init_args.layout", "voc"]


def _case_teacher_file_with_a_pickled_model(env):
    torch.save(torch.nn.Conv2d(3, 3, 1), env.root / "model.pt")
    return [*env.fit(), "--model.teacher_checkpoint", str(env.root / "model.pt")]


def _case_teacher_file_of_random_bytes(env):
    (env.root / "teacher.pt").write_bytes(
        random.Random(0).randbytes(2048)
    )  # fixed bytes: a random draw may look like a pickle
    return [*env.fit(), "--model.teacher_checkpoint", str(env.root / "teacher.pt")]


#: (case, what the message must say); the README's reliability section lists the same cases
CASES = [
    (_case_fit_over_a_run, r"already holds a run .*last\.ckpt exists.*make resume"),
    (_case_fit_into_a_folder_with_best_only, r"is not empty \(best\.ckpt, config\.yaml"),
    (_case_fit_into_a_folder_with_foreign_metrics, r"is not empty \(metrics\.csv\)"),
    (_case_resume_with_another_teacher, r"the teacher does not match.*Nothing in .* was changed"),
    (_case_resume_a_truncated_checkpoint, r"last\.ckpt' is not a readable PyTorch checkpoint.*last\.prev\.ckpt"),
    (_case_resume_random_bytes, r"last\.ckpt' is not a (readable )?PyTorch checkpoint.*last\.prev\.ckpt"),
    (_case_resume_a_pickled_object, r"holds pickled Python objects.*torch\.save\(model\.state_dict\(\), path\)"),
    (_case_resume_a_finished_run, r"is at step 4: the run already finished .*--experiment <new name>"),
    (_case_resume_a_missing_checkpoint, r"nothing to resume: checkpoint .*nothing\.ckpt does not exist.*last\.ckpt"),
    (_case_resume_another_runs_checkpoint, r"belongs to run [0-9a-f]{12} but .* holds run 0123456789ab"),
    (_case_resume_into_a_folder_of_an_unknown_run, r"unknown holds files of an unknown run \(metrics\.csv"),
    (_case_resume_one_cycle_with_another_length, r"one-cycle schedule of 2 steps but trainer\.max_steps is 4"),
    (_case_validate_a_missing_checkpoint, r"checkpoint .*nothing\.ckpt not found"),
    (_case_unknown_option, r"--trainer\.max_step .*did you mean 'trainer\.max_steps'"),
    (_case_unknown_key_in_a_yaml, r"model\.lr_schedul.*did you mean 'model\.lr_schedule'"),
    (_case_unknown_class_argument, r"SegmentationDataModule has no argument 'batch_sise' \(did you mean 'batch_size'"),
    (_case_unknown_optimizer_argument, r"model\.optimizer\.init_args\.lrr: torch\.optim\.AdamW has no argument 'lrr' "
                                       r"\(did you mean 'lr'"),
    (_case_unknown_loss_argument_in_a_yaml, r"model\.terms: loss\.init_args\.tua: .*ChannelWiseDivergence has no "
                                            r"argument 'tua' \(did you mean 'tau'"),
    (_case_unknown_term_field, r"term 'cwd_logits' has no 'wieght' \(did you mean 'weight'"),
    (_case_selector_that_does_not_fit_the_output, r"student 'segmentation_head/0': output is a Tensor, it cannot "
                                                  r"be indexed by '0'"),
    (_case_term_of_an_unknown_teacher, r"term 'cwd_logits': from_teacher 'vit' is not a teacher of this run"),
    (_case_negative_weight, r"distillation term 'cwd_logits': weight must be ≥ 0, got -1"),
    (_case_tau_zero, r"ChannelWiseDivergence: tau must be > 0, got 0"),
    (_case_bad_on_non_finite, r"on_non_finite"),
    (_case_data_classes_differ_from_the_task, r"data has 12 classes .* but the task has 11"),
    (_case_student_classes_differ_from_the_task, r"model\.student predicts 5 classes but model\.task\.init_args"),
    (_case_teacher_classes_differ_from_the_task, r"does not match the configured teacher architecture.*"
                                                  r"segmentation_head\.0\.bias: checkpoint \(11,\) vs model \(5,\)"),
    (_case_empty_train_split, r"train\.txt lists no images"),
    (_case_empty_val_split, r"val\.txt lists no images"),
    (_case_missing_image, r"1 file\(s\) listed by .*train\.txt are missing: .*\.jpg"),
    (_case_broken_image, r"split 'val': 1 of 8 sample\(s\) cannot be used \(data\.init_args\.on_bad_sample: skip"
                         r".*\n.*shapes_\d+\.jpg.*: ValueError: cannot read image"),
    (_case_mask_class_out_of_range, r"has class ids \[40\] ≥ num_classes=11"),
    (_case_mask_of_another_size, r"is 32×32 but its mask .* is 32×16"),
    (_case_split_smaller_than_a_batch, r"split 'train' has 24 image\(s\), fewer than data\.init_args\.batch_size = 64"),
    (_case_embedded_data_of_another_spec, r"holds a shapes dataset generated from .*not the requested"),
    (_case_coco_annotations_of_missing_images, r"instances_train\.json: annotations for image id\(s\) \[1000000\]"),
    (_case_coco_negative_box, r"instances_train\.json: annotation \d+ of .* has negative width or height \(-5 × "),
    (_case_voc_xml_negative_box, r"\.xml: object '\w+': box .* has negative width or height"),
    (_case_teacher_file_with_a_pickled_model, r"teacher checkpoint .*model\.pt' holds pickled Python objects"),
    (_case_teacher_file_of_random_bytes, r"teacher checkpoint .*teacher\.pt' is not a (readable )?PyTorch checkpoint"),
]  # fmt: skip


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def base_runs(teacher_run, tiny_shapes, cwd_run, tmp_path_factory):
    """A tiny distilled run: 4 steps (poly), checkpoints at 2 (last.prev.ckpt) and 4 (last.ckpt, finished)."""
    runs = tmp_path_factory.mktemp("reliability") / "runs"
    result = run_cli(*_cwd_args(teacher_run, tiny_shapes, runs, "shapes_cwd", 4), "--trainer.val_check_interval",
                     "2", "--trainer.callbacks", "[]", cwd=runs.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "shapes_cwd", cwd_run[1]


@pytest.mark.parametrize(("case", "message"), CASES, ids=[c.__name__.removeprefix("_case_") for c, _ in CASES])
def test_refused_with_a_clear_message_and_nothing_changed(case, message, base_runs, tiny_shapes, tmp_path, capsys,
                                                           monkeypatch):  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the pre-flight cache, outside the record
    monkeypatch.chdir(tmp_path)
    env = Env(tmp_path / "world", *base_runs, tiny_shapes)
    args = case(env)
    before = _tree(env.root)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    code = stopped.value.code
    text = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert code not in (0, None)
    assert re.search(message, text, re.DOTALL), text[-2000:]
    assert "weights_only=False" not in text and "Traceback" not in text
    assert re.search(r"^error: ", text, re.MULTILINE), text  # our message, not a traceback
    assert code == 2  # refusals exit as the parser's errors do
    assert _tree(env.root) == before


# ---------------------------------------------------------------- no diverged model saved, skips counted
def _all_finite(path: Path) -> bool:
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, list | tuple):
            for item in value:
                yield from tensors(item)

    state = load_weights_only(path, "checkpoint")
    return all(torch.isfinite(t).all() for t in tensors(state["state_dict"]) if t.is_floating_point())


def test_a_diverging_run_stops_naming_the_step_and_saves_no_non_finite_model(teacher_run, tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    result = run_cli(*_cwd_args(teacher_run, tiny_shapes, runs, "diverged", 8), "--trainer.val_check_interval", "1",
                     "--model.optimizer.init_args.lr", "1e12", "--trainer.callbacks", "[]", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    stopped = r"^error: non-finite (loss|gradients|weights or statistics) at step \d+"
    assert re.search(stopped, result.stderr, re.MULTILINE), result.stderr[-2000:]
    assert "Traceback" not in result.stderr  # one line, not a traceback
    checkpoints = list((runs / "diverged").glob("*.ckpt"))
    assert all(_all_finite(path) for path in checkpoints), checkpoints
    assert not list((runs / "diverged").glob(".*.tmp"))  # no half-written checkpoint left behind


def test_on_bad_sample_skip_trains_without_the_broken_files(tiny_shapes, tmp_path, monkeypatch):
    from cwd_lightning.data import SegmentationDataModule

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, data)
    names = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (data / "JPEGImages" / f"{names[0]}.jpg").write_bytes(b"broken")
    _write_png(data / "SegmentationClass" / f"{names[1]}.png", np.full((32, 32), 40))
    module = SegmentationDataModule(str(data), num_classes=11, crop_size=32, base_size=32, batch_size=4,
                                    num_workers=0, on_bad_sample="skip")  # fmt: skip
    with pytest.warns(UserWarning, match=r"skipping 2 of 24 sample\(s\)"):
        module.setup("fit")
    assert len(module.train_set) == 22 and module.skipped_samples == {"train": 2, "val": 0}
    assert {image.stem for image, _ in module.train_set.pairs}.isdisjoint(names[:2])
    images, masks = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and masks[masks != 255].max() < 11


def test_a_checkpoint_write_that_fails_leaves_the_previous_file(tmp_path, monkeypatch):
    from cwd_lightning.runs import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def dies_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_weights_only(path, "checkpoint") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is gone too


def test_the_cli_writes_checkpoints_through_the_atomic_writer(base_runs):
    run_dir, _ = base_runs
    state = load_weights_only(run_dir / "last.ckpt", "checkpoint")
    assert state["run_id"] == (run_dir / "wandb_id").read_text().strip()
    assert {"torch", "numpy", "python"} <= set(state["rng_states"])
    assert not list(run_dir.glob(".*.tmp"))
