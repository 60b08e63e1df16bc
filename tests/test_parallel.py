"""torch.distributed + megatron parallel state from torchrun's environment."""

import os

import pytest

from distributed import run_distributed
from megatron_miniplm import parallel


def test_world_of_one_on_gloo():
    info = parallel.initialize()
    assert (info.world_size, info.tp_size, info.pp_size, info.dp_size) == (1, 1, 1, 1)
    assert info.backend == "gloo" and info.is_first_stage and info.is_last_stage


def test_layout_must_divide_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not divisible"):
        parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=3))


def _check_layout(out_dir, tp, pp):
    info = parallel.initialize(parallel.ParallelConfig(tp, pp))
    with open(os.path.join(out_dir, f"rank{info.rank}"), "w") as f:
        f.write(f"{info.tp_size} {info.pp_size} {info.dp_size} {info.tp_rank} {info.pp_rank} {info.dp_rank}")


@pytest.mark.parametrize("tp,pp,expected", [
    (1, 1, ["1 1 2 0 0 0", "1 1 2 0 0 1"]),
    (2, 1, ["2 1 1 0 0 0", "2 1 1 1 0 0"]),
    (1, 2, ["1 2 1 0 0 0", "1 2 1 0 1 0"]),
])
def test_two_process_layouts(tmp_path, tp, pp, expected):
    run_distributed(_check_layout, 2, str(tmp_path), tp, pp)
    got = [open(tmp_path / f"rank{r}").read() for r in range(2)]
    assert got == expected


def test_world_of_one_leaves_the_environment_alone(monkeypatch):
    """Tools started from a process that initialized itself must not inherit its port."""
    import subprocess
    import sys

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    parallel.destroy()
    parallel.initialize()
    assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ
    code = "from megatron_miniplm import parallel; print(parallel.initialize().world_size)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-2000:]
