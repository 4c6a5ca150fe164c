"""The import graph as a rule (docs/design.md, "Packages and who may import whom").

Read from the syntax tree of every module, never by importing it: a package importing one the
table forbids fails here, and so does a model file importing Lightning, Ray, DeepSpeed or
torch.distributed. The table is parsed from docs/design.md itself, so the page and this test
cannot drift apart. Last, `kiln --help` and a config error must cost no torch or Ray import
(cluster/cli.py's promise): checked on a real `kiln` process by its sys.modules at exit, with
`-X importtime` to name the import chain that broke the promise.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
TABLE_HEADING = "## Packages and who may import whom"
MODEL_DIRS = ("pretrain/models", "finetune/models")
MODEL_FORBIDDEN = ("lightning", "pytorch_lightning", "ray", "deepspeed", "torch.distributed")
HEAVY = ("torch", "ray")  # what a config error must not import


def import_table(text: str) -> dict[str, set[str]]:
    """{package: the Kiln packages it may import} from the markdown table under TABLE_HEADING.

    A row reads | `pkg/` | owns | may import |; the last cell lists packages in backticks, or says
    "nothing of Kiln" or "everything"."""
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\|\s*`\w+/`\s*\|", line)]
    names = [re.match(r"\|\s*`(\w+)/`", row).group(1) for row in rows]
    table = {}
    for name, row in zip(names, rows, strict=True):
        allowed = row.rstrip().rstrip("|").rsplit("|", 1)[1]
        table[name] = (
            set(names) if "everything" in allowed else set(re.findall(r"`(\w+)`", allowed))
        )
    return table


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved; imports
    inside functions and `if TYPE_CHECKING:` count too (they are still dependencies)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from pkg import sub` may name a submodule: count both, the rules are per package
            found += [(node.lineno, module)]
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


TABLE = import_table(DESIGN.read_text(encoding="utf-8"))


def test_the_table_is_read_as_written() -> None:
    sample = (
        f"{TABLE_HEADING}\n\n| package | owns | may import |\n|---|---|---|\n"
        "| `low/` | `a.py`, things | nothing of Kiln |\n| `mid/` | `b.py` | `low` |\n"
        "| `top/` | all | everything |\n\nModels never ...\n\n## Next\n| `x/` | y | z |\n"
    )
    assert import_table(sample) == {"low": set(), "mid": {"low"}, "top": {"low", "mid", "top"}}
    assert set(TABLE) == {"data_pipeline", "pretrain", "finetune", "cluster"}


@pytest.mark.parametrize("path", sources(*TABLE), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_package_imports_only_what_design_md_allows(path: Path) -> None:
    own = module_name(path).split(".")[0]
    allowed = TABLE[own] | {own}
    bad = {
        (line, name)
        for line, name in imported_modules(path)
        if name.split(".")[0] in TABLE and name.split(".")[0] not in allowed
    }
    may = ", ".join(sorted(TABLE[own])) or "nothing of Kiln"
    assert not bad, f"{own}/ may import {may} (docs/design.md), but imports {sorted(bad)}"


@pytest.mark.parametrize("path", sources(*MODEL_DIRS), ids=lambda p: str(p.relative_to(ROOT)))
def test_models_import_no_distribution_or_training_framework(path: Path) -> None:
    bad = [
        (line, name)
        for line, name in imported_modules(path)
        if any(name == f or name.startswith(f"{f}.") for f in MODEL_FORBIDDEN)
    ]
    assert not bad, f"models never import Lightning, Ray, DeepSpeed or torch.distributed: {bad}"


def test_the_checker_sees_every_import_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    sample = tmp_path / "pretrain" / "models" / "m.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "import torch.distributed as dist\nfrom .. import checkpoint\n"
        "def f():\n    from cluster import jobs\n"
    )
    names = {name for _, name in imported_modules(sample)}
    assert {
        "torch.distributed",
        "pretrain",
        "pretrain.checkpoint",
        "cluster",
        "cluster.jobs",
    } <= names


def importers(importtime: str, package: str) -> list[str] | None:
    """The chain that imported `package` or its first submodule (module <- its importer <- ...),
    read from `-X importtime`'s report (children printed before their importer, nesting shown by
    indentation). A module loaded through importlib.import_module is not reported itself (its
    imports appear one level up), so a chain may skip that link. None: nothing of `package`."""
    entries = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            name = line.rsplit("|", 1)[1]
            entries.append((len(name) - len(name.lstrip()), name.strip()))
    hits = [
        i
        for i, (_, name) in enumerate(entries)
        if name == package or name.startswith(f"{package}.")
    ]
    if not hits:
        return None
    i = next((i for i in hits if entries[i][1] == package), hits[0])
    depth, chain = entries[i][0], [entries[i][1]]
    for outer, parent in entries[i + 1 :]:
        if outer < depth:
            chain.append(parent)
            depth = outer
    return chain


# `python -m cluster ...` (what the `kiln` script runs), printing at exit which heavy packages it
# loaded: sys.modules is the verdict (it sees every way of importing); importtime only explains it.
KILN_REPORTING_IMPORTS = (
    "import atexit, runpy, sys\n"
    f"heavy = {HEAVY!r}\n"
    "loaded = lambda: [m for m in heavy if m in sys.modules]\n"
    "atexit.register(lambda: print('loaded:', loaded(), file=sys.stderr))\n"
    "sys.argv[0] = 'kiln'\n"
    "runpy.run_module('cluster', run_name='__main__')\n"
)


def kiln_loading(*argv: str) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """Run `kiln *argv`: (the process, its stderr lines but the last, why it loaded torch/Ray
    or "" if it did not)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", KILN_REPORTING_IMPORTS, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    *lines, loaded = [
        line for line in result.stderr.splitlines() if not line.startswith("import time:")
    ]
    chains = [" <- ".join(importers(result.stderr, m) or [m]) for m in HEAVY if repr(m) in loaded]
    assert loaded.startswith("loaded: "), result.stderr
    return result, lines, "; ".join(chains)


