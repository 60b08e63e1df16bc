"""The whole pipeline killed at random moments: does every rerun finish with the same artifacts?

    python benchmarks/fault_injection.py --faults 30 --seed 0

Builds the tests' tiny setting (tests/pipeline: a random Qwen2 teacher, a two-domain corpus,
models of a few thousand parameters; the distributed stages on 2 ranks) and runs
tools/pipeline.py on it once uninterrupted. Then, seeded, it injects N faults: each launch is
hit, at a random moment of the stage running first (so that the faults spread over every
stage), by SIGKILL or SIGTERM sent to the whole launch (the launcher and its tools, as a
scheduler ends a job), to the launcher alone (its tools run on, holding the work directory),
or to one rank of the distributed stage running (the tool, for a single-process stage). The
pipeline is launched again until it completes (a launch refused because the killed one's
tools still run is retried a moment later), and its final artifacts are compared with the
uninterrupted run's: every file of every stage's output, byte for byte, except those
``NONDETERMINISTIC`` lists, compared by what they mean. A fault is survived when the launches
after it end as the pipeline says they may (0, or 3: stopped by SIGTERM, rerun to resume),
none hangs, and the run it belongs to ends with the same artifacts. Prints one line per fault
and ``faults survived K/N``; exit status 0 when K = N.
"""
from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(REPO, "tools", "pipeline.py")
SIGNALS = (signal.SIGKILL, signal.SIGTERM)
TARGETS = ("launch", "launcher", "rank")
HANG_S = 1800  # a launch that outlives this hangs
STOPPED_EARLY = 3


def _module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_setting(root: str) -> str:
    """The tests' tiny teacher, corpus and pipeline config under ``root``; the config's path."""
    tiny = _module("tests/conversion/tiny_hf_models.py", "tiny_hf_models")
    corpus = _module("tests/pipeline/conftest.py", "pipeline_conftest")
    helpers = _module("tests/pipeline/pipeline_helpers.py", "pipeline_helpers")
    tiny.save_hf("qwen2", os.path.join(root, "teacher"))
    rng = random.Random(0)
    files = {}
    for name, n in (("train", 240), ("test", 40)):
        files[name] = os.path.join(root, f"{name}.jsonl")
        with open(files[name], "w") as f:
            for i in range(n):
                f.write(json.dumps(corpus._document(rng, "pattern" if i % 2 else "noise")) + "\n")
    setting = (os.path.join(root, "teacher"), files["train"], files["test"])
    cfg = helpers.tiny_config(setting, os.path.join(root, "work"),
                              parallel={"nproc_per_node": 2, "master_port": helpers_port()})
    return helpers.write_config(os.path.join(root, "tiny.yaml"), cfg)


def helpers_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, work: str, log: str) -> subprocess.Popen:
    """tools/pipeline.py on ``work`` in a session of its own (its process group is the launch)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORK_DIR", "NNODES", "NODE_RANK", "NPROC_PER_NODE")}
    status = os.path.join(work, "status.json")
    if os.path.exists(status):  # a killed launch's: its stage would read as running in this one
        os.remove(status)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, PIPELINE, config, f"work_dir={work}"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**env, "OMP_NUM_THREADS": "1"})


def running_stage(work: str) -> str:
    """The stage the launcher says runs, from its status file ('' between stages)."""
    try:
        with open(os.path.join(work, "status.json")) as f:
            stages = json.load(f)["stages"]
    except (OSError, ValueError, KeyError):
        return ""
    return next((name for name, entry in stages.items() if entry.get("state") == "running"), "")


def stage_durations(work: str) -> dict:
    with open(os.path.join(work, "status.json")) as f:
        return {name: entry.get("seconds", 1.0) for name, entry in json.load(f)["stages"].items()}


def descendants(root: int) -> dict:
    """pid -> (parent pid, command line) of every live process below ``root`` (torchrun starts
    its ranks in sessions of their own: they are found by parent, not by session)."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(pid)] = (int(fields[1]), cmdline)
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmd) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (ppid, cmd)
                frontier.append(pid)
    return found


def pick_rank(launcher: int, rng: random.Random) -> int:
    """One rank of the distributed stage running (a child of torchrun), else the tool running."""
    procs = descendants(launcher)
    torchruns = [pid for pid, (_, cmd) in procs.items() if "torchrun" in cmd]
    ranks = sorted(pid for pid, (parent, _) in procs.items() if parent in torchruns)
    tools = sorted(pid for pid, (parent, cmd) in procs.items() if parent == launcher and "tools/" in cmd)
    return rng.choice(ranks or tools or [launcher])


