"""Per-term overrides on the command line, addressed by term name or index: ``--model.terms.<name>.<field> v``,
``--model.terms.<index>.<field> v`` or ``--model.terms[<index>].<field> v``, e.g.
``--model.terms.cwd_logits.loss.init_args.tau 2``. jsonargparse alone cannot address one element of a list
(it would edit the last term)."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace

from cwd_lightning.runs.errors import RunError

_TERM_OVERRIDE = re.compile(
    r"^--model\.terms(?:\.(?P<name>\w+)|\[(?P<index>\d+)\])\.(?P<key>[\w.]+?)(?:=(?P<value>.*))?$"
)
Override = tuple[str, str, str]


def split_term_overrides(args: list[str]) -> tuple[list[str], list[Override]]:
    """Take ``--model.terms.<name|index>.<key> value`` arguments out of ``args``: (rest, [(term, key, value)])."""
    remaining: list[str] = []
    overrides: list[Override] = []
    arguments = iter(args)
    for argument in arguments:
        match = _TERM_OVERRIDE.match(argument)
        if match is None:
            remaining.append(argument)
            continue
        value = match["value"]
        if value is None:
            value = next(arguments, None)
            if value is None:
                raise RunError(f"{argument} needs a value")
        overrides.append((match["name"] or match["index"], match["key"], value))
    return remaining, overrides


def apply_term_overrides(terms: list[Any] | None, overrides: list[Override]) -> None:
    """Set each override on the term it names (a YAML value, checked when the term is built); the key must
    be one the term's resolved config has, so a typo fails instead of being ignored."""
    terms = list(terms or [])
    names = [str(term["name"]) for term in terms]
    for selector, key, text in overrides:
        if selector in names:
            term = terms[names.index(selector)]
        elif selector.isdigit() and int(selector) < len(terms):
            term = terms[int(selector)]
        else:
            raise RunError(
                f"--model.terms.{selector}.{key}: no term named or numbered {selector!r} "
                f"(terms: {', '.join(f'{i}={n}' for i, n in enumerate(names)) or 'none'})"
            )
        if key not in term:
            fields = sorted(term.keys())
            close = difflib.get_close_matches(key, fields, n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise RunError(
                f"--model.terms.{selector}.{key}: term {term['name']!r} has no {key!r} ({hint}it has {fields})"
            )
        value, current = yaml.safe_load(text), term[key]
        numbers = (int, float)
        if isinstance(current, numbers) and not isinstance(current, bool) and not isinstance(value, numbers):
            raise RunError(f"--model.terms.{selector}.{key}: {text!r} is not a number (it is {current} now)")
        term[key] = value


def parse_with_term_overrides(parser: ArgumentParser, args: list[str]) -> Namespace:
    """``parser.parse_args(args)`` with the term overrides applied. ``--print_config`` prints the config with
    them: the edited terms are given to a second parse whole, and jsonargparse prints that."""
    remaining, overrides = split_term_overrides(args)
    if not overrides:
        return parser.parse_args(remaining)
    print_config = [a for a in remaining if a.split("=", 1)[0] == "--print_config"]
    rest = [a for a in remaining if a not in print_config]
    config = parser.parse_args(rest)
    subcommand = config.get("subcommand")
    terms = (config[subcommand] if subcommand else config)["model"]["terms"]
    apply_term_overrides(terms, overrides)
    if not print_config:
        return config
    plain = [term.as_dict() if isinstance(term, Namespace) else term for term in terms]
    return parser.parse_args([*rest, f"--model.terms={json.dumps(plain)}", *print_config])
