"""torch.distributed + megatron parallel state from torchrun's environment."""

import os

import pytest

from distributed import run_distributed
from megatron_miniplm import launch, parallel


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


# ---- seeds: Megatron-LM's scheme, stages apart ---------------------------------------------

def _draws(out_dir, pp):
    import random

    import numpy as np
    import torch

    info = parallel.initialize(parallel.ParallelConfig(1, pp, seed=77))
    with open(os.path.join(out_dir, f"rank{info.rank}"), "w") as f:
        f.write(f"{info.pp_rank} {random.random()!r} {np.random.random()!r} {torch.rand(1).item()!r}")


def test_each_pipeline_stage_gets_its_own_seed(tmp_path):
    """seed + 100 x pipeline rank for Python, numpy and torch, as Megatron-LM seeds."""
    import random

    import numpy as np
    import torch

    run_distributed(_draws, 2, str(tmp_path), 2)
    for rank in range(2):
        pp_rank, *got = open(tmp_path / f"rank{rank}").read().split()
        seed = 77 + 100 * int(pp_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        assert pp_rank == str(rank)
        assert [float(g) for g in got] == [random.random(), np.random.random(), torch.rand(1).item()]


def test_seed_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        parallel.initialize(parallel.ParallelConfig(seed=0))


# ---- Slurm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist,host", [
    ("gpu[003-004,009],cpu1", "gpu003"), ("nid[00012-00015]", "nid00012"),
    ("node7", "node7"), ("a,b", "a"), ("dgx-a100-[7,9]", "dgx-a100-7"),
    ("node[01-04]-ib", "node01-ib"), ("rack[1-2]-node[01-04],login", "rack1-node01"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert launch.first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "gpu[003-004"])
def test_an_unreadable_slurm_node_list_is_refused(nodelist):
    with pytest.raises(launch.LaunchError, match="Slurm node list"):
        launch.first_host(nodelist)


SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_STEP_NODELIST": "gpu[004-005]",
         "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "2"}


def test_srun_without_torchrun_reads_slurm():
    env = launch.launch_env(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        3, 4, 1, "gpu004", "slurm")
    again = launch.launch_env(dict(SLURM, SLURM_PROCID="0"))
    assert again.master_port == env.master_port and 20000 <= env.master_port < 40000
    assert launch.launch_env(dict(SLURM, SLURM_STEP_ID="3")).master_port != env.master_port
    assert launch.launch_env(dict(SLURM, MASTER_ADDR="h", MASTER_PORT="7")).master_port == 7


def test_torchrun_variables_win_over_slurm():
    """srun starting torchrun (one agent per node): torchrun's variables describe the worker."""
    env = launch.launch_env(dict(SLURM, RANK="5", WORLD_SIZE="16", LOCAL_RANK="5",
                                   MASTER_ADDR="n0", MASTER_PORT="29500"))
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "torchrun")


def test_a_single_slurm_task_is_a_world_of_one():
    env = launch.launch_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "9"})
    assert (env.world_size, env.launcher) == (1, "single")


def test_the_batch_script_itself_is_a_world_of_one():
    """A tool run in the sbatch script (not through srun): SLURM_NTASKS describes the
    allocation, not this process."""
    env = launch.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "9",
                               "SLURM_JOB_NODELIST": "gpu[1-2]"})
    assert (env.world_size, env.launcher) == (1, "single")


def test_slurm_world_without_a_node_list_is_refused():
    env = {k: v for k, v in SLURM.items() if "NODELIST" not in k}
    with pytest.raises(launch.LaunchError, match="srun"):
        launch.launch_env(env)


def test_srun_tasks_form_one_world(tmp_path):
    """Two processes with only Slurm's variables (what srun gives) join one gloo world."""
    import random
    import subprocess
    import sys

    code = ("import sys; from megatron_miniplm import parallel; i = parallel.initialize(); "
            "open(sys.argv[1] + f'/rank{i.rank}', 'w').write(f'{i.world_size} {i.local_rank}')")
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    job = str(random.randrange(10**6))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=dict(
        base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID=job,
        SLURM_JOB_NODELIST="127.0.0.1"), stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()[-2000:]
    assert [open(tmp_path / f"rank{r}").read() for r in range(2)] == ["2 0", "2 1"]


# ---- CUDA_DEVICE_MAX_CONNECTIONS: Megatron-LM's requirement for TP on GPUs before Blackwell ---

CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


