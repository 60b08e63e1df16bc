"""The latest-checkpoint marker: Megatron-LM's iteration number or a directory name."""
import pytest

from megatron_miniplm.checkpointing import LATEST_FILE, latest_checkpoint, resolve_checkpoint_dir
from megatron_miniplm.training.checkpoint import resume_dir


@pytest.mark.parametrize("text,name,resumable", [
    ("100\n", "iter_0000100", True),         # what Megatron-LM and our trainer write
    ("iter_0000042", "iter_0000042", True),   # a directory name (earlier versions of ours)
    ("iter_42", "iter_42", True),             # read as written, not re-derived
    ("release", "release", False),            # a converted model, not a run to resume
])
def test_marker_names_a_directory(tmp_path, text, name, resumable):
    (tmp_path / LATEST_FILE).write_text(text)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / name)
    assert resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / name)
    if resumable:
        assert resume_dir(str(tmp_path)) == str(tmp_path / name)
    else:
        with pytest.raises(ValueError, match="not a training iteration to resume"):
            resume_dir(str(tmp_path))


def test_no_marker(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    assert resume_dir(str(tmp_path)) is None
    assert resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path)  # a checkpoint directory itself
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint_dir(str(tmp_path / "missing"))
