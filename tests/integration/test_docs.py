"""The documentation holds together: every relative link and file path in README.md and docs/ exists (anchors
included), and nothing in the repository points outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")
#: where a path written in the docs may be relative to: the repository, the package, the experiments
ROOTS = (REPO, REPO / "cwd_lightning", REPO / "experiments")
#: what runs create and the datasets' own layouts: never in the repository
NOT_IN_REPOSITORY = (
    "runs/",
    "data/",
    "exports/",
    "reports/",
    "~/",
    ".venv/",
    "ImageSets/",
    "JPEGImages/",
    "SegmentationClass",
    "leftImg8bit/",
    "gtFine/",
    "annotations/",
)
EXTENSIONS = (".py", ".yaml", ".md", ".json", ".ipynb", ".png", ".cff", ".toml", ".txt")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_relative_link_and_anchor_exists(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(REPO), f"{page.name}: {target} points outside the repository"
        assert resolved.exists(), f"{page.name}: link {target} does not exist"
        if anchor:
            assert anchor in _anchors(resolved), f"{page.name}: {target}: no heading with anchor #{anchor}"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_file_path_in_the_text_exists(page):
    text = page.read_text()
    paths = [token.rstrip(".,:;") for token in CODE.findall(text)]
    paths = [p for p in paths if "/" in p and p.endswith(EXTENSIONS) and not re.search(r"[<>*{}$]", p)
             and not p.startswith(NOT_IN_REPOSITORY) and not re.match(r"[a-z]+://", p)]  # fmt: skip
    missing = [p for p in paths if not any((root / p).exists() for root in ROOTS)]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_nothing_in_the_repository_points_outside_it():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"\.\./shared|/work/main|\.\./\.\./")
    found = []
    for name in files:
        path = REPO / name
        if path.suffix in (".png", ".ckpt", ".pt") or not path.is_file() or path == Path(__file__):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {match.group(0)}" for match in outside.finditer(text)]
    assert not found, found


def _classes_with_arguments(node) -> list[tuple[str, dict]]:
    """Every ``{class_path, init_args}`` mapping in a parsed YAML example, nested ones included."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            found.append((node["class_path"], node.get("init_args") or {}))
        for value in node.values():
            found += _classes_with_arguments(value)
    elif isinstance(node, list):
        for value in node:
            found += _classes_with_arguments(value)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_class_in_a_yaml_example_takes_the_arguments_it_is_given(page):
    """A YAML example copied from the docs must not fail on a misspelt argument (``encoder`` for
    ``encoder_name``): every class_path imports and takes every init_args key."""
    import importlib
    import inspect

    import yaml

    examples = re.findall(r"```yaml\n(.*?)```", page.read_text(), flags=re.S)
    for example in examples:
        try:
            parsed = yaml.safe_load(example)
        except yaml.YAMLError:
            continue  # an excerpt with placeholders, not a whole document
        for class_path, arguments in _classes_with_arguments(parsed):
            module, _, name = class_path.rpartition(".")
            target = getattr(importlib.import_module(module), name)
            parameters = inspect.signature(target).parameters
            if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                continue
            unknown = sorted(set(arguments) - set(parameters))
            assert not unknown, f"{page.name}: {class_path} has no argument(s) {unknown}"
