"""tools/evaluate.py launched on every rank of a job (torchrun, or srun without torchrun):
all ranks score the LM loss together, then the job's rank 0 alone exports the checkpoint,
runs the zero-shot tasks and writes the outputs, as a world of one."""

import json
import os
import shutil

import pytest

from corpus import pattern_instances, write_dataset
from distributed import run_distributed
from test_harness import VOCAB, progression_task, word_tokenizer

SEQ = 16
# What torchrun and srun tell a process of its job: what lm-eval's accelerate must not see,
# or it starts a process group of the job's world and waits for ranks that have left.
JOB_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"}


def _save_checkpoint(directory: str, tokenizer: str) -> None:
    """A random tiny model with its tokenizer beside it, as the trainer saves one."""
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import save_model
    from megatron_miniplm.conversion.tokenizer_files import TOKENIZER_DIR, TOKENIZER_JSON, tokenizer_record
    from megatron_miniplm.models.gpt import build_model
    from presets import get_preset

    parallel.initialize(parallel.ParallelConfig(seed=5))
    config = get_preset("tiny").replace(vocab_size=VOCAB)
    os.makedirs(directory)
    save_model([build_model(config)], directory, config)
    os.makedirs(os.path.join(directory, TOKENIZER_DIR))
    shutil.copy(tokenizer, os.path.join(directory, TOKENIZER_DIR, TOKENIZER_JSON))
    record = tokenizer_record(os.path.join(directory, TOKENIZER_DIR, TOKENIZER_JSON), "<|endoftext|>")
    with open(os.path.join(directory, "checkpoint_info.json"), "w") as f:
        json.dump({"format_version": 1, "tokenizer": record}, f)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A checkpoint, a test set in its tokenization and a local lm-eval task."""
    from megatron_miniplm.conversion.tokenizer_files import tokenizer_record

    root = tmp_path_factory.mktemp("job")
    tokenizer = word_tokenizer(str(root / "tokenizer.json"))
    ckpt = str(root / "ckpt")
    run_distributed(_save_checkpoint, 1, ckpt, tokenizer)
    record = tokenizer_record(tokenizer, "<|endoftext|>")
    data = write_dataset(str(root / "test"), pattern_instances(16, VOCAB, SEQ + 1, seed=3), VOCAB, SEQ,
                         tokenizer={**record, "name": "words", "pad_id": record["eod_id"]})
    (root / "tasks").mkdir()
    return {"ckpt": ckpt, "data": data, "tasks": progression_task(str(root / "tasks"), n=8)}


def _as_srun_task() -> None:
    """This process's place in the job as srun (without torchrun) gives it: Slurm's variables only."""
    rank, world = os.environ.pop("RANK"), os.environ.pop("WORLD_SIZE")
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key)
    os.environ.update(SLURM_PROCID=rank, SLURM_STEP_NUM_TASKS=world, SLURM_LOCALID=rank)


def _fake_tasks(hf_dir: str, tasks, **_) -> dict:
    return {t: {"acc": 0.5} for t in tasks}


def _evaluate_on_rank(launcher: str, cfg_kwargs: dict, record_dir: str) -> None:
    """evaluate() on one rank of the job, with the export, the tasks and the writes recorded
    per rank (each calls through to the real one)."""
    from megatron_miniplm.evaluation import harness, run
    from megatron_miniplm.evaluation.config import EvalConfig

    if launcher == "srun":
        _as_srun_task()
    rank = os.environ.get("RANK") or os.environ["SLURM_PROCID"]

    def record(event: str, **details) -> None:
        with open(os.path.join(record_dir, f"{event}-rank{rank}.json"), "w") as f:
            json.dump(details, f)

    def spy(event, real, check=None):
        def wrapper(*args, **kwargs):
            record(event, job_variables=sorted(JOB_VARIABLES & set(os.environ)))
            if rank != "0":  # fail at once rather than join a world its other ranks have left
                raise AssertionError(f"rank {rank} called {event}")
            if check:
                check(*args)
            return real(*args, **kwargs)
        return wrapper

    def exported(hf_dir, tasks):
        assert not JOB_VARIABLES & set(os.environ), sorted(JOB_VARIABLES & set(os.environ))
        assert os.path.isfile(os.path.join(hf_dir, "model.safetensors"))

    harness.export_to_hf = spy("export", harness.export_to_hf)
    # lm-eval itself runs in one of the launchers' cases (its imports take seconds)
    harness.run_tasks = spy("tasks", harness.run_tasks if launcher == "torchrun" else _fake_tasks, check=exported)
    run.write_outputs = spy("write", run.write_outputs)
    results = run.evaluate(EvalConfig(**cfg_kwargs))
    record("returned", results=bool(results))


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_only_the_jobs_rank0_exports_runs_the_tasks_and_writes(job, tmp_path, launcher):
    records = tmp_path / "records"
    records.mkdir()
    out_json = tmp_path / "eval.json"
    cfg = dict(load=[job["ckpt"]], name=["student"], data_path=job["data"], output_dir=str(tmp_path / "scores"),
               micro_batch_size=4, bootstrap_samples=50, json=str(out_json), tasks="local_progressions",
               include_path=job["tasks"], limit=4, batch_size=4)
    run_distributed(_evaluate_on_rank, 2, launcher, cfg, str(records))
    assert sorted(os.listdir(records)) == ["export-rank0.json", "returned-rank0.json", "returned-rank1.json",
                                           "tasks-rank0.json", "write-rank0.json"]
    assert json.load(open(records / "returned-rank0.json")) == {"results": True}
    assert json.load(open(records / "returned-rank1.json")) == {"results": False}
    student = json.load(open(out_json))["models"]["student"]
    assert student["instances"] == 16 and student["lm_loss"] > 0  # the LM loss of both ranks' scoring
    assert 0 <= student["tasks"]["local_progressions"]["acc"] <= 1


def _srun_task(rank: int) -> dict:
    return {"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(rank),
            "SLURM_STEP_NODELIST": "n[1-2]"}


@pytest.mark.parametrize("environ, rank0", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, False),
    ({"RANK": "0", "WORLD_SIZE": "2"}, True),
    (_srun_task(1), False),
    (_srun_task(0), True),
    ({}, True),
], ids=["torchrun-rank1", "torchrun-rank0", "srun-rank1", "srun-rank0", "one-process"])
def test_tasks_run_and_results_are_written_on_the_launchers_rank0_only(tmp_path, monkeypatch, environ, rank0):
    """Tasks alone (no collective LM loss; the export and lm-eval stubbed): the tasks, the JSON
    and the report with its curves on the launcher's rank 0, nothing on another rank."""
    from megatron_miniplm.evaluation import harness
    from megatron_miniplm.evaluation.config import EvalConfig
    from megatron_miniplm.evaluation.run import evaluate

    for key in JOB_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    ran = []
    monkeypatch.setattr(harness, "evaluate_checkpoint", lambda ckpt, tasks, **_: ran.append(ckpt) or {"t": {}})
    cfg = EvalConfig(load=[str(tmp_path / "ckpt")], tasks="t", json=str(tmp_path / "eval.json"),
                     report_dir=str(tmp_path / "report"), metrics_file=[str(tmp_path / "m.jsonl")])
    lines = [{"iteration": 1, "consumed_tokens": 8, "consumed_flops": 9.0}, {"iteration": 1, "valid_loss": 2.0}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = evaluate(cfg)
    assert bool(results) is rank0 and bool(ran) is rank0
    assert (tmp_path / "eval.json").exists() is rank0 and (tmp_path / "report").exists() is rank0


@pytest.mark.parametrize("environ", [{"RANK": "0", "WORLD_SIZE": "2"}, _srun_task(0)], ids=["torchrun", "srun"])
def test_conversion_refuses_a_job_but_runs_outside_it(monkeypatch, environ):
    """tools/convert_checkpoint.py under torchrun or srun is refused; a process that has left
    its job converts as a world of one, and gets its job's variables back after."""
    from megatron_miniplm import parallel
    from megatron_miniplm.conversion.errors import ConversionError
    from megatron_miniplm.conversion.session import outside_job, single_process

    parallel.destroy()
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConversionError, match="one process"):
        with single_process():
            pass
    with outside_job(), single_process():
        assert parallel.info().world_size == 1
    assert all(os.environ[k] == v for k, v in environ.items())
