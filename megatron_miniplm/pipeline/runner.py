"""Running the stages: skip what is done, rerun what changed, one launcher per node.

Each finished stage leaves a completion record (``WORK_DIR/records/STAGE.json``) with
its fingerprint, its settings and its output directory. A stage is skipped when its
record's fingerprint is the one the config gives now; otherwise it runs (a stage
killed half-way has no record and reruns, resuming where its tool can), and every
stage after it that reads it runs too, because their fingerprints include it. New
outputs go to a new directory; the old one is removed only once the new record is
written.

The record also lists every file of the stage's output directory with its size and
CRC-32 (``artifacts``): reading them back costs one sequential read, little next to
the stage that wrote them. Each launch compares the sizes of every finished stage's
files, and the CRC-32s of those a running stage is about to read, so that a file
truncated, removed or altered after it was made is not used: its stage is made
again from scratch, and so is every stage that reads it (they were made from the
damaged bytes' predecessors, which the new ones need not equal).

Several nodes (one launcher per node, NODE_RANK 0..NNODES-1): single-process stages
run on node 0 while the others wait for their records; distributed stages run on
every node under torchrun. The work directory must be shared: each node writes a
token at start and waits to see everyone's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import zlib
from dataclasses import dataclass
from typing import Optional

from megatron_miniplm.atomic_io import write_json_atomic, write_text_atomic
from megatron_miniplm.locking import LOCK_SUFFIX
from megatron_miniplm.pipeline.config import to_yaml
from megatron_miniplm.pipeline.lock import LaunchLock
from megatron_miniplm.pipeline.status import StatusFile
from megatron_miniplm.pipeline.stages import DISTRIBUTED, SINGLE, Graph, Stage, record_bf16

STOPPED_EARLY = 3  # exit code: a stage was stopped by SIGTERM after saving; rerun to resume


class StageFailed(RuntimeError):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class Decision:
    stage: Stage
    run: bool
    reason: str
    fresh: bool = False  # run from scratch: its finished outputs (or those it reads) are damaged


def file_crc32(path: str, chunk: int = 8 << 20) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def artifacts(out: str) -> dict:
    """relative path -> [size, CRC-32] of every file under a stage's output directory."""
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            if name.endswith(LOCK_SUFFIX):  # who wrote it last, not data
                continue
            path = os.path.join(folder, name)
            found[os.path.relpath(path, out)] = [os.path.getsize(path), file_crc32(path)]
    return dict(sorted(found.items()))


def damage(out: str, recorded: dict, *, contents: bool) -> Optional[str]:
    """How a finished stage's outputs differ from its record: the first file gone or of another
    size, or (``contents``: reading every file) of other bytes; None when they match."""
    for rel, (size, crc) in recorded.items():
        path = os.path.join(out, rel)
        try:
            now = os.path.getsize(path)
        except OSError:
            return f"{path} is missing"
        if now != size:
            return f"{path} has {now:,} bytes, {size:,} when it was made"
        if contents and (now_crc := file_crc32(path)) != crc:
            return f"{path} changed since it was made (CRC-32 {now_crc}, {crc} when it was made)"
    return None


def _record_path(work_dir: str, name: str) -> str:
    return os.path.join(work_dir, "records", f"{name}.json")


