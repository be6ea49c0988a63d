"""Starting a new file's write-back as it is written (remowt.runtime.writeback), and the atomic file that does."""

from __future__ import annotations

import os
import pathlib

import pytest

from remowt.endpoints.fs import AtomicFile
from remowt.runtime import writeback

pytestmark = pytest.mark.timeout(60)


def test_write_back_is_started_for_a_file_and_refused_for_a_pipe(tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        assert writeback.start_writeback(f.fileno(), 0, 1 << 20)  # Linux with glibc: the call exists and works
    read_end, write_end = os.pipe()
    try:
        assert not writeback.start_writeback(write_end, 0, 1)  # ESPIPE: refused, and said so
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_atomic_file_asks_for_write_back_every_step_and_keeps_every_byte(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []
    real = writeback.start_writeback

    def spy(fd: int, offset: int, length: int) -> bool:
        asked.append((offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr("remowt.endpoints.fs.start_writeback", spy)
    step = writeback.STEP
    data = os.urandom(2 * step + 12345)
    new = AtomicFile(tmp_path / "big")
    for offset in range(0, len(data), 1 << 20):
        new.write(data[offset : offset + (1 << 20)])
    new.commit()
    assert asked == [(0, step), (step, step)]
    assert (tmp_path / "big").read_bytes() == data
