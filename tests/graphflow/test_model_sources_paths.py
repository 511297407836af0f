"""Every file a model source lets a loader read stays inside its roots, and the walk that checks it cannot be made to
hang, loop or read a whole input directory: attacks on `fingerprint` and `locate`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphflow.errors import Code
from graphflow.models import contents, digests
from graphflow.models.sources import ModelNotFoundError, fingerprint, locate
from graphflow.paths import PathError, PathPolicy


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An input root holding a small model folder, `model/` (a config and a weights file in a subfolder)."""
    (tmp_path / "in" / "model" / "unet").mkdir(parents=True)
    (tmp_path / "in" / "model" / "config.json").write_text("{}")
    (tmp_path / "in" / "model" / "unet" / "weights.safetensors").write_bytes(b"weights")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.safetensors").write_bytes(b"secret")
    return tmp_path / "in"


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file whose bytes the digest index reads."""
    paths: list[Path] = []
    original = digests._hash

    def spy(path: Path) -> tuple:
        paths.append(path)
        return original(path)

    monkeypatch.setattr(digests, "_hash", spy)
    return paths


def _refusal(name: str, root: Path, *roots: Path) -> PathError:
    """The PathError both `fingerprint` and `locate` raise for `name`, checked to be the same."""
    paths = PathPolicy.create([root, *roots])
    with pytest.raises(PathError) as planned:
        fingerprint(name, paths, node="load", input="model")
    with pytest.raises(PathError) as located:
        locate(name, paths, node="load", input="model")
    assert planned.value.error == located.value.error
    assert (planned.value.error.node, planned.value.error.input) == ("load", "model")
    return planned.value


def test_a_symlink_to_a_weights_file_outside_the_roots_is_refused_before_it_is_read(root: Path,
                                                                                   hashed: list[Path]) -> None:
    (root / "model" / "unet" / "weights.safetensors").unlink()
    (root / "model" / "unet" / "weights.safetensors").symlink_to(root.parent / "outside" / "secret.safetensors")

    error = _refusal("model", root)

    assert error.error.code == Code.PATH_OUTSIDE_ROOT
    assert "'unet/weights.safetensors'" in error.error.message and "secret.safetensors" in error.error.message
    assert root.parent / "outside" / "secret.safetensors" not in hashed


def test_a_symlinked_subfolder_outside_the_roots_is_refused(root: Path, hashed: list[Path]) -> None:
    (root / "model" / "text_encoder").symlink_to(root.parent / "outside", target_is_directory=True)

    error = _refusal("model", root)

    assert error.error.code == Code.PATH_OUTSIDE_ROOT and "'text_encoder'" in error.error.message
    assert not any(path.is_relative_to(root.parent / "outside") for path in hashed)


def test_a_symlinked_subfolder_inside_the_roots_is_followed_and_fingerprinted(root: Path) -> None:
    shared = root / "shared" / "vae"
    shared.mkdir(parents=True)
    (shared / "diffusion_pytorch_model.safetensors").write_bytes(b"vae one")
    (root / "model" / "vae").symlink_to(shared, target_is_directory=True)
    paths = PathPolicy.create([root])

    before = fingerprint("model", paths)
    source = locate("model", paths, node="load", input="model")
    assert "vae/diffusion_pytorch_model.safetensors" in dict(source.files)
    _rewrite_keeping_size_and_times(shared / "diffusion_pytorch_model.safetensors", b"vae two")

    assert fingerprint("model", paths) != before


def test_a_symlink_into_another_input_root_is_followed(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-root"
    other.mkdir()
    (other / "weights.safetensors").write_bytes(b"shared weights")
    (root / "model" / "unet" / "weights.safetensors").unlink()
    (root / "model" / "unet" / "weights.safetensors").symlink_to(other / "weights.safetensors")

    with pytest.raises(PathError):  # with one root, the link leads outside
        fingerprint("model", PathPolicy.create([root]))
    both = PathPolicy.create([root, other])
    before = fingerprint("model", both)
    _rewrite_keeping_size_and_times(other / "weights.safetensors", b"SHARED WEIGHTS")
    assert fingerprint("model", both) != before


def _rewrite_keeping_size_and_times(path: Path, data: bytes) -> None:
    """Replace a file's bytes by others of the same length, then put its access and modification times back."""
    status = path.stat()
    assert len(data) == status.st_size
    path.write_bytes(data)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (status.st_size, status.st_mtime_ns)


