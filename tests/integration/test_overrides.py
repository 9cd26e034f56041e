"""Per-term overrides from the command line, and the single route to the optimiser."""

from __future__ import annotations

import pytest

from tests.helpers import REPO, tiny_cli


def test_term_hyperparameters_are_set_per_term_from_the_command_line(shapes_teacher, tiny_shapes):
    config = REPO / "experiments" / "shapes_cwd.yaml"
    cli = tiny_cli(config, shapes_teacher, tiny_shapes, "--model.terms.cwd_logits.loss.init_args.tau", "2",
                    "--model.terms[0].weight=5", "--model.terms.0.loss.init_args.normalize", "spatial")  # fmt: skip
    (pair,) = cli.model.distiller.iter_pairs()
    assert (pair.loss.tau, pair.weight, pair.loss.normalize) == (2.0, 5.0, "spatial")
    with pytest.raises(SystemExit, match=r"no term named or numbered 'loss' \(terms: 0=cwd_logits\)"):
        tiny_cli(config, shapes_teacher, tiny_shapes, "--model.terms.loss.init_args.tau", "2")
    with pytest.raises(SystemExit, match=r"--model.terms.cwd_logits.weight: 'abc' is not a number \(it is 3.0 now\)"):
        tiny_cli(config, shapes_teacher, tiny_shapes, "--model.terms.cwd_logits.weight", "abc")
    with pytest.raises(SystemExit, match=r"term 'cwd_logits' has no 'loss.init_args.temperature'"):
        tiny_cli(config, shapes_teacher, tiny_shapes, "--model.terms.cwd_logits.loss.init_args.temperature", "2")


def test_a_top_level_optimizer_is_refused(shapes_teacher, tiny_shapes, capsys):
    with pytest.raises(SystemExit):
        tiny_cli(REPO / "experiments" / "shapes_student.yaml", shapes_teacher, tiny_shapes,
                  "--optimizer", "torch.optim.SGD")  # fmt: skip
    assert "unrecognized arguments: --optimizer" in capsys.readouterr().err
