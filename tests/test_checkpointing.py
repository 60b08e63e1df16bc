"""The latest-checkpoint marker: Megatron-LM's iteration number or a directory name."""
import pytest

from megatron_miniplm.checkpointing import LATEST_FILE, latest_checkpoint, resolve_checkpoint_dir
from megatron_miniplm.training.checkpoint import latest_iteration


@pytest.mark.parametrize("text,name,iteration", [
    ("100\n", "iter_0000100", 100),           # what Megatron-LM and our trainer write
    ("iter_0000042", "iter_0000042", 42),     # a directory name (earlier versions of ours)
    ("release", "release", None),             # a converted model, not a run to resume
])
def test_marker_names_a_directory(tmp_path, text, name, iteration):
    (tmp_path / LATEST_FILE).write_text(text)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / name)
    assert resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / name)
    if iteration is None:
        with pytest.raises(ValueError, match="not a training iteration to resume"):
            latest_iteration(str(tmp_path))
    else:
        assert latest_iteration(str(tmp_path)) == iteration


def test_no_marker(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    assert latest_iteration(str(tmp_path)) is None
    assert resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path)  # a checkpoint directory itself
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint_dir(str(tmp_path / "missing"))
