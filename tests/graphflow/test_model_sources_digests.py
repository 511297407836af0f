"""Model fingerprints are a pure function of the files' bytes, and each file is hashed once: the digest index, its
"racy" rule, its file on disk shared by processes, and its recovery from corruption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graphflow.models import digests
from graphflow.models.sources import fingerprint
from graphflow.paths import PathPolicy


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache home of this test's own, so its index starts empty."""
    monkeypatch.setenv("GRAPHFLOW_CACHE_HOME", str(tmp_path / "cache-home"))
    return tmp_path / "cache-home"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "in" / "model").mkdir(parents=True)
    (tmp_path / "in" / "model" / "config.json").write_text("{}")
    (tmp_path / "in" / "model" / "model.safetensors").write_bytes(b"0123456789")
    return tmp_path / "in" / "model"


def _paths(model: Path) -> PathPolicy:
    return PathPolicy.create([model.parent])


def _later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Move the digest index's clock forward, as if hashing happened `seconds` after the files were written."""
    now = digests.time.time_ns
    monkeypatch.setattr(digests.time, "time_ns", lambda: now() + int(seconds * 1e9))


def test_a_file_changed_just_before_hashing_is_hashed_again_until_its_change_is_clearly_past(
        home: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = digests.shared_index()
    fingerprint("model", _paths(model))
    fingerprint("model", _paths(model))
    assert index.hashed == 4  # written within RACY_NS of hashing: a same-tick rewrite could hide, so not kept

    _later(monkeypatch, 3)
    fingerprint("model", _paths(model))
    fingerprint("model", _paths(model))
    assert index.hashed == 6  # hashed once more, long enough after the change to be trusted, then never again


def test_a_same_size_swap_with_its_modification_time_restored_changes_the_fingerprint(
        home: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _later(monkeypatch, 3)  # the first digests are trusted, so only the status can tell the swap
    weights = model / "model.safetensors"
    before = fingerprint("model", _paths(model))
    status = weights.stat()
    weights.write_bytes(b"9876543210")
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (status.st_size, status.st_mtime_ns)

    assert fingerprint("model", _paths(model)) != before


def test_the_fingerprint_depends_on_the_bytes_not_on_paths_or_times(home: Path, model: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "in" / "copy"
    shutil.copytree(model, copy)
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert fingerprint("copy", _paths(model)) == fingerprint("model", _paths(model))
    (copy / "extra.json").write_text("{}")  # a file a loader could read appears
    assert fingerprint("copy", _paths(model)) != fingerprint("model", _paths(model))


def test_files_no_loader_reads_stay_out_of_the_fingerprint(home: Path, model: Path) -> None:
    before = fingerprint("model", _paths(model))
    (model / "diffusion_pytorch_model.bin").write_bytes(b"pickled twin of the weights, never loaded")
    assert fingerprint("model", _paths(model)) == before


_SCRIPT = """
import sys
from graphflow.models import digests
from graphflow.models.sources import fingerprint
from graphflow.paths import PathPolicy
digests.time.time_ns = (lambda now: lambda: now() + 3_000_000_000)(digests.time.time_ns)
print(fingerprint(sys.argv[1], PathPolicy.create([sys.argv[2]])), digests.shared_index().hashed)
"""


def _in_a_process(model: Path, home: Path, name: str = "model") -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, name, str(model.parent)], check=True, capture_output=True,
                          text=True, env={**os.environ, "GRAPHFLOW_CACHE_HOME": str(home)})
    fingerprint_, hashed = done.stdout.split()
    return fingerprint_, int(hashed)


def test_a_new_process_reuses_the_digests_kept_in_the_cache_home(home: Path, model: Path) -> None:
    first = _in_a_process(model, home)
    assert first[1] == 2 and (home / digests.INDEX_NAME).is_file()
    assert _in_a_process(model, home) == (first[0], 0)


def test_a_corrupt_index_is_ignored_and_rewritten(home: Path, model: Path) -> None:
    expected, _ = _in_a_process(model, home)
    for garbage in (b"\x00not json", b'{"version": 1, "algorithm": "sha256", "entries": {"k": 5}}', b"[]"):
        (home / digests.INDEX_NAME).write_bytes(garbage)
        assert _in_a_process(model, home) == (expected, 2)
        assert json.loads((home / digests.INDEX_NAME).read_text())["version"] == 1


def test_a_wrong_digest_planted_under_another_status_is_never_used(home: Path, model: Path) -> None:
    expected, _ = _in_a_process(model, home)
    index = json.loads((home / digests.INDEX_NAME).read_text())
    index["entries"] = {key.replace(":", ":9", 1): ["0" * 32, started] for key, (_, started) in
                        index["entries"].items()}  # the same entries for other inodes
    (home / digests.INDEX_NAME).write_text(json.dumps(index))
    assert _in_a_process(model, home) == (expected, 2)


def test_processes_saving_at_once_keep_every_entry(home: Path, model: Path) -> None:
    for index in range(6):
        folder = model.parent / f"model{index}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"w" * index)
    runs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, f"model{index}", str(model.parent)], text=True,
                             stdout=subprocess.PIPE, env={**os.environ, "GRAPHFLOW_CACHE_HOME": str(home)})
            for index in range(6)]
    assert all(run.wait() == 0 for run in runs)
    entries = json.loads((home / digests.INDEX_NAME).read_text())["entries"]
    assert len(entries) == 6
    assert all(_in_a_process(model, home, f"model{index}")[1] == 0 for index in range(6))


def test_an_unwritable_cache_home_costs_hashing_not_results(tmp_path: Path, model: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("GRAPHFLOW_CACHE_HOME", str(blocker / "cache"))
    _later(monkeypatch, 3)
    assert fingerprint("model", _paths(model)) == fingerprint("model", _paths(model)) != ""


def test_the_index_keeps_only_its_newest_entries(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(digests, "MAX_INDEX_ENTRIES", 3)
    _later(monkeypatch, 3)
    index = digests.shared_index()
    for number in range(5):
        file = tmp_path / f"f{number}"
        file.write_bytes(bytes([number]))
        index.digest(file, file.stat())
        index.save()
    kept = json.loads((home / digests.INDEX_NAME).read_text())["entries"]
    assert sorted(int(key.split(":")[1]) for key in kept) == sorted((tmp_path / f"f{number}").stat().st_ino
                                                                    for number in (2, 3, 4))
