"""Every config shipped in examples/configs/ passes the pipeline's own checks (--dry-run),
with its placeholder paths pointed at tiny real files: a shipped config is never refused by
its own tool, and the models, sections and budgets it states are the ones that run."""

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from pipeline_helpers import PIPELINE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.listdir(os.path.join(REPO, "examples", "configs")))


@pytest.fixture(scope="module")
def long_teacher(setting, tmp_path_factory):
    """The tiny teacher, with positions for the paper's 1024-token sequences."""
    from conversion.tiny_hf_models import save_hf, variant_config

    root = tmp_path_factory.mktemp("long_teacher")
    config = variant_config("qwen2", num_key_value_heads=2, tie_word_embeddings=False)
    config.max_position_embeddings = 4096
    save_hf(config, str(root / "teacher"))
    return str(root / "teacher")


def _paths(setting, teacher, work_dir) -> list[str]:
    _, train, test = setting
    return [f"work_dir={work_dir}", f"corpus.train=[{train}]", f"corpus.test=[{test}]", f"teacher.load={teacher}"]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_shipped_config_passes_its_own_checks(setting, long_teacher, tmp_path, name):
    path = os.path.join(REPO, "examples", "configs", name)
    out = subprocess.run([sys.executable, PIPELINE, path, *_paths(setting, long_teacher, tmp_path / "work"),
                          "--dry-run"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_the_paper_config_runs_what_it_says(setting, long_teacher, tmp_path):
    """Its sections replace the demo's: no demo model shape, warm-up or batch size leaks in."""
    from megatron_miniplm.pipeline import config

    path = os.path.join(REPO, "examples", "configs", "paper.yaml")
    written = yaml.safe_load(open(path))
    cfg, _ = config.load(path, _paths(setting, long_teacher, tmp_path / "work"), environ={})
    for model in ("reference", "student"):
        assert getattr(cfg, model).model == written[model]["model"]
        assert _as_written(getattr(cfg, model).train, written[model]["train"])
    assert _as_written(cfg.split, written["split"]) and _as_written(cfg.scoring, written["scoring"])


def _as_written(section, given: dict) -> bool:
    """The section holds what the file gave and its own defaults elsewhere (nothing of the demo's)."""
    expected = {**dataclasses.asdict(type(section)()), **given}
    return dataclasses.asdict(section) == expected
