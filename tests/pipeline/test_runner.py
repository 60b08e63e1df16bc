"""The runner on toy stages: records, skips, reruns after a change or a kill, failures,
the shared-directory check."""

import collections
import os
import signal
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import pytest

from megatron_miniplm.pipeline import runner
from megatron_miniplm.pipeline.config import Parallel, PipelineConfig
from megatron_miniplm.pipeline.stages import DISTRIBUTED, SINGLE, Stage

# A toy stage's command: append its name to a log, wait a little, write its output.
STEP = ("import os, sys, time; out, name, log = sys.argv[1:4]; "
        "open(log, 'a').write(name + '\\n'); time.sleep(float(sys.argv[4])); "
        "open(os.path.join(out, 'done'), 'w').write(name)")


def toy_graph(work_dir, log, *, b_setting=1, b_sleep=0.0, nnodes=1, node_rank=0):
    def stage(name, kind, settings, deps, sleep=0.0):
        return Stage(name, kind, settings, deps=deps,
                     commands=lambda out, d, n=name, s=sleep: [[sys.executable, "-c", STEP, out, n, str(log), str(s)]],
                     missing=lambda out, dirs: None if os.path.exists(os.path.join(out, "done")) else "not done")

    stages = [stage("a", SINGLE, {"x": 1}, []), stage("b", DISTRIBUTED, {"x": b_setting}, ["a"], b_sleep),
              stage("c", SINGLE, {"x": 1}, ["b"])]
    prints = {}
    for s in stages:
        prints[s.name] = s.compute_fingerprint(prints)
    cfg = PipelineConfig(work_dir=str(work_dir), bf16=False, parallel=Parallel(nnodes=nnodes, node_rank=node_rank))
    graph = SimpleNamespace(cfg=cfg, stages=stages)
    graph.out_dir = lambda s: os.path.join(str(work_dir), s.name, s.fingerprint)
    return graph


def ran(log):
    return open(log).read().split() if os.path.exists(log) else []


def test_records_skip_and_downstream_reruns(tmp_path):
    log = tmp_path / "log"
    graph = toy_graph(tmp_path / "w", log)
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    assert ran(log) == ["a", "b", "c"]
    assert not any(d.run for d in runner.plan(graph))  # an unchanged rerun skips everything
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    assert ran(log) == ["a", "b", "c"]

    changed = toy_graph(tmp_path / "w", log, b_setting=2)
    decisions = {d.stage.name: d for d in runner.plan(changed)}
    assert not decisions["a"].run
    assert decisions["b"].run and "x 1 -> 2" in decisions["b"].reason
    assert decisions["c"].run and "reads b" in decisions["c"].reason
    old_b = changed.out_dir(graph.stages[1])
    assert runner.execute(changed, runner.plan(changed), log=lambda *a: None) == 0
    assert ran(log) == ["a", "b", "c", "b", "c"]
    assert not os.path.exists(old_b)  # the old output went once the new one was recorded


