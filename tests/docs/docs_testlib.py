"""What tests/docs/test_docs_commands.py needs besides its registry: the shell commands shown in the
docs' fenced code blocks, a scratch copy of the repository with small cuts of ../shared/data beside
it, and a runner that executes a command as written and remembers its result."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = ("README.md", "docs/*.md")
# A documented command: a line that runs kiln (or make), pipes into kiln, or sets a variable.
COMMAND_RE = re.compile(r"^(kiln |make |(echo|printf) .*\| *kiln |[A-Z_][A-Z0-9_]*=\$\()")
SHARED_RE = re.compile(r"\.\./shared/data/[^\s'\],]+")


@dataclass(frozen=True)
class DocCommand:
    """One command of a fenced code block: `text` as bash runs it (continuations joined, the comment
    and a `$ ` prompt removed), `key` the same with runs of spaces collapsed (the registry's key),
    and for a `$ ` prompt the lines the docs show it printing."""

    path: str
    line: int
    text: str
    output: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return " ".join(self.text.split())


def strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` that starts a word outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _blocks(text: str) -> list[list[tuple[int, str]]]:
    """The fenced code blocks of a markdown text, each a list of (1-based line number, line)."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append((number, line))
    return blocks


def _logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines with `\\` continuations joined, each with the number of its first physical line."""
    joined: list[tuple[int, str]] = []
    start, parts = 0, []
    for number, line in block:
        if not parts:
            start = number
        parts.append(line.rstrip())
        if parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1].rstrip()
            continue
        joined.append((start, " ".join([parts[0], *(p.strip() for p in parts[1:])])))
        parts = []
    if parts:
        joined.append((start, " ".join(parts)))
    return joined


def commands_in(path: Path, root: Path = ROOT) -> list[DocCommand]:
    """Every command of the fenced code blocks in one markdown file."""
    found: list[DocCommand] = []
    for block in _blocks(path.read_text(encoding="utf-8")):
        lines = _logical_lines(block)
        for i, (number, raw) in enumerate(lines):
            prompt = raw.startswith("$ ")
            code = strip_comment(raw[2:] if prompt else raw).strip()
            if not COMMAND_RE.match(code):
                continue
            output: tuple[str, ...] = ()
            if (
                prompt
            ):  # what follows a `$ ` line up to the next prompt is the output the docs promise
                rest = [text for _, text in lines[i + 1 :]]
                stop = next((j for j, text in enumerate(rest) if text.startswith("$ ")), len(rest))
                output = tuple(text for text in rest[:stop] if text.strip())
            found.append(DocCommand(str(path.relative_to(root)), number, code, output))
    return found


def doc_commands(root: Path = ROOT) -> list[DocCommand]:
    """The commands of README.md and docs/*.md, in reading order."""
    paths = [p for pattern in DOC_FILES for p in sorted(root.glob(pattern))]
    return [command for path in paths for command in commands_in(path, root)]


def shared_paths(text: str) -> set[str]:
    """The `../shared/data/...` paths a command or a recipe names."""
    return set(SHARED_RE.findall(text))


# --------------------------------------------------------------------------------- the scratch copy
def repo_files(root: Path = ROOT) -> list[str]:
    """What a fresh clone holds: tracked files and new ones not yet committed (not the ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return sorted({name for name in listed if name and (root / name).is_file()})


def copy_repo(dest: Path, root: Path = ROOT) -> Path:
    for name in repo_files(root):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    return dest


def cut_file(src: Path, dest: Path, lines: int) -> None:
    """The first `lines` lines of `src` (a TSV keeps its header as one of them)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        src.open(encoding="utf-8", newline="") as fin,
        dest.open("w", encoding="utf-8", newline="") as fout,
    ):
        for i, line in enumerate(fin):
            if i >= lines:
                break
            fout.write(line)


# --------------------------------------------------------------------------------- running commands
@dataclass
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self) -> str:
        return (
            f"$ {self.command}\nexit {self.returncode} after {self.seconds:.0f} s\n"
            f"--- stdout\n{self.stdout[-2500:]}\n--- stderr\n{self.stderr[-2500:]}"
        )


@dataclass
class Shell:
    """Runs commands with bash in the scratch repository, as a user would type them, and keeps
    variables that assignment lines (`M=$(...)`) set for the later lines."""

    cwd: Path
    env: dict[str, str]
    variables: dict[str, str] = field(default_factory=dict)
    log: list[Result] = field(default_factory=list)

    def run(self, command: str, timeout: float = 300) -> Result:
        assign = re.match(r"^([A-Z_][A-Z0-9_]*)=\$\(", command)
        script = f"{command}\nprintf '%s' \"${assign.group(1)}\"" if assign else command
        start = time.monotonic()
        try:
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=self.cwd,
                env={**self.env, **self.variables},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            result = Result(
                command, done.returncode, done.stdout, done.stderr, time.monotonic() - start
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            result = Result(
                command, -9, out, err + f"\n(timed out after {timeout} s)", time.monotonic() - start
            )
        if assign and result.returncode == 0:
            self.variables[assign.group(1)] = result.stdout
        self.log.append(result)
        return result


def venv_bin() -> Path:
    """The directory of the `kiln` script that belongs to this interpreter."""
    return Path(sys.executable).parent


def command_env(scratch: Path, kiln_home: Path) -> dict[str, str]:
    """A user's shell in the scratch clone: its `kiln` on PATH and its code imported (as an editable
    install of that clone would), W&B offline, Kiln's cluster record in a private KILN_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_", "PYTEST_"))}
    env.update(
        PATH=f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(scratch),
        WANDB_MODE="offline",
        KILN_HOME=str(kiln_home),
        TOKENIZERS_PARALLELISM="false",
    )
    return env
