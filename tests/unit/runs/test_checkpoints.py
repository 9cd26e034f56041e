"""The run's checkpoint callbacks: their state survives a moved run folder."""

from __future__ import annotations

import pytest
import torch

from cwd_lightning.runs import LastCheckpoint, RunFolderCheckpoint


def test_a_moved_run_folder_keeps_its_best_score(tmp_path):
    """Lightning forgets the best score when the checkpoint's folder changed, so the next validation,
    however worse, replaced best.ckpt of a moved run."""

    def callback(folder):
        return RunFolderCheckpoint(dirpath=folder, filename="best", monitor="val/mIoU", mode="max", save_top_k=1,
                                   enable_version_counter=False)  # fmt: skip

    old, new = callback(tmp_path / "old"), callback(tmp_path / "new")
    old.best_model_score, old.best_model_path = torch.tensor(0.9), str(tmp_path / "old" / "best.ckpt")
    old.best_k_models = {old.best_model_path: torch.tensor(0.9)}
    new.load_state_dict(old.state_dict())
    assert float(new.best_model_score) == pytest.approx(0.9)
    assert new.best_model_path == str(tmp_path / "new" / "best.ckpt")
    assert list(new.best_k_models) == [str(tmp_path / "new" / "best.ckpt")]
    assert old.state_key != LastCheckpoint(tmp_path).state_key  # both callbacks' states in one checkpoint