def inject(proc: subprocess.Popen, rng: random.Random) -> tuple[str, str]:
    """Send a random signal to a random part of the launch; (signal name, target)."""
    sig, target = rng.choice(SIGNALS), rng.choice(TARGETS)
    if target == "launch":
        os.killpg(proc.pid, sig)
    elif target == "launcher":
        os.kill(proc.pid, sig)
    else:
        pid = pick_rank(proc.pid, rng)
        target = "rank" if pid != proc.pid else "launcher"
        os.kill(pid, sig)
    return signal.Signals(sig).name, target


def wait_for_stage(proc: subprocess.Popen, work: str, order: list, target: str, deadline: float) -> str:
    """The first stage seen running at or after ``target`` in the plan's ``order`` (None once the
    launch has ended: a stage shorter than the polling interval may pass unseen)."""
    while proc.poll() is None and time.time() < deadline:
        stage = running_stage(work)
        if stage and order.index(stage) >= order.index(target):
            return stage
        time.sleep(0.05)
    return None


def one_launch(config: str, work: str, log: str, rng: random.Random, durations: dict, target=None) -> dict:
    """Launch once, hit with a fault at a random moment of stage ``target`` (None: no fault); what
    happened: exit status, the fault's stage, signal and target, whether it was refused (work
    directory in use) or hung."""
    proc = launch(config, work, log)
    event = {"fault": None}
    if target:
        stage = wait_for_stage(proc, work, list(durations), target, time.time() + HANG_S)
        if stage:
            time.sleep(rng.uniform(0, 1.2 * durations.get(stage, 1.0) + 0.5))
            if proc.poll() is None:
                now = running_stage(work) or f"after {stage}"
                sig, whom = inject(proc, rng)
                event["fault"] = {"stage": now, "signal": sig, "target": whom}
    try:
        event["code"] = proc.wait(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        event["code"], event["hung"] = proc.wait(), True
    with open(log, errors="replace") as f:
        event["refused"] = "in use by another launch" in f.read()
    return event


def next_target(work: str, durations: dict, hits: dict, rng: random.Random) -> str:
    """The stage the next fault aims at: one not done yet, among those hit least so far (so that
    the faults spread over every stage instead of piling on one that keeps restarting)."""
    left = [s for s in durations if not os.path.exists(os.path.join(work, "records", f"{s}.json"))]
    fewest = min(hits.get(s, 0) for s in left) if left else 0
    return rng.choice([s for s in left if hits.get(s, 0) == fewest]) if left else None


def faulted_run(config: str, work: str, logs: str, rng: random.Random, durations: dict, budget: int,
                hits: dict) -> list:
    """Launch on ``work`` until a launch completes, each hit by a fault while ``budget`` lasts
    (``hits``: the faults per stage so far, updated); the faults, each with the launches after
    it and whether they went as allowed."""
    faults, launches, refusals = [], 0, 0
    while True:
        launches += 1
        target = next_target(work, durations, hits, rng) if len(faults) < budget else None
        event = one_launch(config, work, os.path.join(logs, f"launch{launches:03d}.log"), rng, durations, target)
        if event["fault"]:
            faults.append({**event["fault"], "problems": []})
            hits[event["fault"]["stage"]] = hits.get(event["fault"]["stage"], 0) + 1
        elif event.get("hung"):
            (faults[-1]["problems"] if faults else []).append(f"launch {launches} hung")
        elif event["refused"]:
            time.sleep(1.0)  # the killed launcher's tools still run: they hold the work directory
        elif event["code"] not in (0, STOPPED_EARLY) and faults:
            faults[-1]["problems"].append(f"launch {launches} exited {event['code']} (log {launches:03d})")
        if not event["fault"] and event["code"] == 0 and not event["refused"]:
            return faults
        refusals += bool(event["refused"])
        if launches - refusals > 4 * budget + 20:
            (faults[-1]["problems"] if faults else []).append("no launch completed")
            return faults


# Files whose bytes differ between runs by design (by name ending), and what is compared instead.
NONDETERMINISTIC = {
    "metrics.jsonl": "the loss of each iteration (timings, and the lines a resumed run repeats, aside)",
    ".meta.json": "every field but those describing the run rather than its result: when it was made, "
                  "how fast it went, the memory it saw",
    ".metadata": "torch.distributed.checkpoint's index: its tensors' layout and storage (each save draws a "
                 "random save id)",
    ".pt": "the loaded contents, work directory paths read as the reference's (a torch.save zip checksums "
           "the paths it holds)",
}
RUN_FACTS = ("created", "elapsed_s", "tokens_per_s", "rank0_cpu_s", "why")


def _losses(path: str) -> dict:
    out = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                out[record["iteration"]] = record["loss"]
    return out


def _result(path: str, root: str):
    """A meta file's JSON without the run's facts, its work directory's path read as 'WORK'."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RUN_FACTS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value.replace(root, "WORK") if isinstance(value, str) else value

    with open(path) as f:
        return strip(json.load(f))


def _loaded(path: str, root: str):
    """A torch.save file's contents, tensors as lists and paths with 'WORK' for ``root``."""
    import torch

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, torch.Tensor):
            return (str(value.dtype), value.tolist())
        return value.replace(root, "WORK") if isinstance(value, str) else repr(value).replace(root, "WORK")

    return plain(torch.load(path, map_location="cpu", weights_only=False))


