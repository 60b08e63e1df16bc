"""bf16: auto is decided once per work directory: a measurement that flips between runs
(a timing near its threshold) must not change the model stages' fingerprints."""

from dataclasses import replace

from pipeline_helpers import tiny_config, write_config


def test_auto_bf16_is_decided_once_per_work_directory(setting, tmp_path, monkeypatch):
    from megatron_miniplm import platform
    from megatron_miniplm.pipeline import config, runner, stages

    answers = iter([(True, "bf16 GEMMs measured 1.6x fp32's speed"), (False, "measured 1.4x"), (False, "1.4x")])
    monkeypatch.setattr(platform, "bf16_is_fast", lambda: next(answers))
    cfg, _ = config.load(write_config(tmp_path / "c.yaml", tiny_config(setting, tmp_path / "work")), environ={})
    assert cfg.bf16 == "auto"
    first = stages.Graph(cfg)
    runner.Runner(first, log=lambda *a: None).run([])  # what a run does before its first stage
    again = stages.Graph(cfg)  # the measurement now says fp32
    assert again.bf16 is True and "1.6x" in again.bf16_reason and "first decided" in again.bf16_reason
    assert [s.fingerprint for s in again.stages] == [s.fingerprint for s in first.stages]  # nothing reruns
    # given explicitly, the setting wins over the record
    assert stages.Graph(replace(cfg, bf16=False)).bf16 is False
