"""The README runs as written: every shell and Python block in it runs offline on the tiny models, or is marked as
one that cannot run here, with the reason.

A block is marked by an HTML comment on the line before its fence (invisible on GitHub):

    <!-- readme-test: skip (needs a GPU) -->                     the whole block
    <!-- readme-test: skip `pip install *` (needs the network) -->  only the commands matching that pattern

Patterns are shell-style (fnmatch) over a command with its comments and quotes removed; several `skip` items may
follow one another, separated by ";". Commands are a block's lines (joined where a line ends with a backslash)
split at `&&`. A block that is neither run nor marked, a marker without a reason, and a pattern that matches
nothing all fail, so a new block is never silently left out. Each block runs in a fresh copy of the repository's
data (graphs/, benchmarks/, docs/, ...) with `HF_HUB_OFFLINE=1` and the session's tiny models.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUNNERS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
_FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<language>[\w+-]*)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:(?P<body>.*?)-->\s*$")
_SKIP = re.compile(r"\s*skip(?:\s+`(?P<pattern>[^`]+)`)?\s+\((?P<reason>[^()]*\S[^()]*)\)\s*")
# the repository's code is installed; the blocks get copies of everything else they may read or write
_NOT_COPIED = {"graphflow", "nodes", "tests", "output", "build", "graphflow-data", "runs"}
BLOCK_TIMEOUT_SECONDS = 600  # the whole block; a two-core machine shared with other work is slow


@dataclass(frozen=True)
class Skip:
    pattern: str | None  # None: the whole block
    reason: str


@dataclass(frozen=True)
class Block:
    """One fenced shell or Python block of the README."""

    id: str  # the section's slug and the block's number in it, e.g. "quick-start-1"
    line: int
    language: str
    text: str
    skips: tuple[Skip, ...]

    @property
    def skipped(self) -> Skip | None:
        return next((skip for skip in self.skips if skip.pattern is None), None)


def parse_marker(body: str, line: int) -> tuple[Skip, ...]:
    skips = []
    for item in body.split(";"):
        match = _SKIP.fullmatch(item)
        if match is None:
            raise ValueError(f"README.md:{line}: cannot read the marker item {item.strip()!r}; write "
                             "skip (REASON) or skip `PATTERN` (REASON)")
        skips.append(Skip(match["pattern"], match["reason"].strip()))
    return tuple(skips)


def readme_blocks(text: str) -> list[Block]:
    """The README's shell and Python blocks, with the markers before them."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, numbers, pending = "top", {}, None  # pending: (marker line, skips) waiting for its block
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence is None:
            if (heading := _HEADING.match(line)) is not None:
                section = re.sub(r"[^a-z0-9]+", "-", heading["title"].lower()).strip("-")
            elif (marker := _MARKER.match(line)) is not None:
                if pending is not None:
                    raise ValueError(f"README.md:{pending[0]}: a readme-test marker with no block after it")
                pending = (index + 1, parse_marker(marker["body"], index + 1))
            elif line.strip() and pending is not None:
                raise ValueError(f"README.md:{pending[0]}: a readme-test marker must come right before a block")
            index += 1
            continue
        end = next((number for number in range(index + 1, len(lines))
                    if lines[number].strip().startswith(fence["fence"])), len(lines))
        language = fence["language"].lower()
        if language in RUNNERS:
            numbers[section] = numbers.get(section, 0) + 1
            blocks.append(Block(f"{section}-{numbers[section]}", index + 1, RUNNERS[language],
                                "\n".join(lines[index + 1:end]) + "\n", pending[1] if pending else ()))
        elif pending is not None:
            raise ValueError(f"README.md:{pending[0]}: a readme-test marker before a block that never runs "
                             f"({language or 'no language'})")
        pending = None
        index = end + 1
    return blocks


def logical_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    joined, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    return joined


def split_commands(line: str) -> list[str]:
    """`line` cut at each `&&` outside quotes, and its comment dropped."""
    parts, start, quote, index = [], 0, None, 0
    while index < len(line):
        char = line[index]
        if quote is not None:
            if char == "\\" and quote == '"':
                index += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "\\":
            index += 1
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            break
        elif line.startswith("&&", index):
            parts.append(line[start:index])
            start = index + 2
            index += 1
        index += 1
    parts.append(line[start:index])
    return [part.strip() for part in parts if part.strip()]


def shown(command: str) -> str:
    """A command as a skip pattern sees it: words without their quotes, one space apart."""
    return " ".join(shlex.split(command))


def script(block: Block) -> tuple[str, list[str]]:
    """What runs of `block` (its text, less the commands that a marker skips) and the patterns that matched
    nothing."""
    if block.language == "python":
        unused = [skip.pattern for skip in block.skips if skip.pattern is not None]
        return block.text, unused
    patterns = [skip.pattern for skip in block.skips if skip.pattern is not None]
    used: set[str] = set()
    kept_lines = []
    for line in logical_lines(block.text):
        kept = []
        for command in split_commands(line):
            matching = [pattern for pattern in patterns if fnmatch.fnmatchcase(shown(command), pattern)]
            used.update(matching)
            if not matching:
                kept.append(command)
        if kept:
            kept_lines.append(" && ".join(kept))
    return "".join(f"{line}\n" for line in kept_lines), [pattern for pattern in patterns if pattern not in used]


