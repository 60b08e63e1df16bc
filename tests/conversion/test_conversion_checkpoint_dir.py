"""The checkpoint-directory helpers: finding a trainer's latest iteration, atomic writes."""

import os

import pytest

from megatron_miniplm.conversion.checkpoint_info import atomic_directory, resolve_megatron_checkpoint
from megatron_miniplm.conversion.errors import ConversionError


def _checkpoint(path):
    path.mkdir(parents=True)
    (path / "model_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("latest", ["iter_0000005", "5"])
def test_resolves_a_training_runs_latest_iteration(tmp_path, latest):
    _checkpoint(tmp_path / "iter_0000002")
    want = _checkpoint(tmp_path / "iter_0000005")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(latest + "\n")
    assert resolve_megatron_checkpoint(str(tmp_path)) == str(want)
    assert resolve_megatron_checkpoint(str(want)) == str(want)


def test_latest_pointing_nowhere_is_an_error(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("iter_0000009")
    with pytest.raises(ConversionError, match="iter_0000009"):
        resolve_megatron_checkpoint(str(tmp_path))


def test_atomic_directory_publishes_only_on_success(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []
    with atomic_directory(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "done"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["done"]
    with pytest.raises(ConversionError, match="not empty"):
        with atomic_directory(str(tmp_path / "out")):
            pass
    with atomic_directory(str(tmp_path / "out"), overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new"]


def test_single_process_leaves_no_group_or_port_behind(monkeypatch):
    import torch.distributed as dist

    from megatron_miniplm import parallel
    from megatron_miniplm.conversion.session import single_process

    parallel.destroy()
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with single_process():
        assert dist.is_initialized() and dist.get_world_size() == 1
    assert not dist.is_initialized()
    assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConversionError, match="one process"):
        with single_process():
            pass
