"""The docs' examples run, and their relative links resolve.

A fenced block whose info string is exactly `python runnable` is executed. All runnable blocks of
one markdown file run in order in one shared namespace (a page may build on its earlier blocks),
inside a fresh temporary working directory, with one torch thread and the Hugging Face hub
offline. A failure names the file and the line the failing block starts on; the traceback's line
numbers are the markdown file's own.
"""

from __future__ import annotations

import random
import re
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = "python runnable"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


def _fences(lines: list[str]) -> list[tuple[int, int, str, str]]:
    """`(opening line index, closing line index, indent, info string)` of every fenced block.

    A block closes at a fence of the same character, at least as long, with no info string
    (CommonMark), so a fence shown inside a longer fence stays part of the code. An unclosed
    block runs to the end of the file.
    """
    out, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, j = match["fence"], i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if (close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence)
                    and not close["info"].strip()):
                break
            j += 1
        out.append((i, j, match["indent"], match["info"].strip()))
        i = j + 1
    return out


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """`(line of the opening fence, info string, code)` of every fenced block; lines count from 1."""
    lines = text.splitlines()
    blocks = []
    for start, end, indent, info in _fences(lines):
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[start + 1:end]]
        blocks.append((start + 1, info, "".join(f"{line}\n" for line in body)))
    return blocks


def prose(text: str) -> str:
    """`text` with every fenced block (fences included) blanked out, line count unchanged."""
    lines = text.splitlines()
    for start, end, _, _ in _fences(lines):
        lines[start:end + 1] = [""] * len(lines[start:end + 1])
    return "\n".join(lines)


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, info, code in fenced_blocks(path.read_text()) if info == RUNNABLE]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _registries() -> list[dict]:
    """Name registries a page may extend (extending.md does); restored after every page."""
    from rlhf_lab.algorithms import ALGORITHMS
    from rlhf_lab.losses import BASELINES, DPO_LOSSES, KL_ESTIMATORS
    from rlhf_lab.models.backbones import TINY_CONFIGS
    from rlhf_lab.stages import STAGES
    from rlhf_lab.tasks import TASKS

    return [BASELINES, DPO_LOSSES, KL_ESTIMATORS, TINY_CONFIGS, ALGORITHMS, STAGES, TASKS]


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_runnable_blocks(page: Path, tmp_path, monkeypatch):
    blocks = runnable_blocks(page)
    if not blocks:
        return  # a page without runnable blocks (README.md so far) has nothing to check
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    saved = [(registry, dict(registry)) for registry in _registries()]
    # A real module, so classes defined on the page resolve their module (dataclasses need it).
    module = types.ModuleType(f"docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for line, code in blocks:
            # The code starts on the line after the fence; padding keeps tracebacks' line
            # numbers those of the markdown file.
            compiled = compile("\n" * line + code, str(page), "exec")
            try:
                exec(compiled, module.__dict__)
            except Exception as err:
                trace = "".join(traceback.format_exception(type(err), err, err.__traceback__.tb_next))
                pytest.fail(f"{_page_id(page)}: the runnable block starting at line {line} failed:\n"
                            f"{trace}", pytrace=False)
    finally:
        torch.set_num_threads(threads)
        for registry, contents in saved:
            registry.clear()
            registry.update(contents)


def test_docs_have_runnable_blocks():
    counts = {_page_id(page): len(runnable_blocks(page)) for page in PAGES}
    assert sum(counts.values()) > 0, f"no ```{RUNNABLE} block in any page: {counts}"


def test_fenced_blocks_parser():
    text = "intro\n```python runnable\nx = 1\n```\n````md\n```python runnable\nnot run\n```\n````\n"
    assert fenced_blocks(text) == [(2, "python runnable", "x = 1\n"),
                                   (5, "md", "```python runnable\nnot run\n```\n")]
    assert prose(text).split("\n") == ["intro"] + [""] * 8


# --- relative links -----------------------------------------------------------------------------

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (outside code blocks), with GitHub's -1, -2 suffixes."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text()), flags=re.M):
        anchor = github_anchor(heading)
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        out.add(anchor if n == 0 else f"{anchor}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page: Path):
    broken = []
    for match in _LINK.finditer(prose(page.read_text())):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{_page_id(page)}: broken links: {', '.join(broken)}"

