"""Every file is read weights-only: unsafe or damaged files refused with our message."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from cwd_lightning.models.weights import read_weights
from cwd_lightning.safe_load import load_weights_only


def _files(folder):
    torch.save(nn.Linear(2, 2), folder / "whole_model.pt")  # a pickled module, not a state_dict
    (folder / "random.pt").write_bytes(
        random.Random(0).randbytes(2000)
    )  # fixed bytes: a random draw may look like a pickle
    torch.save(nn.Linear(2, 2).state_dict(), folder / "state.pt")
    whole = (folder / "state.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.pt").write_bytes(b"")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "whole_model.pt",
            r"holds pickled Python objects.*never loaded here.*torch.save\(model.state_dict\(\), path\)",
        ),
        ("random.pt", r"is not a PyTorch checkpoint"),
        ("truncated.pt", r"is not a readable PyTorch checkpoint \(damaged or truncated\?\)"),
        ("empty.pt", r"is not a readable PyTorch checkpoint"),
    ],
)
def test_unsafe_or_damaged_files_are_refused_with_our_message(tmp_path, name, message):
    _files(tmp_path)
    with pytest.raises(ValueError, match=rf"teacher checkpoint '.*{name}' {message}") as error:
        read_weights(tmp_path / name)
    assert "weights_only=False" not in str(error.value) and "weights_only" not in str(error.value)
    assert error.value.__cause__ is None  # PyTorch's own message (and its advice) is not chained either


def test_a_state_dict_loads(tmp_path):
    _files(tmp_path)
    state = load_weights_only(tmp_path / "state.pt", "x")
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (2, 2)