def workspace(tmp_path: Path) -> Path:
    """A copy of the repository's data files, for a block to read and write as if in the checkout."""
    work = tmp_path / "repo"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in _NOT_COPIED or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, work / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, work / entry.name)
    return work


def environment(tmp_path: Path, tiny_models: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # this Python and its `graphflow` command first
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf-home"), "GRAPHFLOW_CACHE_HOME": str(tmp_path / "graphflow-cache"),
            "GRAPHFLOW_TINY_MODELS": str(tiny_models), "PYTHONDONTWRITEBYTECODE": "1"}


def run_block(block: Block, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    text, _ = script(block)
    if block.language == "python":
        (work / "readme_block.py").write_text(text, encoding="utf-8")
        command = [sys.executable, "readme_block.py"]
    else:
        command = ["bash", "-euo", "pipefail", "-c", text]
    try:
        return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{block.line} ({block.id}) ran past {BLOCK_TIMEOUT_SECONDS} s; if it cannot end "
                    "(a server), mark it: <!-- readme-test: skip (REASON) -->")


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_blocks_to_run() -> None:
    assert len([block for block in BLOCKS if block.skipped is None]) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.id)
def test_readme_block_runs_as_written(block: Block, tmp_path: Path, tiny_models: Path) -> None:
    text, unused = script(block)
    assert not unused, f"README.md:{block.line} ({block.id}): skip patterns that match no command: {unused}"
    if block.skipped is not None:
        pytest.skip(f"README.md:{block.line}: {block.skipped.reason}")
    assert text.strip(), f"README.md:{block.line} ({block.id}): every command is skipped; mark the whole block"

    done = run_block(block, workspace(tmp_path), environment(tmp_path, tiny_models))

    assert done.returncode == 0, (f"README.md:{block.line} ({block.id}) failed with exit code {done.returncode}:\n"
                                  f"{text}\n--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n"
                                  f"{done.stderr[-3000:]}")


# what the README says about what its blocks do


def block_after(text: str) -> Block:
    """The first block after the README line containing `text`."""
    line = next(number for number, content in enumerate(README.read_text(encoding="utf-8").splitlines(), 1)
                if text in content)
    return next(block for block in BLOCKS if block.line > line)


def test_the_builder_saves_the_hand_written_document(tmp_path: Path, tiny_models: Path) -> None:
    builder = block_after("**In Python**")
    markdown = README.read_text(encoding="utf-8")
    hand_written = re.search(r"ids, and named `outputs`:\n\n```json\n(.*?)```", markdown, re.DOTALL)
    assert builder.language == "python" and "g.save(\"edges.json\")" in builder.text and hand_written
    work = workspace(tmp_path)

    done = run_block(builder, work, environment(tmp_path, tiny_models))

    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "edges.json").read_text(encoding="utf-8") == hand_written[1]


def test_template_run_writes_what_the_command_above_writes(tmp_path: Path, tiny_models: Path) -> None:
    command, python = block_after("**Templates**"), block_after("graphflow run graphs/canny_blend.json --set low=30")
    assert command.language == "bash" and python.language == "python" and "Template(" in python.text
    work, env = workspace(tmp_path), environment(tmp_path, tiny_models)

    for block in (command, python):
        done = run_block(block, work, env)
        assert done.returncode == 0, done.stderr[-3000:]

    written = sorted((work / "output").iterdir())
    assert [path.name for path in written] == ["soft_00000.png", "soft_00001.png"]
    assert written[0].read_bytes() == written[1].read_bytes()  # same pixels, same embedded graph and params


def test_the_missing_weights_message_is_the_one_graphflow_prints(tmp_path: Path, tiny_models: Path) -> None:
    markdown = README.read_text(encoding="utf-8")
    shown_message = re.search(r"searched, and the fix:\n\n```\n(error: node 'pose' \(OpenPose\).*?)```", markdown,
                              re.DOTALL)
    assert shown_message, "the README no longer shows the OpenPose message"
    work = workspace(tmp_path)
    (work / "pose.json").write_text(
        '{"graphflow": 1, "nodes": {"photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/pose.png"}},'
        ' "pose": {"type": "OpenPose", "inputs": {"image": {"from": "photo.image"}}},'
        ' "save": {"type": "SaveImage", "inputs": {"image": {"from": "pose.image"}, "prefix": "pose"}}}}',
        encoding="utf-8")
    env = environment(tmp_path, tiny_models)
    graphflow = shutil.which("graphflow", path=env["PATH"])
    assert graphflow is not None

    done = subprocess.run([graphflow, "run", "pose.json", "--quiet"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT_SECONDS)

    printed = done.stderr.replace(env["HF_HOME"] + "/hub", "~/.cache/huggingface/hub").replace(str(work),
                                                                                            "/path/to/project")
    assert done.returncode == 3
    assert " ".join(shown_message[1].split()) in " ".join(printed.split())