@pytest.mark.parametrize("loop", ["to_itself", "to_the_model", "to_the_parent", "two_links"])
def test_symlink_loops_inside_a_model_folder_are_clear_errors(root: Path, loop: str) -> None:
    model = root / "model"
    if loop == "to_itself":
        (model / "self").symlink_to("self")
    elif loop == "to_the_model":
        (model / "unet" / "again").symlink_to(model, target_is_directory=True)
    elif loop == "to_the_parent":
        (model / "unet" / "up").symlink_to("..", target_is_directory=True)
    else:
        (model / "a").symlink_to("b")
        (model / "b").symlink_to("a")

    error = _refusal("model", root)

    assert error.error.code == Code.INVALID_VALUE and "symlink loop" in error.error.message


@pytest.mark.parametrize("name", [".", "./", "model/..", "{root}"])
def test_a_source_that_is_an_input_root_itself_is_refused_without_walking_it(root: Path, name: str,
                                                                             hashed: list[Path]) -> None:
    error = _refusal(name.format(root=root), root)

    assert error.error.code == Code.INVALID_VALUE and "input directory" in error.error.message
    assert hashed == []


def test_a_source_above_an_input_root_is_outside_it(root: Path) -> None:
    assert _refusal("..", root).error.code == Code.PATH_OUTSIDE_ROOT


def test_a_source_that_holds_another_input_root_is_refused(root: Path) -> None:
    (root / "model" / "nested-root").mkdir()
    error = _refusal("model", root, root / "model" / "nested-root")
    assert error.error.code == Code.INVALID_VALUE and "input directory" in error.error.message


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_a_blank_source_names_no_model_and_loaders_refuse_it(root: Path, blank: str, hashed: list[Path]) -> None:
    paths = PathPolicy.create([root])
    assert fingerprint(blank, paths) == ""  # cheap and valid where a source is optional (a loader's config)
    with pytest.raises(PathError, match="no model source given") as raised:
        locate(blank, paths, node="load", input="model")
    assert raised.value.error.code == Code.INVALID_VALUE and hashed == []


def test_a_missing_source_has_an_empty_fingerprint(root: Path) -> None:
    paths = PathPolicy.create([root])
    assert fingerprint("nothing-here", paths) == fingerprint("nobody/not-cached", paths) == ""
    assert fingerprint("tiny:no-such-model", paths) == ""