def test_help_imports_neither_torch_nor_ray() -> None:
    result, _, heavy = kiln_loading("--help")
    assert result.returncode == 0 and "COMMAND" in result.stdout
    assert not heavy, f"kiln --help paid for: {heavy}"


def test_a_config_error_imports_neither_torch_nor_ray(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("trainer:\n  max_stepz: 5\n")
    result, lines, heavy = kiln_loading("pretrain", "--config", str(recipe))
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("kiln: error: ") and "trainer.max_stepz" in lines[0], lines
    assert not heavy, f"a config error paid for: {heavy}"


# What the driver of `kiln pretrain`/`finetune` loads before it hands the job to Ray (or, with
# --dry-run, instead: cluster.dryrun): the modules and the imports of run_training and its driver
# checks (made inside the functions, so listed here from their syntax tree), and the
# meta-device parameter count of its preflight. Lightning, DeepSpeed and torch._dynamo cost 5, 3 and
# 2 s of every command's start-up on a 2 GHz core, and only the workers need them.
DRIVER = (
    "import ast, sys\n"
    "from torch import nn\n"
    "import cluster.commands, cluster.dryrun, cluster.launch, cluster.tasks, cluster.report\n"
    "tree = ast.parse(open('cluster/launch.py').read())\n"
    "names = ('run_training', 'driver_checks', 'check_disk')\n"
    "runs = [f for f in tree.body if getattr(f, 'name', '') in names]\n"
    "lazy = [n for f in runs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]\n"
    "assert lazy\n"
    "exec(compile(ast.Module(body=lazy, type_ignores=[]), 'run_training', 'exec'))\n"
    "from data_pipeline.configlib import from_preset\n"
    "from pretrain.models.bert import BertConfig, BertForPreTraining\n"
    "from pretrain.models.meta import build_on_meta, num_parameters\n"
    "init = nn.init.normal_\n"
    "model = build_on_meta(BertForPreTraining, from_preset(BertConfig, 'tiny', vocab_size=40))\n"
    "assert num_parameters(model) > 0 and nn.init.normal_ is init\n"
    "heavy = ('lightning', 'deepspeed', 'torch._dynamo')\n"
    "print([m for m in heavy if m in sys.modules])\n"
)


def test_the_driver_loads_no_lightning_deepspeed_or_dynamo() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", DRIVER],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    chains = [
        " <- ".join(importers(result.stderr, m) or [m])
        for m in ("lightning", "deepspeed", "torch._dynamo")
        if repr(m) in result.stdout
    ]
    assert result.stdout.strip() == "[]", f"the driver paid for: {'; '.join(chains)}"