class _FirstCudaCall(Exception):
    pass


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine as parallel.initialize sees it, up to its first call that would create the
    CUDA context (megatron_compat.apply, then binding the device), which stops it: the stubs answer
    the device queries, ``gpu`` records the variable as that first call found it."""
    import torch

    from megatron_miniplm import megatron_compat, platform

    monkeypatch.setenv(CONNECTIONS, "unset by the fixture")
    monkeypatch.delenv(CONNECTIONS)  # restored (absent) after the test, whatever the code set
    state = {"capability": (9, 0), "context": False, "seen": "not reached"}

    def first_cuda_call(*args, **kwargs):
        state["seen"] = os.environ.get(CONNECTIONS)
        raise _FirstCudaCall

    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(megatron_compat, "apply", first_cuda_call)
    monkeypatch.setattr(platform, "bind_local_device", first_cuda_call)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda index: state["context"], raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    return state


def _initialize(tp):
    with pytest.raises(_FirstCudaCall):
        parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp))


def test_tensor_parallel_on_a_gpu_before_blackwell_sets_one_connection(gpu, caplog):
    with caplog.at_level("WARNING", logger=parallel.__name__):
        _initialize(2)
    assert gpu["seen"] == "1" and os.environ[CONNECTIONS] == "1"  # set before the first CUDA call
    assert f"{CONNECTIONS}=1 set" in caplog.text and "tensor-model-parallel-size 2" in caplog.text


@pytest.mark.parametrize("capability,tp", [((10, 0), 2), ((9, 0), 1)])
def test_blackwell_or_tp1_leave_the_variable_alone(gpu, capability, tp):
    gpu["capability"] = capability
    _initialize(tp)
    assert gpu["seen"] is None and CONNECTIONS not in os.environ


def test_another_value_is_refused_one_is_kept(gpu, monkeypatch):
    monkeypatch.setenv(CONNECTIONS, "8")
    with pytest.raises(ValueError, match=f"{CONNECTIONS}=8 in the environment: tensor-model-parallel-size 2 "
                                         r"on NVIDIA H100 80GB HBM3 \(compute capability 9.0"):
        parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
    assert gpu["seen"] == "not reached"
    monkeypatch.setenv(CONNECTIONS, "1")
    _initialize(2)
    assert gpu["seen"] == "1"


def test_a_cuda_context_made_before_initialize_is_told_it_is_too_late(gpu, caplog):
    """The driver read the variable when it made the context: setting it now would only claim so."""
    gpu["context"] = True
    with caplog.at_level("WARNING", logger=parallel.__name__):
        _initialize(2)
    assert gpu["seen"] is None
    assert "too early" in caplog.text and f"launch with {CONNECTIONS}=1" in caplog.text


def test_the_cpu_path_leaves_the_variable_alone(monkeypatch):
    monkeypatch.setenv(CONNECTIONS, "unset by the test")
    monkeypatch.delenv(CONNECTIONS)
    parallel.order_cuda_connections(2, launch.LaunchEnv(0, 2, 0, None, None, "torchrun"))
    assert CONNECTIONS not in os.environ


def _groups_across_reinitialisation(out: str) -> None:
    from megatron.core import parallel_state as ps

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
    first = ps.get_tensor_model_parallel_group()
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2, seed=7))
    same = ps.get_tensor_model_parallel_group() is first
    parallel.initialize(parallel.ParallelConfig(pipeline_model_parallel_size=2))
    changed = ps.get_pipeline_model_parallel_world_size() == 2 and ps.get_tensor_model_parallel_world_size() == 1
    with open(os.path.join(out, f"rank{torch_rank()}"), "w") as f:
        f.write(f"{same} {changed}")


def torch_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def test_the_same_layout_keeps_its_groups(tmp_path):
    """A second initialisation at the same TP/PP (the evaluator's next checkpoint) keeps
    megatron-core's groups, whose NCCL communicators would otherwise pile up; another layout
    gets new ones."""
    run_distributed(_groups_across_reinitialisation, 2, str(tmp_path))
    assert [open(tmp_path / f"rank{r}").read() for r in range(2)] == ["True True"] * 2


RANK_WAITS = """
import signal, sys, time
from megatron_miniplm import parallel
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
parallel.initialize()
print("started", flush=True)
deadline = time.time() + 90
while not got and time.time() < deadline:
    time.sleep(0.1)
print("SIGTERM" if got else "no signal", flush=True)
"""


def test_ranks_are_stopped_when_torchrun_is_killed(tmp_path):
    """torchrun starts each rank in a session of its own: SIGKILL to it (or to its process
    group) must not leave the ranks running without it. They get SIGTERM, as on preemption."""
    import signal
    import subprocess
    import sys
    import time

    from distributed import free_port

    script = tmp_path / "rank.py"
    script.write_text(RANK_WAITS)
    log = tmp_path / "log"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with open(log, "w") as out:
        agent = subprocess.Popen([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), str(script)],
                                 stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while open(log).read().count("started") < 2:
        assert time.time() < deadline and agent.poll() is None, open(log).read()[-2000:]
        time.sleep(0.1)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    killed = time.time()
    while open(log).read().count("SIGTERM") + open(log).read().count("no signal") < 2:
        assert time.time() < deadline + 60, open(log).read()[-2000:]
        time.sleep(0.1)
    assert open(log).read().count("SIGTERM") == 2 and time.time() - killed < 60