@pytest.fixture
def fast_tmp() -> Iterator[Path]:
    """A temporary folder in memory where there is one (100,000 files take ~1 s there, ~15 s on this disk)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    if base is None:
        pytest.skip("needs a tmpfs at /dev/shm to create 100,000 files quickly")
    with tempfile.TemporaryDirectory(dir=base) as folder:
        yield Path(folder)


def test_a_folder_of_100k_entries_is_refused_after_reading_a_bounded_part(fast_tmp: Path, hashed: list[Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (fast_tmp / "model").mkdir()
    for index in range(100_000):
        os.close(os.open(fast_tmp / "model" / f"{index}.json", os.O_CREAT | os.O_WRONLY, 0o644))
    listed = []
    original = contents._entries

    def spy(folder: Path, walk: contents.Walk, seen: int) -> list:
        try:
            entries = original(folder, walk, seen)
        except PathError:
            listed.append(contents.MAX_ENTRIES + 1)
            raise
        listed.append(len(entries))
        return entries

    monkeypatch.setattr(contents, "_entries", spy)
    error = _refusal("model", fast_tmp)

    assert error.error.code == Code.INVALID_VALUE and "more than 10,000" in error.error.message
    assert sum(listed) <= 2 * (contents.MAX_ENTRIES + 1) and hashed == []  # fingerprint and locate, stopped early


def test_symlinked_folders_fanning_out_cannot_multiply_the_walk(root: Path) -> None:
    model = root / "model"
    level = model / "level0"
    level.mkdir()
    for depth in range(1, 7):  # six levels of ten links each to the next: a million paths from 70 entries
        below = model / f"level{depth}"
        below.mkdir()
        for link in range(10):
            (level / f"link{link}").symlink_to(below, target_is_directory=True)
        level = below
    (level / "weights.safetensors").write_bytes(b"w")

    error = _refusal("model", root)

    assert error.error.code == Code.INVALID_VALUE and "more than 10,000" in error.error.message


def test_folders_nested_too_deep_are_refused(root: Path) -> None:
    folder = root / "model"
    for depth in range(contents.MAX_DEPTH + 2):
        folder = folder / f"d{depth}"
    folder.mkdir(parents=True)
    error = _refusal("model", root)
    assert error.error.code == Code.INVALID_VALUE and "deep" in error.error.message


def test_a_fifo_in_a_model_folder_is_refused_without_opening_it(root: Path) -> None:
    os.mkfifo(root / "model" / "unet" / "config.json")  # opening it to read would block until a writer comes
    error = _refusal("model", root)
    assert error.error.code == Code.INVALID_VALUE and "not a regular file" in error.error.message


def test_a_dangling_symlink_counts_and_its_target_appearing_changes_the_fingerprint(root: Path) -> None:
    (root / "model" / "tokenizer.json").symlink_to(root / "later.json")
    paths = PathPolicy.create([root])
    before = fingerprint("model", paths)
    (root / "later.json").write_text("{}")
    assert fingerprint("model", paths) != before


def test_a_safetensors_name_linking_to_a_pickle_is_refused_unread(root: Path, hashed: list[Path]) -> None:
    (root / "model.ckpt").write_bytes(b"pickle")
    (root / "model.safetensors").symlink_to(root / "model.ckpt")
    paths = PathPolicy.create([root])
    assert fingerprint("model.safetensors", paths) == ""
    with pytest.raises(ModelNotFoundError, match=r"\.ckpt file"):
        locate("model.safetensors", paths, node="load", input="model")
    assert hashed == []


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding someone/model as the hub client lays it out: snapshot files link into blobs."""
    from huggingface_hub import constants

    repository = tmp_path / "hub" / "models--someone--model"
    snapshot = repository / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repository / "blobs").mkdir()
    (repository / "blobs" / "b1").write_text("{}")
    (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", "b1"))
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


def test_a_hub_snapshot_is_keyed_by_its_revision_with_files_linking_into_its_blobs(root: Path, hub: Path) -> None:
    paths = PathPolicy.create([root])
    assert fingerprint("someone/model", paths) == "hub:" + "a" * 40
    source = locate("someone/model", paths, node="load", input="model", files=("config.json",))
    assert source.kind == "hub" and source.key == "someone/model@" + "a" * 40


def test_a_hub_snapshot_file_linking_outside_its_repository_is_refused(root: Path, hub: Path) -> None:
    (hub / "model.safetensors").symlink_to(root.parent / "outside" / "secret.safetensors")
    error = _refusal("someone/model", root)
    assert error.error.code == Code.PATH_OUTSIDE_ROOT and "'model.safetensors'" in error.error.message


def test_a_hub_revision_that_climbs_out_of_the_repository_is_refused(root: Path, hub: Path) -> None:
    repository = hub.parent.parent
    (repository.parent / "elsewhere").mkdir()
    (repository / "refs" / "main").write_text("../../elsewhere")
    with pytest.raises(PathError) as raised:
        fingerprint("someone/model", PathPolicy.create([root]))
    assert raised.value.error.code == Code.PATH_OUTSIDE_ROOT


def test_a_tiny_model_linking_outside_the_tiny_models_folder_is_refused(root: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "dpt").symlink_to(root / "model", target_is_directory=True)
    (root / "model" / ".complete").write_text("")
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny))
    error = _refusal("tiny:dpt", root)
    assert error.error.code == Code.PATH_OUTSIDE_ROOT
