"""edgessl.fileio: atomic writes (old file kept and no temporary left when the writer fails, mode 0644 under umask
022) and the one sha256 of a file, which export/device_check.py's own copy must match."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from edgessl.fileio import atomic_write, atomic_write_text, sha256_file, sha256_files


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_text_round_trips(tmp_path):
    path = tmp_path / "a.json"
    text = '{"k": "\u00e9 \u2713"}\n' * 3
    assert atomic_write_text(path, text) == path
    assert path.read_text() == text
    assert atomic_write_text(path, "second\n") == path  # over an existing file
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_writer_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old\n")

    def writer(tmp):
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, writer)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]

    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # also when interrupted (Ctrl-C)
        atomic_write(path, interrupted)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_failed_writer_without_old_file_leaves_nothing(tmp_path):
    def writer(tmp):
        tmp.write_text("half")
        raise ValueError("bad value")

    with pytest.raises(ValueError):
        atomic_write(tmp_path / "new.json", writer)
    assert list(tmp_path.iterdir()) == []


def test_mode_0644_under_umask_022(tmp_path, umask_022):
    def private_writer(tmp):  # like safetensors or tempfile: created 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"data")
        os.close(fd)

    for path, write in ((tmp_path / "a.txt", lambda p: atomic_write_text(p, "x")),
                        (tmp_path / "b.bin", lambda p: atomic_write(p, private_writer))):
        write(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    old = tmp_path / "c.txt"
    old.write_text("old")
    old.chmod(0o600)
    atomic_write_text(old, "new")
    assert stat.S_IMODE(old.stat().st_mode) == 0o644


def test_sha256_file(tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)  # several 1 MiB blocks and a partial one
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == sha256_file(path)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()
    other = tmp_path / "other"
    other.write_bytes(b"tail")
    assert sha256_files([path, other]) == hashlib.sha256(data + b"tail").hexdigest()


def test_device_check_sha256_equals_sha256_file(tmp_path):
    """export/device_check.py keeps its own sha256 (it runs on devices without edgessl): the same digest."""
    from edgessl.scripts import load_script

    script = load_script()
    for size in (0, 5, (1 << 20) - 1, 1 << 20, 2 * (1 << 20) + 7):
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        assert script.sha256(path) == sha256_file(path)


def test_a_file_where_an_out_folder_would_go_is_refused_before_any_work(tmp_path):
    """embed and slim check --out this way: a file in the path is one line naming it, not the system's error once
    the work is done."""
    from edgessl.errors import UserError
    from edgessl.fileio import check_folder_path

    (tmp_path / "afile").write_text("hi")
    for folder in (tmp_path / "afile", tmp_path / "afile" / "deeper"):
        with pytest.raises(UserError) as e:
            check_folder_path(folder, folder / "e.npz")
        assert str(e.value) == (f"--out '{folder / 'e.npz'}': '{tmp_path / 'afile'}' is a file, not a folder; "
                                "choose another --out.")
    check_folder_path(tmp_path / "new" / "deeper", tmp_path / "new" / "deeper" / "e.npz")  # nothing in the way
    assert not (tmp_path / "new").exists()
