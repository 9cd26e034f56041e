"""Distillation terms: their declaration checks, the output selectors, readable pair labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwd_lightning.distill.terms import DistillTerm, pair_labels, select


def test_selectors_for_dict_and_tuple_outputs():
    feats = {"0": torch.zeros(1), "p6": torch.ones(1)}
    assert select(feats, "p6", "x").item() == 1
    assert select((torch.zeros(1), torch.ones(2)), "1", "x").shape == (2,)
    with pytest.raises(ValueError, match="not 'p7'"):
        select(feats, "p7", "teacher 'fpn/p7'")
    with pytest.raises(ValueError, match="add a selector"):
        select(feats, None, "teacher 'fpn'")


def test_pair_labels_are_distinct_and_short():
    assert pair_labels(["fpn/0", "fpn/p6"], [None, None]) == ["0", "p6"]
    assert pair_labels(["backbone.fpn/p3", "backbone.fpn/p4"], [None, None]) == ["p3", "p4"]
    # selectors that end alike: the labels go up the path until they differ
    assert pair_labels(["backbone.body/0", "backbone.fpn/0"], [None, None]) == ["body_0", "fpn_0"]
    assert pair_labels(["head.cls", "head.cls", "head.cls"], [0, 1, 2]) == ["call0", "call1", "call2"]
    assert pair_labels(["a.x", "b.x"], [1, 1]) == ["a_x_call1", "b_x_call1"]
    assert pair_labels(["head"], [None]) == [""]


def test_term_checks_its_declaration():
    with pytest.raises(ValueError, match="paired one to one"):
        DistillTerm(name="bad", student=["a", "b"], teacher="a", loss=nn.MSELoss())
    with pytest.raises(ValueError, match="weight must be ≥ 0"):
        DistillTerm(name="neg", student="a", teacher="a", loss=nn.MSELoss(), weight=-1)
    with pytest.raises(ValueError, match="calls must be"):
        DistillTerm(name="calls", student="a", teacher="a", loss=nn.MSELoss(), calls=[])
    term = DistillTerm(name="head", student="a", teacher="a", loss=nn.MSELoss())
    assert term.chosen_calls(1, "'a'") == [None]
    with pytest.raises(ValueError, match=r"'a' runs 5 times per forward; say which call"):
        term.chosen_calls(5, "'a'")
    assert DistillTerm("h", "a", "a", nn.MSELoss(), calls="all").chosen_calls(3, "'a'") == [0, 1, 2]
    assert DistillTerm("h", "a", "a", nn.MSELoss(), calls=2).chosen_calls(3, "'a'") == [2]
    with pytest.raises(ValueError, match=r"calls \[0, 4\] but 'a' runs 3 time"):
        DistillTerm("h", "a", "a", nn.MSELoss(), calls=[0, 4]).chosen_calls(3, "'a'")
