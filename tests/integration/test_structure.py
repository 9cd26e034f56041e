"""The shape of the package: small modules, a thin entry point and module, task classes named only in
tasks/, short YAML class paths, public names re-exported, and no global state changed at import."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
import subprocess
import sys

import yaml

import cwd_lightning
from tests.helpers import REPO

PACKAGE = REPO / "cwd_lightning"
#: the sizes the redesign aims for: a file a reader takes in at once, a thin entry point and module
LIMITS = {"cli/command.py": 160, "distill/module.py": 250}
MAX_LINES = 300


def _lines(path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_larger_than_a_reader_takes_in_at_once():
    sizes = {str(path.relative_to(PACKAGE)): _lines(path) for path in PACKAGE.rglob("*.py")}
    assert {name: size for name, size in sizes.items() if size > MAX_LINES} == {}
    assert {name: sizes[name] for name, limit in LIMITS.items() if sizes[name] > limit} == {}


def test_no_task_class_is_named_outside_tasks():
    named = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name != "tasks":
            named += [f"{path.relative_to(PACKAGE)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                      if re.search(r"\b(SegmentationTask|DetectionTask)\b", line)]  # fmt: skip
    assert named == []


def test_every_subpackage_re_exports_its_public_names_and_the_yamls_use_them():
    for info in pkgutil.iter_modules(cwd_lightning.__path__):
        if info.ispkg:
            package = importlib.import_module(f"cwd_lightning.{info.name}")
            assert package.__doc__, info.name
            assert getattr(package, "__all__", None), f"cwd_lightning.{info.name} re-exports nothing"
    paths = set()
    for path in (REPO / "experiments").rglob("*.yaml"):
        paths |= set(re.findall(r"class_path:\s*(cwd_lightning\.[\w.]+)", path.read_text()))
    for class_path in paths:
        package, _, name = class_path.rpartition(".")
        assert package.count(".") == 1, f"{class_path}: use the subpackage's re-exported name"
        assert name in importlib.import_module(package).__all__, class_path


PROBE = r"""
import importlib, json, pkgutil, sys
import jsonargparse, matplotlib, torch
import cwd_lightning

def state():
    return {"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules,
            "yaml_loader": repr(jsonargparse.get_loader("yaml")), "dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(), "threads": torch.get_num_threads()}

before = state()
for info in pkgutil.walk_packages(cwd_lightning.__path__, "cwd_lightning."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
print(json.dumps([before, state()]))
"""
#: calls that change process-wide state when made at a module's top level
GLOBAL_SETTERS = re.compile(r"^(warnings\.(filterwarnings|simplefilter)|matplotlib\.use|\w*\.?set_loader|"
                            r"torch\.(set_\w+|manual_seed|use_deterministic_algorithms)|os\.environ\.(setdefault|update)|"
                            r"os\.putenv|sys\.path\.\w+|logging\.basicConfig)$")  # fmt: skip


def test_importing_every_module_changes_no_global_state():
    """No matplotlib backend or pyplot, jsonargparse loader or torch default is changed by importing any module,
    and no module calls a global setter (warning filters, backends, loaders, seeds, the environment) at its top
    level: such settings are made where they are used (``cli.main`` at run time)."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = json.loads(result.stdout.strip().splitlines()[-1])
    assert before == after
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # top-level statements only: what runs at import
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)) if not isinstance(
                    node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else ():  # fmt: skip
                name = ast.unparse(call.func)
                if GLOBAL_SETTERS.match(name):
                    found.append(f"{path.relative_to(PACKAGE)}:{call.lineno} {name}")
            if isinstance(node, ast.Assign) and "os.environ" in ast.unparse(node.targets[0]):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node.targets[0])}")
    assert found == []


def test_the_experiment_families_share_their_wandb_group():
    groups = {
        path.stem: yaml.safe_load(path.read_text()).get("group") for path in (REPO / "experiments").glob("*.yaml")
    }
    assert all(groups.values()), [name for name, group in groups.items() if not group]
    assert {groups[name] for name in ("shapes_teacher", "shapes_student", "shapes_cwd")} == {"shapes"}
    assert {groups[name] for name in ("cityscapes_teacher", "cityscapes_student", "cityscapes_cwd")} == {"cityscapes"}
    assert groups["shapes_det_cwd"] == groups["shapes_det_student"] != groups["shapes_cwd"]
