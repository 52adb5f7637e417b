"""The one atomic write: the target holds its old content or the whole new one, never a part."""
import pytest

from conlip_plugin.atomic_files import atomic_file, atomic_path, temporary_path


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert not temporary_path(target).exists()


def test_the_temporary_takes_the_callers_name_and_is_renamed_into_place(tmp_path):
    target, partial = tmp_path / "epoch_1.pt", tmp_path / "epoch_1.partial"
    with atomic_path(target, temporary=partial) as tmp:
        assert tmp == partial
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and not partial.exists()


def test_a_link_is_placed_without_syncing_its_source(tmp_path):
    source, target = tmp_path / "image.png", tmp_path / "out" / "image.png"
    source.write_bytes(b"png")
    target.parent.mkdir()
    with atomic_path(target, sync=False) as tmp:
        tmp.symlink_to(source)
    assert target.is_symlink() and target.read_bytes() == b"png"
