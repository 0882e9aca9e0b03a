"""Output files are replaced whole or not at all (pylandmark/_files.py and its users)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pylandmark._files import remove_stale_temps, replaced_atomically
from pylandmark.pipelines import save_descriptors


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("durable", [False, True])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, durable):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with replaced_atomically(target, durable=durable) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []
    with replaced_atomically(target, durable=durable) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the block ends
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        with replaced_atomically(tmp_path / "sub" / "f.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "sub" / "f.bin").st_mode & 0o777 == 0o666 & ~umask


def test_a_folder_is_not_replaced(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with replaced_atomically(tmp_path / "d"):
            pass


def test_extract_outputs_are_written_as_a_pair(tmp_path, monkeypatch):
    desc = np.arange(12, dtype=np.float16).reshape(3, 4)
    npy, listing = save_descriptors(tmp_path / "d", desc, ["a.jpg", "b.jpg", "c.jpg"])
    assert npy == tmp_path / "d.npy" and listing == tmp_path / "d.paths.txt"
    np.testing.assert_array_equal(np.load(npy), desc)
    assert listing.read_text().splitlines() == ["a.jpg", "b.jpg", "c.jpg"]

    class Unprintable:  # writing the listing fails after the array is complete
        def __str__(self):
            raise OSError("no space left")

    with pytest.raises(OSError, match="no space left"):
        save_descriptors(tmp_path / "d.npy", desc[:1] + 1, [Unprintable()])
    np.testing.assert_array_equal(np.load(npy), desc)  # the old pair, whole
    assert listing.read_text().splitlines() == ["a.jpg", "b.jpg", "c.jpg"]
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file locks and fork")
def test_a_file_being_written_survives_another_process_cleaning_up(tmp_path):
    """Every writer holds a lock on its temporary file, so the clean-up of dead writers' files
    that Index.load and Index.save run (from other processes) leaves a live write alone, and
    removes the file of a writer that died."""
    import os

    target = tmp_path / "big.plmi"
    with replaced_atomically(target) as tmp:
        tmp.write_bytes(b"half of it")
        pid = os.fork()
        if pid == 0:  # another process: its own open file description, so the lock applies to it
            remove_stale_temps(target)
            os._exit(0)
        os.waitpid(pid, 0)
        assert tmp.read_bytes() == b"half of it"
    assert target.read_bytes() == b"half of it"
    dead = tmp_path / ".big.plmi.0123456789ab.tmp"  # left by a writer killed with -9: no lock
    dead.write_bytes(b"torn")
    remove_stale_temps(target)
    assert not dead.exists() and target.read_bytes() == b"half of it"
