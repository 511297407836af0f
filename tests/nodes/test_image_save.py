"""SaveImage writes a batch all or none, reports files only once the batch is in place, and clears the temporary
files that killed runs left behind (but never a live writer's)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import nodes.image
from graphflow.atomic import Staged, temp_target
from graphflow.context import RunContext
from graphflow.events import Event, FileWritten
from nodes.image import SaveImage

BATCH = torch.rand(3, 8, 8, 3, generator=torch.Generator().manual_seed(0))


def failing_place(call: int, error: BaseException, *, after_placing: bool = False) -> Callable[..., bool]:
    """Staged.place that raises `error` on its `call`-th use (from 1), before or after putting that file in place."""
    calls = []
    real = Staged.place

    def place(self: Staged, path: Path, *, exclusive: bool = False) -> bool:
        calls.append(path)
        if len(calls) == call and not after_placing:
            raise error
        placed = real(self, path, exclusive=exclusive)
        if len(calls) == call:
            raise error
        return placed

    return place


def files(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("encoder bug")], ids=["interrupt", "disk-full", "error"])
def test_a_batch_stopped_between_two_images_leaves_none_of_its_files(
        ctx: RunContext, output_dir: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    output_dir.mkdir()
    (output_dir / "room_00000.png").write_bytes(b"an earlier run's")
    monkeypatch.setattr(Staged, "place", failing_place(2, error))

    with pytest.raises(type(error)):
        SaveImage().run(ctx, image=BATCH, prefix="room")

    assert files(output_dir) == ["room_00000.png"]
    assert (output_dir / "room_00000.png").read_bytes() == b"an earlier run's"
    assert ctx.written == []


def test_an_interrupt_just_after_a_file_got_into_place_removes_that_file_too(
        ctx: RunContext, output_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Staged, "place", failing_place(2, KeyboardInterrupt(), after_placing=True))

    with pytest.raises(KeyboardInterrupt):
        SaveImage().run(ctx, image=BATCH, prefix="room")

    assert files(output_dir) == [] and ctx.written == []


def test_a_file_another_writer_put_in_place_is_never_removed(
        ctx: RunContext, output_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output_dir.mkdir()

    def racing_place(self: Staged, path: Path, *, exclusive: bool = False) -> bool:
        path.write_bytes(b"another process's")  # took the name between our check and our placing
        raise KeyboardInterrupt

    monkeypatch.setattr(Staged, "place", racing_place)

    with pytest.raises(KeyboardInterrupt):
        SaveImage().run(ctx, image=BATCH[:1], prefix="room")

    assert (output_dir / "room_00000.png").read_bytes() == b"another process's"


def test_files_are_reported_only_once_the_whole_batch_is_in_place(
        ctx: RunContext, output_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, str]] = []

    real = Staged.place

    def logged_place(self: Staged, path: Path, *, exclusive: bool = False) -> bool:
        log.append(("write", path.name))
        return real(self, path, exclusive=exclusive)

    def on_event(event: Event) -> None:
        if isinstance(event, FileWritten):
            assert event.path.is_file()
            log.append(("event", event.path.name))

    monkeypatch.setattr(Staged, "place", logged_place)
    ctx.on_event = on_event

    SaveImage().run(ctx, image=BATCH, prefix="room")

    names = [f"room_0000{index}.png" for index in range(3)]
    assert log == [("write", name) for name in names] + [("event", name) for name in names]


def subprocess_env() -> dict[str, str]:
    """The test's own import path, so a child process imports this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry)}


SLOW_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from graphflow.context import RunContext
    from graphflow.events import CancelToken
    from graphflow.paths import PathPolicy
    from nodes.image import SaveImage

    real_write = os.write

    def half_then_hang(handle, data):  # a slow disk: half the PNG reaches the temporary file, then nothing
        written = real_write(handle, bytes(data[:len(data) // 2]))
        Path(sys.argv[2]).touch()
        time.sleep(120)
        return written

    os.write = half_then_hang
    ctx = RunContext("save", "SaveImage", PathPolicy.create([sys.argv[1]], sys.argv[1]), CancelToken())
    SaveImage().run(ctx, image=torch.rand(1, 64, 64, 3), prefix="killed")
""")


def start_slow_writer(directory: Path) -> subprocess.Popen[bytes]:
    ready = directory.parent / "ready"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(directory), str(ready)], env=subprocess_env())
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start writing"
        time.sleep(0.05)
    return writer


def temp_files(directory: Path) -> list[str]:
    return [name for name in files(directory) if temp_target(name) is not None]


def test_a_run_after_a_kill_9_mid_write_removes_the_temporary_file_left_behind(ctx: RunContext,
                                                                              output_dir: Path) -> None:
    output_dir.mkdir()
    writer = start_slow_writer(output_dir)
    try:
        [live] = temp_files(output_dir)
        assert temp_target(live) == "killed_00000.png"

        SaveImage().run(ctx, image=BATCH[:1], prefix="room")  # while the writer lives, its file is left alone
        assert temp_files(output_dir) == [live]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()

    assert (output_dir / live).stat().st_size > 0 and temp_files(output_dir) == [live]
    SaveImage().run(ctx, image=BATCH[:1], prefix="room")

    assert files(output_dir) == ["room_00000.png", "room_00001.png"]


FILE_SIZE_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    import torch
    from graphflow.context import RunContext
    from graphflow.events import CancelToken
    from graphflow.paths import PathPolicy
    from nodes.image import SaveImage

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    ctx = RunContext("save", "SaveImage", PathPolicy.create([sys.argv[1]], sys.argv[1]), CancelToken())
    flat, noise = torch.zeros(1, 96, 96, 3), torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(0))
    try:
        SaveImage().run(ctx, image=torch.cat([flat, flat, noise]), prefix="full")  # the third PNG is ~28 kB
    except OSError as error:
        print(error.errno)
""")


def test_a_real_write_error_on_the_third_image_leaves_no_file_of_the_batch(output_dir: Path) -> None:
    output_dir.mkdir()

    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(output_dir)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)

    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert files(output_dir) == []


def test_save_image_writes_nothing_when_encoding_fails(ctx: RunContext, output_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    encodings: list[Any] = []

    def encode(pixels: Any, text: dict[str, str]) -> bytes:
        encodings.append(pixels)
        if len(encodings) == 3:
            raise MemoryError
        return b"png"

    monkeypatch.setattr(nodes.image, "_encode_png", encode)

    with pytest.raises(MemoryError):
        SaveImage().run(ctx, image=BATCH, prefix="room")

    assert files(output_dir) == []