def read_record(work_dir: str, name: str) -> Optional[dict]:
    try:
        with open(_record_path(work_dir, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Settings that differ between a record and now, as 'key old -> new' (a section's setting
    at its default is not recorded: 'default')."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            shown = [repr(v) if k in d else "default" for k, v, d in ((key, a, old), (key, b, new))]
            out.append(f"{prefix}{key} {shown[0]} -> {shown[1]}")
    return out


def plan(graph: Graph) -> list[Decision]:
    """What a run would do now, and why, from the records and the outputs they list (nothing
    is written). A finished stage whose files are damaged runs again from scratch; the files
    of the finished stages that a running stage reads are checked byte for byte first."""
    work_dir = os.path.abspath(graph.cfg.work_dir)
    damaged: dict = {}  # stage -> how its files differ from its record
    checked: set = set()  # stages whose files were read byte for byte
    while True:
        decisions = _decide(graph, work_dir, damaged)
        found = _damaged_inputs(graph, work_dir, decisions, checked)
        if not found:
            return decisions
        damaged.update(found)


def _decide(graph: Graph, work_dir: str, damaged: dict) -> list[Decision]:
    """One pass over the stages, given the stages found damaged so far (name -> how)."""
    decisions, reruns, remade = [], set(), set()
    for stage in graph.stages:
        record = read_record(work_dir, stage.name)
        upstream = [d for d in stage.deps if d in reruns]
        if record is not None and record.get("fingerprint") == stage.fingerprint:
            why = damaged.get(stage.name) or damage(graph.out_dir(stage), record.get("artifacts", {}), contents=False)
            again = [d for d in stage.deps if d in remade]
            if not why and not again:
                decisions.append(Decision(stage, False, f"done ({stage.fingerprint})"))
                continue
            reruns.add(stage.name)
            remade.add(stage.name)
            reason = (f"its output is damaged: {why}; made again" if why else
                      f"reads {', '.join(again)}, which {'is' if len(again) == 1 else 'are'} made again")
            decisions.append(Decision(stage, True, reason, fresh=True))
            continue
        reruns.add(stage.name)
        decisions.append(Decision(stage, True, _why_run(graph, stage, record, upstream)))
    return decisions


def _why_run(graph: Graph, stage: Stage, record: Optional[dict], upstream: list[str]) -> str:
    if record is None:
        return "not done yet" if not os.path.isdir(graph.out_dir(stage)) else "started, not finished: resumes"
    if upstream:
        return f"reads {', '.join(upstream)}, which {'runs' if len(upstream) == 1 else 'run'} again"
    changed = _changes(record.get("settings", {}), stage.settings)
    if record.get("inputs") != stage.inputs:
        changed.append("its input files changed")
    return "made with other settings: " + "; ".join(changed or ["inputs of earlier stages changed"])


def _damaged_inputs(graph: Graph, work_dir: str, decisions: list[Decision], checked: set) -> dict:
    """The finished stages read by a stage that runs whose files differ from their record,
    byte for byte (name -> how); ``checked``: the stages read so far, each read once."""
    skipped = {d.stage.name: d.stage for d in decisions if not d.run}
    found = {}
    for decision in decisions:
        for dep in decision.stage.deps if decision.run else ():
            if dep in skipped and dep not in checked:
                checked.add(dep)
                record = read_record(work_dir, dep) or {}
                why = damage(graph.out_dir(skipped[dep]), record.get("artifacts", {}), contents=True)
                if why:
                    found[dep] = why
    return found


def describe(graph: Graph, decisions: list[Decision], sources: dict) -> str:
    lines = ["# resolved pipeline config", to_yaml(graph.cfg).rstrip(),
             f"# bf16 -> {str(graph.bf16).lower()} ({graph.bf16_reason})"]
    if sources:
        lines += ["", "# set by: " + ", ".join(f"{k} ({v})" for k, v in sorted(sources.items()))]
    lines += ["", "# stages"]
    for i, d in enumerate(decisions, 1):
        lines.append(f"{i:>2}. {d.stage.name:<20} {'RUN ' if d.run else 'skip'}  {d.reason}")
    return "\n".join(lines)


class Runner:
    def __init__(self, graph: Graph, *, log=print):
        self.graph, self.cfg, self.log = graph, graph.cfg, log
        self.work_dir = os.path.abspath(self.cfg.work_dir)
        self.par = self.cfg.parallel
        self.node0 = self.par.node_rank == 0

    # ---- the run --------------------------------------------------------------------------
    def run(self, decisions: list[Decision]) -> None:
        os.makedirs(os.path.join(self.work_dir, "records"), exist_ok=True)
        # one launch per work directory: the first node's launcher holds the lock (the other
        # nodes' launchers belong to the same launch)
        self.lock = LaunchLock(self.work_dir).acquire(warn=self.log) if self.node0 else None
        self.status = StatusFile(self.work_dir, [d.stage.name for d in decisions]) if self.node0 else None
        try:
            self._run_stages(decisions)
        finally:
            if self.lock:
                self.lock.release()

    def _run_stages(self, decisions: list[Decision]) -> None:
        if self.par.nnodes > 1 and self.par.launcher == "torchrun":
            check_shared_work_dir(self.work_dir, self.par.nnodes, self.par.node_rank, plan=plan_of(self.graph))
        if self.node0:
            write_text_atomic(os.path.join(self.work_dir, "pipeline_config.yaml"), to_yaml(self.cfg))
            record_bf16(self.graph)
        dirs = {}
        for i, decision in enumerate(decisions, 1):
            stage = decision.stage
            dirs[stage.name] = self.graph.out_dir(stage)
            self.log(f"\n=== stage {i}/{len(decisions)}: {stage.name} — "
                     f"{'run: ' + decision.reason if decision.run else decision.reason}")
            if decision.fresh and self.node0:
                self._discard(stage, dirs[stage.name])
            if stage.kind == SINGLE and not self.node0:
                self._wait_for(stage)
            elif decision.run and not self._done(stage):
                self._run(stage, dirs)
            elif self.status:
                self.status.set(stage.name, "done", output=dirs[stage.name], seconds=0.0, skipped=True)

    def _done(self, stage: Stage) -> bool:
        """A record of this fingerprint appeared since the plan (another launcher ran it)."""
        record = read_record(self.work_dir, stage.name)
        return record is not None and record.get("fingerprint") == stage.fingerprint

    def _discard(self, stage: Stage, out: str) -> None:
        """A stage made again from scratch: its record and outputs go before it starts."""
        path = _record_path(self.work_dir, stage.name)
        if os.path.exists(path):
            os.remove(path)
        shutil.rmtree(out, ignore_errors=True)

    def _run(self, stage: Stage, dirs: dict) -> None:
        out = dirs[stage.name]
        if stage.kind == SINGLE and os.path.isdir(out):
            shutil.rmtree(out)  # a killed single-process stage starts over (its tools write atomically)
        os.makedirs(out, exist_ok=True)
        started = time.time()
        if self.status:
            self.status.set(stage.name, "running", output=out)
        try:
            for argv in stage.commands(out, dirs):
                argv = argv() if callable(argv) else argv
                self._execute(stage, argv)
            missing = stage.missing(out, dirs)
            if missing:
                raise StageFailed(f"stage {stage.name} stopped before completing ({missing}): it was asked to "
                                  f"stop (SIGTERM: preemption or a time limit) and saved its progress; run the "
                                  f"same command again to resume", STOPPED_EARLY)
        except StageFailed as e:
            if self.status:
                self.status.set(stage.name, "stopped" if e.code == STOPPED_EARLY else "failed", error=str(e))
            if stage.kind == SINGLE:
                write_json_atomic(_record_path(self.work_dir, stage.name) + ".failed",
                                  {"fingerprint": stage.fingerprint, "error": str(e)})
            raise
        if self.node0:
            self._record(stage, out, time.time() - started)
            self.status.set(stage.name, "done", output=out)
        self.log(f"--- {stage.name}: done in {time.time() - started:.0f} s")

    def _execute(self, stage: Stage, argv: list[str]) -> None:
        launch = self._launcher(argv) if stage.kind == DISTRIBUTED else argv
        self.log("    $ " + " ".join(launch))
        held = (self.lock.fd,) if self.lock and self.lock.fd is not None else ()
        code = subprocess.call(launch, pass_fds=held)  # the tools hold the lock while they run
        if code != 0:
            raise StageFailed(f"stage {stage.name} failed (exit {code}): {' '.join(argv[:2])}", code)

    def _launcher(self, argv: list[str]) -> list[str]:
        par = self.par
        python, script, *args = argv
        if par.launcher == "srun":
            # srun does not take the job's --cpus-per-task from sbatch (Slurm >= 22.05): without
            # it each task is bound to one core, and data loading and the host side starve.
            cpus = os.environ.get("SLURM_CPUS_PER_TASK")
            return ["srun", "--nodes", str(par.nnodes), "--ntasks-per-node", str(par.nproc_per_node),
                    *([f"--cpus-per-task={cpus}"] if cpus else []), "--kill-on-bad-exit=1", python, script, *args]
        if par.nnodes == 1 and par.nproc_per_node == 1:
            return argv
        torchrun = os.path.join(os.path.dirname(python), "torchrun")
        return [torchrun if os.path.exists(torchrun) else "torchrun", "--nnodes", str(par.nnodes),
                "--node-rank", str(par.node_rank), "--nproc-per-node", str(par.nproc_per_node),
                "--master-addr", par.master_addr, "--master-port", str(par.master_port), script, *args]

    def _record(self, stage: Stage, out: str, seconds: float) -> None:
        write_json_atomic(_record_path(self.work_dir, stage.name), {
            "stage": stage.name, "fingerprint": stage.fingerprint, "settings": stage.settings,
            "inputs": stage.inputs, "deps": stage.deps, "output": out, "artifacts": artifacts(out),
            "seconds": round(seconds, 1),
            "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()})
        failed = _record_path(self.work_dir, stage.name) + ".failed"
        if os.path.exists(failed):
            os.remove(failed)
        parent = os.path.dirname(out)
        for old in os.listdir(parent):  # earlier fingerprints' outputs, kept until now
            if old != stage.fingerprint:
                shutil.rmtree(os.path.join(parent, old), ignore_errors=True)

    def _wait_for(self, stage: Stage, poll_s: float = 1.0) -> None:
        """Another node's launcher waits here while node 0 runs a single-process stage."""
        waited, told = 0.0, 0.0
        while not self._done(stage):
            failure = _read_failure(self.work_dir, stage)
            if failure:
                raise StageFailed(f"stage {stage.name} failed on node 0: {failure}")
            if waited - told >= 60:
                self.log(f"    waiting for node 0 ({stage.name}, {waited:.0f} s)")
                told = waited
            time.sleep(poll_s)
            waited += poll_s
        self.log(f"    done by node 0 ({stage.fingerprint})")


def _read_failure(work_dir: str, stage: Stage) -> Optional[str]:
    try:
        with open(_record_path(work_dir, stage.name) + ".failed", encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record.get("error") if record.get("fingerprint") == stage.fingerprint else None


def plan_of(graph: Graph) -> str:
    """What a node is about to run, in one string: its stages' fingerprints and its bf16 choice
    (``bf16: auto`` is decided on each node)."""
    prints = hashlib.sha256(" ".join(f"{s.name}={s.fingerprint}" for s in graph.stages).encode()).hexdigest()[:16]
    return f"stages {prints}, bf16 {getattr(graph, 'bf16', None)}"


def check_shared_work_dir(work_dir: str, nnodes: int, node_rank: int, *, plan: str = "",
                          timeout_s: float = 120.0) -> None:
    """Each node writes a token into the work directory and must see every other node's:
    several nodes need one shared filesystem. Tokens older than this launch (by the
    filesystem's own clock) do not count. Each token carries the node's ``plan``
    (``plan_of``): nodes that would run different stages or precisions are refused
    before any stage starts, instead of meeting in mismatched collectives."""
    tokens = os.path.join(work_dir, "records", "nodes")
    os.makedirs(tokens, exist_ok=True)
    mine = os.path.join(tokens, f"node{node_rank}")
    write_json_atomic(mine, {"host": socket.gethostname(), "pid": os.getpid(), "plan": plan})
    since = os.stat(mine).st_mtime - timeout_s
    deadline = time.time() + timeout_s
    while True:
        seen = [r for r in range(nnodes) if _fresh(os.path.join(tokens, f"node{r}"), since)]
        others = {r: _read_token(os.path.join(tokens, f"node{r}")) for r in seen}
        differ = {r: t for r, t in others.items() if t.get("plan") != plan}
        if len(seen) == nnodes and not differ:
            return
        if time.time() > deadline:  # a token of a recent launch may still be replaced until then
            if len(seen) < nnodes:
                missing = sorted(set(range(nnodes)) - set(seen))
                raise StageFailed(f"work directory {work_dir}: node {node_rank} does not see the tokens of node(s) "
                                  f"{missing} after {timeout_s:.0f} s. Several nodes need one shared filesystem "
                                  f"(Lustre, GPFS, NFS) for the work directory, and every node's launcher started")
            r, token = next(iter(differ.items()))
            raise StageFailed(
                f"node {r} ({token.get('host')}) plans {token.get('plan')!r}, node {node_rank} plans {plan!r}: every "
                f"node needs the same config, environment variables and precision (bf16: auto is decided on "
                f"each node; set bf16: true or false where the nodes differ)")
        time.sleep(0.5)


def _read_token(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # a token of an older version, or one being replaced
        return {}


def _fresh(path: str, since: float) -> bool:
    try:
        return os.stat(path).st_mtime >= since
    except OSError:
        return False


def execute(graph: Graph, decisions: list[Decision], *, log=print) -> int:
    """Run the plan; the exit status (0, a failed stage's, or STOPPED_EARLY)."""
    log("\n".join(f"{d.stage.name:<20} {'RUN ' if d.run else 'skip'}  {d.reason}" for d in decisions))
    try:
        Runner(graph, log=log).run(decisions)
    except StageFailed as e:
        log(f"\n{e}")
        return e.code
    return 0
