"""The latest-checkpoint marker: Megatron-LM's iteration number or a directory name."""
import pytest

from megatron_miniplm.dist_checkpoint import LATEST_FILE, latest_checkpoint, resolve_checkpoint_dir
from megatron_miniplm.training.checkpoint import resume_dir


@pytest.mark.parametrize("text,name,resumable", [
    ("100\n", "iter_0000100", True),         # what Megatron-LM and our trainer write
    ("iter_0000042", "iter_0000042", True),   # a directory name (earlier versions of ours)
    ("iter_42", "iter_42", True),             # read as written, not re-derived
    ("release", "release", False),            # a converted model, not a run to resume
])
def test_marker_names_a_directory(tmp_path, text, name, resumable):
    (tmp_path / LATEST_FILE).write_text(text)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / name)
    assert resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / name)
    if resumable:
        assert resume_dir(str(tmp_path)) == str(tmp_path / name)
    else:
        with pytest.raises(ValueError, match="not a training iteration to resume"):
            resume_dir(str(tmp_path))


def test_no_marker(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    assert resume_dir(str(tmp_path)) is None
    assert resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path)  # a checkpoint directory itself
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint_dir(str(tmp_path / "missing"))


# ---- Transformer Engine's _extra_state: local <-> TE checkpoints ----------------------------

def _model(extra_state: bool, tie: bool = True, seed: int = 1):
    """A GPTModel on the local spec; with ``extra_state`` its core attention carries an
    ``_extra_state`` entry as Transformer Engine's attention does (FP8 metadata), which
    is the one way the key sets of TE and local checkpoints differ."""
    import copy
    import dataclasses

    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_miniplm import parallel
    from presets import get_preset
    from megatron_miniplm.models.gpt import PLAIN_LOCAL, layer_spec, transformer_config

    class AttentionWithExtraState(DotProductAttention):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets)

        def get_extra_state(self):
            return torch.tensor([3, 1, 4], dtype=torch.uint8)

        def set_extra_state(self, state):
            self.received = state

    parallel.initialize(parallel.ParallelConfig(seed=seed))
    config = dataclasses.replace(get_preset("tiny"), tie_embeddings=tie)
    spec = copy.deepcopy(layer_spec(PLAIN_LOCAL))
    if extra_state:
        spec.submodules.self_attention.submodules.core_attention = AttentionWithExtraState
    return GPTModel(config=transformer_config(config), transformer_layer_spec=spec,
                    vocab_size=config.padded_vocab_size(), max_sequence_length=64,
                    share_embeddings_and_output_weights=config.tie_embeddings,
                    position_embedding_type="rope"), config


def _tensors(model):
    import torch

    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k}


@pytest.mark.parametrize("saved_with,loaded_into", [(False, True), (True, False), (True, True)])
def test_extra_state_differences_load_both_ways(tmp_path, saved_with, loaded_into):
    import torch

    from megatron_miniplm.dist_checkpoint import load_model, save_model

    from megatron_miniplm.dist_checkpoint import sharded_model_state

    source, config = _model(saved_with, seed=1)
    keys = sharded_model_state([source])["model"]
    assert any(k.endswith("core_attention._extra_state") for k in keys) == saved_with
    save_model([source], str(tmp_path), config)
    target, _ = _model(loaded_into, seed=2)
    assert not torch.equal(_tensors(target)["embedding.word_embeddings.weight"],
                           _tensors(source)["embedding.word_embeddings.weight"])
    load_model([target], str(tmp_path))
    want, got = _tensors(source), _tensors(target)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    if saved_with and loaded_into:  # TE -> TE: the extra state itself comes back
        attention = target.decoder.layers[0].self_attention.core_attention
        assert attention.received.tolist() == [3, 1, 4]


def test_other_missing_entries_are_refused(tmp_path):
    from megatron_miniplm.dist_checkpoint import CheckpointMismatch, load_model, save_model

    source, config = _model(False, tie=True)  # tied: no output_layer.weight saved
    save_model([source], str(tmp_path), config)
    untied, _ = _model(False, tie=False)  # same shapes, an output layer of its own
    with pytest.raises(CheckpointMismatch, match="output_layer.weight"):
        load_model([untied], str(tmp_path))
