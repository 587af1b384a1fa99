"""A write into a full file system: one DiskFull (ENOSPC) naming the file, the
space left and about how much was needed; no temporary file left behind."""
import errno

import pytest

from trainers.run import atomic
from trainers.run.atomic import DiskFull, write_atomic


def fill_then_fail(nbytes, error):
    def write(tmp):
        tmp.write_bytes(b"x" * nbytes)
        raise error
    return write


def test_enospc_names_the_file_and_the_size_of_the_previous_checkpoint(tmp_path):
    (tmp_path / "ckpt-000000002.pt").write_bytes(b"x" * 2_500_000)
    target = tmp_path / "ckpt-000000004.pt"
    with pytest.raises(DiskFull) as err:
        write_atomic(target, fill_then_fail(1000, OSError(errno.ENOSPC, "No space left on device")))
    assert err.value.errno == errno.ENOSPC
    msg = err.value.strerror
    assert msg.startswith(f"no space left on device: writing {target} failed with ")
    assert msg.endswith("free on that file system; it needs about 2.5 MB (the size of ckpt-000000002.pt)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000002.pt"]   # no temporary file


def test_torch_saves_runtime_error_on_a_nearly_full_disk_is_a_disk_full(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_free", lambda folder: 4096)
    with pytest.raises(DiskFull, match=r"writing .*state\.pt failed with 4\.1 KB free on that file system; "
                                       r"it needs more than 3\.0 KB$"):
        write_atomic(tmp_path / "state.pt", fill_then_fail(3000, RuntimeError("unexpected pos 1468160 vs 1")))
    assert not list(tmp_path.iterdir())


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="not a disk problem"):
        write_atomic(tmp_path / "a.json", fill_then_fail(10, ValueError("not a disk problem")))
    assert not list(tmp_path.iterdir())
