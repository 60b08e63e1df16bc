"""Decoding one batch: megatron-core's GPTModel with its static KV cache, and the sampling loop.

megatron-core's inference engines and text-generation controller place their buffers on
``torch.cuda.current_device()``, so they do not run on a CPU; their model side does. The
batch's prompts (all of one length: no padding) go through ``GPTModel.forward`` once with a
``StaticInferenceContext``; megatron's attention writes each layer's keys and values into
the context's cache and, from then on, every step feeds one new token per row against it.
Only the last position's logits are computed (the context's ``materialize_only_last_token_logits``),
and gathered over the tensor-parallel ranks, so that every rank samples the same tokens.
The cache is allocated here, on the model's device, before the first forward: megatron's
attention allocates it only when a layer finds none (and then on a CUDA device).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_miniplm.generation.sampling import sample_tokens, stream_uniforms


def allocate_kv_cache(model, context, batch: int, max_length: int) -> None:
    """Each layer's key and value buffers [max_length, batch, kv heads per rank, head dim]."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for layer in model.decoder.layers:
        attention = layer.self_attention
        shape = (max_length, batch, attention.num_query_groups_per_partition)
        context.key_value_memory_dict[attention.layer_number] = (
            torch.empty(*shape, attention.key_hidden_size, dtype=dtype, device=device),
            torch.empty(*shape, attention.val_hidden_size, dtype=dtype, device=device),
        )


def _last_logits(model, tokens: torch.Tensor, start: int, context, vocab: int) -> torch.Tensor:
    """fp32 [rows, vocab]: the logits after ``tokens`` [rows, n], which sit at positions
    start .. start + n - 1, over the real vocabulary (the padding rows of the output layer cut)."""
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
    logits = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(tokens.shape[1])
    return logits[:, -1, :vocab].float()


CHECK_EVERY = 16  # decoding steps between two looks (host syncs) at whether every row has stopped


@torch.no_grad()
def generate_batch(model, prompts: np.ndarray, generators: list, *, max_length: int, eod: int, vocab: int,
                   temperature: float, top_p: float) -> list[np.ndarray]:
    """Each row of ``prompts`` [rows, n] followed by its sampled continuation: up to and
    including the first EOD sampled, else to ``max_length`` tokens in all.

    The tokens stay on the model's device, each fed back as it is sampled; the host looks at
    them every ``CHECK_EVERY`` steps, to stop once every row has sampled EOD, and at the end.
    The steps after a row's EOD change nothing of it: its tokens are cut there, and each
    step's numbers were drawn before the first (``stream_uniforms``)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    rows, n = prompts.shape
    device = next(model.parameters()).device
    context = StaticInferenceContext(rows, max_length)
    allocate_kv_cache(model, context, rows, max_length)
    out = torch.empty(rows, max_length, dtype=torch.int64, device=device)
    out[:, :n] = torch.from_numpy(prompts).to(device)
    uniforms = stream_uniforms(generators, max_length - n).to(device)
    logits = _last_logits(model, out[:, :n], 0, context, vocab)
    for t in range(n, max_length):
        out[:, t] = sample_tokens(logits, uniforms[:, t - n], temperature, top_p)
        if t + 1 == max_length or ((t + 1 - n) % CHECK_EVERY == 0 and _all_stopped(out[:, n:t + 1], eod)):
            break
        logits = _last_logits(model, out[:, t:t + 1], t, context, vocab)
    return _cut_at_eod(out[:, :t + 1].cpu(), n, eod)


def _all_stopped(sampled: torch.Tensor, eod: int) -> bool:
    """Every row has sampled EOD (a host sync)."""
    return bool((sampled == eod).any(dim=1).all())


def _cut_at_eod(tokens: torch.Tensor, n: int, eod: int) -> list[np.ndarray]:
    """Each row up to and including its first EOD after the prompt's ``n`` tokens, else whole."""
    cut = []
    for row in tokens.numpy():
        hits = np.flatnonzero(row[n:] == eod)
        cut.append(row[: n + int(hits[0]) + 1] if len(hits) else row)
    return cut
