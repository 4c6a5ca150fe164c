"""The built-in sample: real text that ships with Python and its installed packages, no network, no files.

* prose documents: the reference prose of `pydoc_data.topics` (one document per topic) plus the module
  docstrings of the standard library, read from source with `ast` so that nothing is imported (some
  modules print, open a browser or start a GUI on import);
* translation pairs: English -> French number verbalisations by `num2words`, cardinals and ordinals;
* labelled text: the first paragraph of docstrings of functions, classes and methods of standard-library
  modules, labelled by the module's domain (text, network, numbers, files, concurrency).

Every function is deterministic for a seed (on one Python version: the stdlib's docstrings change
between releases). Documents are lists of segments (sentences) joined by "\n", the same shape a text
file gives (one document per blank-line block, one segment per line).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import random
import re
import sys
import tokenize
from collections.abc import Iterable

from num2words import num2words

# Modules whose docstrings are not prose, or that are tooling rather than library.
_SKIP_MODULES = frozenset(
    {"this", "antigravity", "idlelib", "tkinter", "turtledemo", "lib2to3", "test", "pydoc_data"}
)
_MIN_MODULE_DOC_CHARS = 200  # shorter module docstrings are one-liners, not documents
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_RULE_LINE = re.compile(r"^[*=\-~^]{3,}$")  # reST heading underlines in pydoc topics

LABEL_NAMES: tuple[str, ...] = ("text", "network", "numbers", "files", "concurrency")
# Standard-library modules by domain; a docstring's label is its module's domain.
_DOMAINS: dict[str, tuple[str, ...]] = {
    "text": (
        "string",
        "re",
        "textwrap",
        "difflib",
        "unicodedata",
        "codecs",
        "html",
        "html.parser",
        "shlex",
        "gettext",
        "locale",
        "csv",
        "json",
        "json.decoder",
        "json.encoder",
        "xml.etree.ElementTree",
        "xml.dom.minidom",
        "xml.sax.saxutils",
        "pprint",
        "reprlib",
        "tokenize",
        "base64",
        "binascii",
        "quopri",
        "email.quoprimime",
        "email.base64mime",
        "builtins.str",
    ),
    "network": (
        "http.client",
        "http.server",
        "http.cookies",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "urllib.robotparser",
        "email.message",
        "email.utils",
        "email.parser",
        "email.header",
        "email.policy",
        "email.headerregistry",
        "socket",
        "smtplib",
        "ftplib",
        "poplib",
        "imaplib",
        "ssl",
        "socketserver",
        "xmlrpc.client",
        "xmlrpc.server",
        "ipaddress",
        "mailbox",
        "wsgiref.simple_server",
        "wsgiref.handlers",
        "wsgiref.util",
        "mimetypes",
    ),
    "numbers": (
        "math",
        "cmath",
        "statistics",
        "_pydecimal",
        "fractions",
        "random",
        "numbers",
        "operator",
    ),
    "files": (
        "os",
        "shutil",
        "pathlib",
        "glob",
        "fnmatch",
        "tarfile",
        "zipfile",
        "tempfile",
        "filecmp",
        "stat",
        "gzip",
        "bz2",
        "lzma",
        "io",
        "_pyio",
        "fileinput",
        "ntpath",
        "posixpath",
    ),
    "concurrency": (
        "threading",
        "multiprocessing.pool",
        "multiprocessing.process",
        "multiprocessing.managers",
        "multiprocessing.connection",
        "concurrent.futures._base",
        "concurrent.futures.thread",
        "concurrent.futures.process",
        "asyncio.tasks",
        "asyncio.events",
        "asyncio.queues",
        "asyncio.locks",
        "asyncio.streams",
        "asyncio.subprocess",
        "asyncio.base_events",
        "queue",
        "sched",
        "subprocess",
        "selectors",
    ),
}
_MIN_LABELLED_WORDS = 4  # "S_ISFIFO(mode) -> bool" is a signature, not text
MAX_SAMPLE_PAIRS = 2 * 10_000  # integers 0..9999, each as a cardinal and as an ordinal


def sample_documents(seed: int, n: int) -> list[str]:
    """Up to `n` prose documents (capped at the pool size), chosen and ordered by `seed`."""
    pool = _document_pool()
    return random.Random(f"kiln-docs-{seed}").sample(pool, min(n, len(pool)))


def sample_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """`n` distinct (English, French) verbalisations of integers 0..9999, cardinal or ordinal."""
    if n > MAX_SAMPLE_PAIRS:
        raise ValueError(f"sample_pairs: at most {MAX_SAMPLE_PAIRS} distinct pairs, asked for {n}")
    pairs = []
    for k in random.Random(f"kiln-pairs-{seed}").sample(range(MAX_SAMPLE_PAIRS), n):
        number, kind = k // 2, ("cardinal", "ordinal")[k % 2]
        pairs.append((num2words(number, lang="en", to=kind), num2words(number, lang="fr", to=kind)))
    return pairs


def sample_labelled(seed: int, n: int) -> tuple[list[tuple[str, int]], list[str]]:
    """Up to `n` (docstring, label id) rows, as class-balanced as the pool allows, and the label names."""
    pools = _labelled_pool()
    rng = random.Random(f"kiln-labelled-{seed}")
    queues = [rng.sample(pools[name], len(pools[name])) for name in LABEL_NAMES]
    rows: list[tuple[str, int]] = []
    depth = 0
    # Round-robin over classes so no class dominates; a small class simply runs out first.
    while len(rows) < n and any(depth < len(q) for q in queues):
        for label, queue in enumerate(queues):
            if depth < len(queue) and len(rows) < n:
                rows.append((queue[depth], label))
        depth += 1
    rng.shuffle(rows)
    return rows, list(LABEL_NAMES)


def paragraphs_to_document(text: str) -> str:
    """reST-ish prose -> one segment (sentence) per line; headings' underlines dropped."""
    segments = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if not _RULE_LINE.match(ln.strip())]
        flat = " ".join(" ".join(lines).split())
        segments.extend(s for s in _SENTENCE_END.split(flat) if s)
    return "\n".join(segments)


