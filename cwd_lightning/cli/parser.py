"""Config errors in one line, naming the key at fault and the closest valid key.

jsonargparse answers an unknown key with several hundred lines of usage and no hint; argparse's
abbreviations would also take ``--trainer.max_step`` for ``--trainer.max_steps`` (and an ambiguous one
for whatever it matches), so abbreviations are off: a key is written in full or refused.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

#: how jsonargparse names a key it does not know, in its messages
_UNKNOWN = re.compile(r"""does not accept option\s+['"]([\w.-]+)['"]|unrecognized arguments:\s+--([\w.-]+)""")
#: ... and one inside a class's ``init_args`` (``Parser key "data": ... class_path 'X': Option 'y' is not accepted``)
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')
_CLASS_PATH = re.compile(r"class_path=? ?'([\w.]+)'")  # "class_path 'X'" or, for callables, "class_path='X'"
_NESTED_UNKNOWN = re.compile(r"""(?:Option|Key|key)\s+['"]([\w.]+)['"]\s+is not (?:accepted|expected)""")


def closest_keys(key: str, known: list[str], n: int = 3) -> list[str]:
    """Known keys that look most like ``key``: by the whole dotted key, then by its last part."""
    matches = difflib.get_close_matches(key, known, n=n, cutoff=0.75)
    if not matches:
        last = {k.rsplit(".", 1)[-1]: k for k in known if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]}
        matches = [last[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=n, cutoff=0.6)]
    return matches


class SuggestingParser(LightningArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def known_keys(self) -> list[str]:
        return sorted({option[2:] for option in self._option_string_actions if option.startswith("--")})

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        nested = _nested_unknown(message.strip())  # needs the class path the full message names
        text = innermost_error(message.strip())
        if nested is not None:
            text = nested
        else:
            for match in _UNKNOWN.finditer(text):
                key = match[1] or match[2]
                close = closest_keys(key, parser.known_keys()) if isinstance(parser, SuggestingParser) else []
                hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "no similar key"
                text = f"{text.splitlines()[0]} ({key!r}: {hint})"
                break
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):  # jsonargparse's own debug switch
            super().error(text, ex)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {text}\n(all options: {prog} --help)\n")
        sys.exit(2)


def innermost_error(message: str) -> str:
    """The error itself out of jsonargparse's account of a union it could not build ("Parser key "X":
    Does not validate against any of the Union subtypes ... Errors: - Problem with given class_path ...:
    <the error> - Expected a <class 'NoneType'> ... Given value: ..."), named by its key."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    lines = message.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Errors:"), None)
    end = next((i for i, line in enumerate(lines) if line.strip().startswith("Given value")), len(lines))
    if start is None:
        return message
    reasons = [line.strip().removeprefix("- ").strip() for line in lines[start + 1 : end] if line.strip()]
    reasons = [r for r in reasons if not r.startswith(("Expected a", "Problem with given class_path"))]
    owner = _PARSER_KEY.search(message)
    prefix = f"{owner[1]}: " if owner else ""
    return prefix + "; ".join(reasons) if reasons else message


def _nested_unknown(message: str) -> str | None:
    """One line for an unknown argument of a class given by ``class_path``, with the closest ones of its
    ``__init__``; None when the message is about something else."""
    owner, class_path, key = _PARSER_KEY.search(message), _CLASS_PATH.search(message), _NESTED_UNKNOWN.search(message)
    if not (owner and class_path and key):
        return None
    try:
        module, name = class_path[1].rsplit(".", 1)
        arguments = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        arguments = []
    close = difflib.get_close_matches(key[1], arguments, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"it takes {', '.join(arguments)}"
    return f"{owner[1]}.init_args.{key[1]}: {class_path[1]} has no argument {key[1]!r} ({hint})"