def _index(path: str):
    import pickle

    with open(path, "rb") as f:
        meta = pickle.load(f)
    return meta.state_dict_metadata, meta.storage_data, meta.planner_data


def same_meaning(a: str, b: str, a_root: str, b_root: str) -> bool:
    if a.endswith("metrics.jsonl"):
        return _losses(a) == _losses(b)
    if a.endswith(".metadata"):
        return _index(a) == _index(b)
    if a.endswith(".pt"):
        return _loaded(a, a_root) == _loaded(b, b_root)
    return _result(a, a_root) == _result(b, b_root)


def _final(recorded: dict, output: str) -> set:
    """The recorded files that are final artifacts: a checkpoint directory's latest iteration
    only (a run stopped by SIGTERM also keeps the iteration it saved at then)."""
    final = set()
    for rel in recorded:
        parts = rel.split(os.sep)
        if len(parts) > 2 and parts[0] == "ckpt" and parts[1].startswith("iter_"):
            with open(os.path.join(output, "ckpt", "latest_checkpointed_iteration.txt")) as f:
                if int(parts[1][len("iter_"):]) != int(f.read()):
                    continue
        final.add(rel)
    return final


def _same_bytes(a: str, b: str, a_root: str, b_root: str) -> bool:
    """Byte for byte, once the other work directory's path in ``b`` reads as ``a``'s (the
    checkpoints' run configs name their data; both paths have one length)."""
    if filecmp.cmp(a, b, shallow=False):
        return True
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read().replace(b_root.encode(), a_root.encode())


def compare(reference: str, work: str) -> list[str]:
    """The differences between two work directories' final artifacts (each stage's recorded
    output), by stage and relative path."""
    problems = []
    for name in sorted(os.listdir(os.path.join(reference, "records"))):
        if not name.endswith(".json"):
            continue
        want, got = (json.load(open(os.path.join(w, "records", name))) for w in (reference, work))
        if want["fingerprint"] != got["fingerprint"]:
            problems.append(f"{name}: fingerprint {got['fingerprint']}, {want['fingerprint']} uninterrupted")
            continue
        mine, theirs = _final(want["artifacts"], want["output"]), _final(got["artifacts"], got["output"])
        for rel in sorted(mine ^ theirs):
            problems.append(f"{name[:-5]}/{rel}: only in {'the uninterrupted run' if rel in mine else 'this one'}")
        for rel in sorted(mine & theirs):
            a, b = os.path.join(want["output"], rel), os.path.join(got["output"], rel)
            if _same_bytes(a, b, reference, work):
                continue
            if any(rel.endswith(end) for end in NONDETERMINISTIC):
                if not same_meaning(a, b, reference, work):
                    problems.append(f"{name[:-5]}/{rel}: other results")
            else:
                problems.append(f"{name[:-5]}/{rel}: other bytes")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=30, help="how many faults to inject (N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="where the runs go (default: a temporary directory, removed at the end)")
    args = p.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="fault-injection-")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    rng = random.Random(args.seed)
    config = build_setting(root)
    started = time.time()
    reference = os.path.join(root, "run00")  # the uninterrupted run; every run's path has one length
    event = one_launch(config, reference, os.path.join(root, "logs", "uninterrupted.log"), rng, {})
    if event["code"] != 0:
        sys.exit(f"the uninterrupted run failed: see {root}/logs/uninterrupted.log")
    durations = stage_durations(reference)
    print(f"uninterrupted run: {time.time() - started:.0f} s", flush=True)
    faults, runs, hits = [], 0, {}
    while len(faults) < args.faults:
        runs += 1
        work, logs = os.path.join(root, f"run{runs:02d}"), os.path.join(root, "logs", f"run{runs:02d}")
        os.makedirs(logs)
        got = faulted_run(config, work, logs, rng, durations, args.faults - len(faults), hits)
        differences = compare(reference, work)
        for fault in got:
            fault["problems"] += differences
            fault["run"] = runs
            survived = "survived" if not fault["problems"] else "FAILED: " + "; ".join(fault["problems"][:5])
            print(f"fault {len(faults) + 1:>3} (run {runs}): {fault['signal']:<7} to the {fault['target']:<8} "
                  f"in {fault['stage']:<18} {survived}", flush=True)
            faults.append(fault)
    survived = sum(not f["problems"] for f in faults)
    print(f"faults survived {survived}/{len(faults)} ({runs} runs, {time.time() - started:.0f} s in all)")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if survived == len(faults) else 1


if __name__ == "__main__":
    sys.exit(main())