def _wait_for_lock_release(work_dir, timeout_s: float = 60) -> None:
    """Until the launch lock is free: a killed process closes its files only when the kernel
    has run it to its end, which a loaded machine can delay past its parent's wait."""
    import fcntl

    deadline = time.time() + timeout_s
    with open(os.path.join(work_dir, "launch.lock"), "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, "the killed launch's lock is still held"
                time.sleep(0.05)


def test_a_stage_killed_half_way_reruns(tmp_path):
    log, work = tmp_path / "log", tmp_path / "w"
    code = ("import runpy, sys; t = runpy.run_path(sys.argv[1]); "
            "from megatron_miniplm.pipeline import runner; g = t['toy_graph'](sys.argv[2], sys.argv[3], b_sleep=30); "
            "runner.execute(g, runner.plan(g))")
    proc = subprocess.Popen([sys.executable, "-c", code, os.path.abspath(__file__), str(work), str(log)],
                            start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while ran(log) != ["a", "b"]:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_for_lock_release(work)
    graph = toy_graph(work, log)
    decisions = {d.stage.name: d for d in runner.plan(graph)}
    assert not decisions["a"].run
    assert decisions["b"].run and "started, not finished" in decisions["b"].reason
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    assert ran(log) == ["a", "b", "b", "c"]


def test_damaged_outputs_are_made_again_with_what_reads_them(tmp_path):
    """A finished stage's output truncated: that stage reruns from scratch, and so does every
    stage reading it. Altered bytes of the same size: caught once a stage reading them runs,
    before it does."""
    log, work = tmp_path / "log", tmp_path / "w"
    graph = toy_graph(work, log)
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    b_out = os.path.join(graph.out_dir(graph.stages[1]), "done")
    open(b_out, "w").write("b"[:0])  # truncated: 0 bytes
    decisions = {d.stage.name: d for d in runner.plan(graph)}
    assert not decisions["a"].run
    assert decisions["b"].run and f"{b_out} has 0 bytes, 1 when it was made" in decisions["b"].reason
    assert decisions["c"].run and "reads b, which is made again" in decisions["c"].reason
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    assert ran(log) == ["a", "b", "c", "b", "c"] and open(b_out).read() == "b"

    open(b_out, "w").write("B")  # the same size, other bytes: nothing reads it, nothing runs
    assert not any(d.run for d in runner.plan(graph))
    graph.stages[2].settings["x"] = 2  # now c runs and reads b
    prints = {}
    for s in graph.stages:
        prints[s.name] = s.compute_fingerprint(prints)
    decisions = {d.stage.name: d for d in runner.plan(graph)}
    assert decisions["b"].run and f"{b_out} changed since it was made" in decisions["b"].reason
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    assert ran(log)[-2:] == ["b", "c"] and open(b_out).read() == "b"


def test_a_launch_reads_each_file_once(tmp_path, monkeypatch):
    """The CRC-32 of a file is computed once per check, a damaged one included (its message
    shows the value it was compared with); a launch reads the finished inputs of the stages it
    runs before it runs them, and what a stage makes once, for its record."""
    log, work = tmp_path / "log", tmp_path / "w"
    graph = toy_graph(work, log)
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    a_out, b_out = (os.path.join(graph.out_dir(s), "done") for s in graph.stages[:2])
    open(b_out, "w").write("B")  # the same size, other bytes
    graph.stages[2].settings["x"] = 2  # c runs and reads b
    prints = {}
    for s in graph.stages:
        prints[s.name] = s.compute_fingerprint(prints)
    reads = collections.Counter()
    crc32 = runner.file_crc32
    monkeypatch.setattr(runner, "file_crc32", lambda path, *a: reads.update([path]) or crc32(path, *a))

    decisions = {d.stage.name: d for d in runner.plan(graph)}
    made, now = f"{zlib.crc32(b'b'):08x}", f"{zlib.crc32(b'B'):08x}"
    assert decisions["b"].run
    assert f"{b_out} changed since it was made (CRC-32 {now}, {made} when it was made)" in decisions["b"].reason
    assert reads == {b_out: 1, a_out: 1}  # b, read by c; then a, read by b (made again)
    reads.clear()
    assert runner.execute(graph, list(decisions.values()), log=lambda *a: None) == 0
    assert reads == {b_out: 1, os.path.join(graph.out_dir(graph.stages[2]), "done"): 1}  # the records of b and c


def test_a_stage_that_stops_early_ends_the_run_with_3(tmp_path):
    graph = toy_graph(tmp_path / "w", tmp_path / "log")
    graph.stages[1].missing = lambda out, dirs: "checkpoint at iteration 4, 10 wanted"
    lines = []
    assert runner.execute(graph, runner.plan(graph), log=lines.append) == runner.STOPPED_EARLY
    assert "run the same command again to resume" in lines[-1]
    assert runner.read_record(str(tmp_path / "w"), "b") is None and runner.read_record(str(tmp_path / "w"), "c") is None


def test_other_nodes_wait_for_single_stages_and_see_failures(tmp_path):
    work = tmp_path / "w"
    node1 = toy_graph(work, tmp_path / "log1", nnodes=2, node_rank=1)
    failed = runner._record_path(str(work), "a") + ".failed"
    os.makedirs(os.path.dirname(failed))
    from megatron_miniplm.atomic_io import write_json_atomic

    write_json_atomic(failed, {"fingerprint": node1.stages[0].fingerprint, "error": "stage a failed (exit 1)"})
    with pytest.raises(runner.StageFailed, match="failed on node 0: stage a failed"):
        runner.Runner(node1, log=lambda *a: None)._wait_for(node1.stages[0], poll_s=0.01)


def test_a_work_directory_not_shared_is_refused(tmp_path):
    with pytest.raises(runner.StageFailed, match=r"does not see the tokens of node\(s\) \[1\].*shared filesystem"):
        runner.check_shared_work_dir(str(tmp_path), nnodes=2, node_rank=0, timeout_s=1)
    runner.check_shared_work_dir(str(tmp_path), nnodes=1, node_rank=0, timeout_s=1)


def test_nodes_that_plan_differently_are_refused(tmp_path):
    """Another node's token (this launch's) with other stages or another bf16 choice: refused
    before anything runs; the same plan passes."""
    from megatron_miniplm.atomic_io import write_json_atomic

    nodes = tmp_path / "records" / "nodes"
    os.makedirs(nodes)
    write_json_atomic(str(nodes / "node1"), {"host": "n1", "pid": 1, "plan": "stages 1234, bf16 False"})
    with pytest.raises(runner.StageFailed, match=r"node 1 \(n1\) plans 'stages 1234, bf16 False', node 0 plans "
                                                 r"'stages 1234, bf16 True'.*set bf16: true or false"):
        runner.check_shared_work_dir(str(tmp_path), nnodes=2, node_rank=0, plan="stages 1234, bf16 True",
                                     timeout_s=1)
    write_json_atomic(str(nodes / "node1"), {"host": "n1", "pid": 2, "plan": "stages 1234, bf16 True"})
    runner.check_shared_work_dir(str(tmp_path), nnodes=2, node_rank=0, plan="stages 1234, bf16 True", timeout_s=1)


def test_the_plan_names_the_stages_and_the_precision(tmp_path):
    graph = toy_graph(tmp_path / "w", tmp_path / "log")
    other = toy_graph(tmp_path / "w", tmp_path / "log", b_setting=2)
    assert runner.plan_of(graph) == runner.plan_of(toy_graph(tmp_path / "w", tmp_path / "log"))
    assert runner.plan_of(graph) != runner.plan_of(other)
    graph.bf16 = True
    assert runner.plan_of(graph).endswith("bf16 True")


@pytest.mark.parametrize("cpus", [None, "8"])
def test_srun_steps_get_the_jobs_cpus_per_task(tmp_path, monkeypatch, cpus):
    """srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): the runner passes it on."""
    if cpus is None:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    else:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", cpus)
    graph = toy_graph(tmp_path / "w", tmp_path / "log")
    graph.cfg = PipelineConfig(work_dir=str(tmp_path / "w"),
                               parallel=Parallel(nnodes=2, nproc_per_node=4, launcher="srun"))
    argv = runner.Runner(graph, log=lambda *a: None)._launcher([sys.executable, "tool.py", "--x"])
    assert argv[0] == "srun" and argv[-3:] == [sys.executable, "tool.py", "--x"]
    assert ("--cpus-per-task=8" in argv) == (cpus is not None)


def _launch_in_background(work, log, sleep):
    """A launch of the toy pipeline in another process, stage b sleeping ``sleep`` seconds."""
    code = ("import runpy, sys; t = runpy.run_path(sys.argv[1]); "
            "from megatron_miniplm.pipeline import runner; g = t['toy_graph'](sys.argv[2], sys.argv[3], "
            "b_sleep=float(sys.argv[4])); runner.execute(g, runner.plan(g))")
    proc = subprocess.Popen([sys.executable, "-c", code, os.path.abspath(__file__), str(work), str(log), str(sleep)],
                            start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while ran(log) != ["a", "b"]:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


def test_a_second_launch_on_a_work_dir_in_use_is_refused(tmp_path):
    """While a launch runs (here in stage b), another on its work directory is refused at once,
    naming the holder; once the first has ended, the next one runs."""
    from megatron_miniplm.pipeline.lock import WorkDirInUse

    log, work = tmp_path / "log", tmp_path / "w"
    first = _launch_in_background(work, log, sleep=30)
    graph = toy_graph(work, tmp_path / "log2")
    started = time.time()
    with pytest.raises(WorkDirInUse, match=f"in use by another launch \\(host {os.uname().nodename}, pid {first.pid}, "):
        runner.execute(graph, runner.plan(graph), log=lambda *a: None)
    assert time.time() - started < 5 and ran(tmp_path / "log2") == []
    os.killpg(first.pid, signal.SIGTERM)
    first.wait()
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0


def test_a_killed_launchs_lock_is_taken_over_once_its_tools_are_gone(tmp_path):
    """SIGKILL to the launcher alone: its running tool still holds the directory (it could still
    write); once that is gone too, the next launch takes over without any clean-up."""
    from megatron_miniplm.pipeline.lock import WorkDirInUse

    log, work = tmp_path / "log", tmp_path / "w"
    first = _launch_in_background(work, log, sleep=30)
    os.kill(first.pid, signal.SIGKILL)  # the launcher only: stage b's process runs on
    first.wait()
    graph = toy_graph(work, log)
    with pytest.raises(WorkDirInUse):
        runner.execute(graph, runner.plan(graph), log=lambda *a: None)
    os.killpg(first.pid, signal.SIGKILL)  # now stage b's too
    deadline = time.time() + 10
    while True:
        try:
            assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
            break
        except WorkDirInUse:
            assert time.time() < deadline
            time.sleep(0.1)
    assert ran(log)[-2:] == ["b", "c"]



def test_status_of_a_running_and_of_a_stopped_launch(tmp_path):
    """--status during a run says which stage runs; after the launch is killed, that the stage
    was stopped and a rerun resumes it; after a complete run, every stage done."""
    from megatron_miniplm.pipeline import status

    log, work = tmp_path / "log", tmp_path / "w"
    first = _launch_in_background(work, log, sleep=30)
    graph = toy_graph(work, log)
    text = status.report(graph, lambda stage: {})
    assert ": running;" in text.splitlines()[0]
    states = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()[1:]}
    assert states["a"].startswith("done in") and states["b"].startswith("running since")
    assert states["c"] == "pending"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.time() + 10  # stage b's process, not a child of this one, exits on its own time
    while status.launch_alive(str(work)):
        assert time.time() < deadline
        time.sleep(0.05)
    text = status.report(graph, lambda stage: {})
    assert ": not running;" in text.splitlines()[0]
    assert "b" in text and "stopped (started" in text and "rerun the command to resume" in text
    assert runner.execute(graph, runner.plan(graph), log=lambda *a: None) == 0
    text = status.report(graph, lambda stage: {})
    assert all(" done in " in line for line in text.splitlines()[1:])


def test_training_progress_from_the_metrics_file(tmp_path):
    from megatron_miniplm.pipeline.stages import training_progress

    path = tmp_path / "metrics.jsonl"
    assert training_progress(str(path), 100) is None
    path.write_text('{"iteration": 10, "loss": 7.0}\n{"iteration": 20, "loss": 6.5}\n'
                    '{"iteration": 20, "tokens_per_s": 2100.0, "ms_per_iter": 1500.0}\n{"iteration": 2')
    assert training_progress(str(path), 100) == "iteration 20/100 (20%), 2,100 tokens/s, ~2.0 min left"


def test_metrics_read_from_the_end_in_blocks_equal_a_full_read(tmp_path):
    """Records read back a block at a time, lines straddling blocks included, are the file's
    records in reverse; a half-written last line is skipped."""
    import json
    import random

    from megatron_miniplm.pipeline import stages

    rng = random.Random(0)
    records = [{"iteration": i, "loss": rng.random(), "pad": "x" * rng.randrange(0, 90)} for i in range(500)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 50')
    for block in (7, 64, 1000, 1 << 16):
        assert list(stages._last_records(str(path), block=block)) == records[::-1]
    assert list(stages._last_records(str(tmp_path / "missing.jsonl"))) == []


def test_training_progress_reads_only_the_end_of_a_large_file(tmp_path):
    """Bytes read, as the kernel counts them (/proc/self/io rchar): the end of the file, not
    its 6 MB."""
    from megatron_miniplm.pipeline.stages import training_progress

    def bytes_read() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write('{"iteration": 1, "loss": 7.0}\n' * 200_000)
        f.write('{"iteration": 20, "tokens_per_s": 2100.0, "ms_per_iter": 1500.0}\n{"iteration": 20, "loss": 6.5}\n')
    before = bytes_read()
    assert training_progress(str(path), 100) == "iteration 20/100 (20%), 2,100 tokens/s, ~2.0 min left"
    assert bytes_read() - before < 1 << 18


def test_scoring_progress_from_the_scorers_status(tmp_path):
    from megatron_miniplm.pipeline.stages import scoring_progress
    from megatron_miniplm.scoring import resume

    prefix = str(tmp_path / "scores")
    assert scoring_progress(prefix) is None
    os.makedirs(resume.progress_dir(prefix))
    resume.write_status(resume.progress_dir(prefix), {"instances_done": 1200, "instances": 4000, "replicas": 2,
                                                      "tokens_per_s": 9800.0, "seconds_left": 138.0})
    assert scoring_progress(prefix) == ("instances 1,200/4,000 (30%) of replica 1 of 2, 9,800 tokens/s, "
                                        "~2.3 min left")