@functools.lru_cache(maxsize=1)
def _document_pool() -> list[str]:
    from pydoc_data.topics import topics  # the bundled reference prose of `help()`

    docs = [paragraphs_to_document(topics[name]) for name in sorted(topics)]
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        doc = _module_docstring(name)
        if doc and len(doc) >= _MIN_MODULE_DOC_CHARS:
            docs.append(paragraphs_to_document(doc))
    return [d for d in docs if d]


def _module_docstring(name: str) -> str | None:
    """The module's docstring read from its source without importing it (None for C modules)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, "rb") as f:
        for tok in tokenize.tokenize(
            f.readline
        ):  # stop at the first real token: no full parse needed
            if tok.type in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                continue
            if tok.type != tokenize.STRING:
                return None
            value = ast.literal_eval(tok.string)
            return inspect.cleandoc(value) if isinstance(value, str) else None
    return None


@functools.lru_cache(maxsize=1)
def _labelled_pool() -> dict[str, list[str]]:
    seen: dict[str, set[str]] = {}
    for label, modules in _DOMAINS.items():
        texts = (p for m in modules for p in map(_first_paragraph, _api_docstrings(m)))
        for text in texts:
            if text and len(text.split()) >= _MIN_LABELLED_WORDS:
                seen.setdefault(text, set()).add(label)
    # A docstring found under two domains ("Return self==value.") has no single true label: drop it.
    pools: dict[str, list[str]] = {name: [] for name in LABEL_NAMES}
    for text, labels in sorted(seen.items()):
        if len(labels) == 1:
            pools[next(iter(labels))].append(text)
    return pools


def _api_docstrings(module_name: str) -> Iterable[str | None]:
    """Docstrings of the public functions, classes and methods of a module, in source order."""
    if module_name == "builtins.str":
        return [getattr(str, k).__doc__ for k in sorted(vars(str)) if not k.startswith("_")]
    spec = importlib.util.find_spec(module_name)
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        return list(_ast_docstrings(tree.body))
    # C modules (math, cmath, unicodedata, binascii) have no source; importing them has no side effects.
    module = importlib.import_module(module_name)
    return [
        getattr(v, "__doc__", None)
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and callable(v)
    ]


def _ast_docstrings(body: list[ast.stmt]) -> Iterable[str | None]:
    for node in body:
        if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        ) and not node.name.startswith("_"):
            yield ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                yield from (
                    ast.get_docstring(sub)
                    for sub in node.body
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and not sub.name.startswith("_")
                )


def _first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def labelled_pool_sizes() -> dict[str, int]:
    """How many distinct docstrings each class has before sampling (for reports and tests)."""
    return {name: len(texts) for name, texts in _labelled_pool().items()}
