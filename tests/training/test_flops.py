"""FLOPs per token as Megatron-LM counts them, against figures worked out by hand."""

import pytest

from megatron_miniplm.models.config import get_preset
from megatron_miniplm.training.flops import peak_flops_of, training_flops_per_token


def test_qwen_200m_at_seq_1024():
    # h 768, 12 heads of 64 (q = 768), no GQA (kv = 768), ffn 2112, 12 layers, vocab 151,936 (a multiple of 128)
    # attention per layer: 768 * (768 + 2 * 768) + 768 * 1024 (causal: half of 2 * q * s) + 768 * 768 = 3,145,728
    # SwiGLU MLP per layer: 3 * 768 * 2112 = 4,866,048; output layer: 768 * 151,936 = 116,686,848
    # 6 * (12 * (3,145,728 + 4,866,048) + 116,686,848) = 1,276,968,960
    assert training_flops_per_token(get_preset("qwen-200M"), 1024) == 1_276_968_960


def test_smollm2_135m_llama_gqa_at_seq_2048():
    # h 576, 9 heads of 64 (q = 576), 3 key/value groups (kv = 192), ffn 1536, 30 layers, vocab 49,152
    # attention: 576 * (576 + 384) + 576 * 2048 + 576 * 576 = 2,064,384; MLP: 3 * 576 * 1536 = 2,654,208
    # output: 576 * 49,152 = 28,311,552; 6 * (30 * 4,718,592 + 28,311,552) = 1,019,215,872
    assert training_flops_per_token(get_preset("smollm2-135M"), 2048) == 1_019_215_872


def test_the_output_layer_counts_the_padded_vocabulary():
    small = get_preset("qwen-104M").replace(vocab_size=1000)  # padded to 1024 (x 128)
    exact = get_preset("qwen-104M").replace(vocab_size=1024)
    assert training_flops_per_token(small, 512) == training_flops_per_token(exact, 512)
    # TP 3 does not divide 128: the padding multiple becomes 384, 1000 -> 1152
    assert (training_flops_per_token(small, 512, 3) - training_flops_per_token(small, 512)
            == 6 * 512 * (1152 - 1024))


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("Quadro P1000", None),
])
def test_peak_by_device_name(name, peak):
    assert peak_flops_of(name) == peak


def test_flops_matched_kd_steps_by_hand():
    """The Vanilla KD student's steps at a plain student's training FLOPs, counted by hand from
    the presets' shapes (multiply-adds per token at sequence length 1024; training is 6 FLOPs per
    multiply-add, the teacher's forward 2)."""
    from megatron_miniplm.training.flops import flops_matched_kd_iterations

    def macs(h, ffn, layers, heads, head_dim, kv_heads, vocab, s=1024):
        q, kv = heads * head_dim, kv_heads * head_dim
        return layers * (h * (q + 2 * kv) + q * s + q * h + 3 * h * ffn) + h * vocab

    teacher = macs(2048, 5504, 24, 16, 128, 16, 151936)  # Qwen1.5-1.8B
    for preset, student in (("qwen-200M", macs(768, 2112, 12, 12, 64, 12, 151936)),
                            ("qwen-500M", macs(1024, 2816, 24, 16, 64, 16, 151936))):
        want = round(100_000 * 6 * student / (6 * student + 2 * teacher))
        got = flops_matched_kd_iterations(100_000, get_preset(preset), get_preset("qwen1.5-1.8B"), 1024)
        assert got == want, preset
    assert flops_matched_kd_iterations(100_000, get_preset("qwen-200M"), get_preset("qwen1.5-1.8B"), 1024) == 28835
    assert flops_matched_kd_iterations(1, get_preset("qwen-200M"), get_preset("qwen1.5-1.8B"), 1024) == 1
