"""Which exceptions stand for a full disk or an exhausted accelerator, and what the user is told."""
import errno
import os

import pytest

from uts_cli.errors import ResourceError, first_line, is_disk_full, is_out_of_memory, resource_error


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/o.h5.partial"),
    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    # h5py's form: no errno, the C library's text inside HDF5's message
    OSError("Can't write data (file write failed: time = ..., errno = 28, error message = "
            "'No space left on device', buf = ..., total write size = 65536)"),
])
def test_disk_full_forms_are_recognised(exc):
    assert is_disk_full(exc)
    mapped = resource_error(exc, "/data/o.h5.partial")
    assert isinstance(mapped, ResourceError) and mapped.exit_code == 4
    assert "/data/o.h5.partial" in mapped.message and "free space" in mapped.hint


def test_filename_of_the_exception_names_the_place_when_no_path_is_given():
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/t/history.csv")
    assert "/runs/t/history.csv" in resource_error(exc).message


def test_out_of_memory_forms_and_non_matches():
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    mapped = resource_error(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert mapped.exit_code == 4 and "--batch-size" in mapped.hint
    for other in (OSError(errno.EACCES, "Permission denied"), RuntimeError("shape mismatch"), ValueError("x")):
        assert resource_error(other) is None


def test_library_entry_points_raise_resource_errors(monkeypatch, tmp_path):
    """An accelerator OOM inside the library reaches a script as ResourceError (exit class 4), not torch's."""
    import torch

    from uts_cli.api import teach as teach_api
    from uts_cli.config import TeachConfig
    from uts_cli.errors import ResourceError

    def oom(cfg, reporter=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(teach_api, "train_run", oom)
    with pytest.raises(ResourceError, match="out of accelerator memory") as info:
        teach_api.teach(TeachConfig(store=tmp_path / "s.h5", name="t"))
    assert info.value.exit_code == 4 and isinstance(info.value.__cause__, torch.OutOfMemoryError)

    def bug(cfg, reporter=None):
        raise ValueError("a bug stays a bug")

    monkeypatch.setattr(teach_api, "train_run", bug)
    with pytest.raises(ValueError):
        teach_api.teach(TeachConfig(store=tmp_path / "s.h5", name="t"))


def test_first_line_of_an_exception():
    assert first_line(RuntimeError("size mismatch\n  for bn1.weight: ...")) == "size mismatch"
    assert first_line(KeyError()) == "" and first_line(ValueError("one")) == "one"
