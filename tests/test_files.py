"""factory.files on a real filesystem, with real processes holding real locks."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from factory.errors import FactoryError
from factory.files import file_lock, replace_path, staging_dir, write_text_atomically


def test_staging_dir_is_inside_and_removed_even_on_error(tmp_path):
    with pytest.raises(KeyboardInterrupt), staging_dir(tmp_path / "out") as staging:
        assert staging.parent == tmp_path / "out"
        (staging / "half").write_text("x")
        raise KeyboardInterrupt
    assert list((tmp_path / "out").iterdir()) == []


def test_write_text_atomically_replaces_and_sets_the_mode(tmp_path):
    target = tmp_path / "SHA256SUMS"
    target.write_text("old\n")
    assert write_text_atomically(target, "new\n", mode=0o600) == target
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["SHA256SUMS"]


def test_replace_path_puts_a_folder_in_place_of_another(tmp_path):
    final, new = tmp_path / "delivery", tmp_path / "new"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_path(new, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delivery"]


def test_replace_path_puts_a_file_in_place(tmp_path):
    new, final = tmp_path / "a.tmp", tmp_path / "a"
    new.write_text("1")
    replace_path(new, final)
    assert final.read_text() == "1" and not new.exists()


def _hold(path: str, ready, release) -> None:
    with file_lock(Path(path), wait=False, busy="busy"):
        ready.set()
        release.wait(20)


@pytest.fixture
def held_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    lock = tmp_path / ".demo.lock"
    holder = context.Process(target=_hold, args=(str(lock), ready, release))
    holder.start()
    assert ready.wait(20)
    yield lock, release
    release.set()
    holder.join(20)


def test_file_lock_refuses_when_held_and_not_waiting(held_lock):
    lock, _ = held_lock
    with pytest.raises(FactoryError, match="^another build is running$"):
        with file_lock(lock, wait=False, busy="another build is running"):
            pass


def test_file_lock_waits_and_says_so_once(held_lock):
    lock, release = held_lock
    lines: list[str] = []
    started = time.monotonic()
    context = multiprocessing.get_context("fork")
    releaser = context.Process(target=lambda: (time.sleep(0.5), release.set()))
    releaser.start()
    with file_lock(lock, wait=True, busy="waiting for the other build", log=lines.append):
        assert time.monotonic() - started >= 0.4
    releaser.join(20)
    assert lines == ["waiting for the other build"]


def test_file_lock_neither_follows_a_link_nor_truncates(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / ".x.lock"
    link.symlink_to(victim)
    with pytest.raises(FactoryError, match="remove it if it is a link"):
        with file_lock(link, wait=False, busy="busy"):
            pass
    lock = tmp_path / ".y.lock"
    lock.write_text("content")
    with file_lock(lock, wait=False, busy="busy"):
        pass
    assert victim.read_text() == "keep me" and lock.read_text() == "content"
    assert os.path.islink(link)
