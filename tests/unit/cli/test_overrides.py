"""The per-term overrides, without a parser: which arguments are taken, which term and key they set, and the
one-line refusals of an unknown term, an unknown key and a non-number for a number."""

from __future__ import annotations

import pytest

from cwd_lightning.cli.overrides import apply_term_overrides, split_term_overrides
from cwd_lightning.runs.errors import RunError


def _terms() -> list[dict]:
    return [
        {"name": "cwd_logits", "weight": 3.0, "loss": {"init_args": {"tau": 4.0}}, "from_teacher": "teacher"},
        {"name": "features", "weight": 1.0, "loss": {"init_args": {}}, "from_teacher": "vit"},
    ]


def test_term_arguments_are_taken_out_in_every_spelling():
    args = ["fit", "--model.terms.cwd_logits.weight", "5", "--trainer.max_steps", "3",
            "--model.terms[1].weight=2", "--model.terms.0.from_teacher", "vit"]  # fmt: skip
    rest, overrides = split_term_overrides(args)
    assert rest == ["fit", "--trainer.max_steps", "3"]
    assert overrides == [("cwd_logits", "weight", "5"), ("1", "weight", "2"), ("0", "from_teacher", "vit")]
    with pytest.raises(RunError, match=r"--model.terms.0.weight needs a value"):
        split_term_overrides(["--model.terms.0.weight"])


def test_overrides_set_the_named_or_numbered_term_as_yaml_values():
    terms = _terms()
    apply_term_overrides(terms, [("cwd_logits", "weight", "5"), ("1", "from_teacher", "teacher")])
    assert terms[0]["weight"] == 5 and terms[1]["weight"] == 1.0
    assert terms[1]["from_teacher"] == "teacher"
    apply_term_overrides(terms, [("0", "loss", "{init_args: {tau: 2.0}}")])
    assert terms[0]["loss"] == {"init_args": {"tau": 2.0}}


@pytest.mark.parametrize(("override", "message"), [
    (("cwd_logit", "weight", "1"), r"no term named or numbered 'cwd_logit' \(terms: 0=cwd_logits, 1=features\)"),
    (("5", "weight", "1"), r"no term named or numbered '5'"),
    (("features", "wieght", "1"), r"term 'features' has no 'wieght' \(did you mean 'weight'\?"),
    (("0", "weight", "abc"), r"'abc' is not a number \(it is 3.0 now\)"),
])  # fmt: skip
def test_bad_overrides_are_refused_naming_the_argument(override, message):
    terms = _terms()
    with pytest.raises(RunError, match=message):
        apply_term_overrides(terms, [override])
    assert terms == _terms()
