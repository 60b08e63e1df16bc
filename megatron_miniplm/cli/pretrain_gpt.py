"""Pre-train a GPT (the MiniPLM reference LM or a student) with megatron-core.

    torchrun --nproc-per-node N tools/pretrain_gpt.py --model-preset qwen-200M \\
        --data-path BLEND_OR_DATASET [--valid-data-path PREFIX] --seq-length 1024 \\
        --micro-batch-size 8 --global-batch-size 512 --train-iters 100000 --lr 6e-4 \\
        --min-lr 6e-5 --lr-warmup-iters 2000 --bf16 --save ckpt/ --load ckpt/ --save-interval 1000

--data-path takes a dataset prefix, Megatron-style 'W1 P1 W2 P2' blends, or a
sampled blend written by tools/difference_sample.py.

The loss, where it differs from Megatron-LM's defaults: it is the mean NLL per
counted token of the global batch, whatever the split into micro-batches and
data-parallel ranks (Megatron-LM's --calculate-per-token-loss, always on; its
default averages each micro-batch's own mean, which weighs the tokens of a
micro-batch of short instances more). A prediction counts unless its input token
is EOD, which also pads the variable-length instances to --seq-length
(Megatron-LM's --eod-mask-loss, always on; its default counts every prediction).

--bf16 means what it means in Megatron-LM, on a GPU and on the CPU alike: bf16
parameters and activations, fp32 main parameters in the optimizer and fp32
gradient reduction. Preemption: --exit-signal-handler saves a checkpoint and
exits 0 on SIGTERM; rerun the same command (with --load = --save) to resume. A second
run saving to the same --save directory is refused at once, naming the one running (its
rank 0 holds SAVE.lock; the other ranks of a job are the same run).

Logging, from rank 0: the log line every --log-interval iterations, and the same
numbers to --metrics-file (JSON lines), --tensorboard-dir and Weights & Biases
(--wandb-project; the wandb extra, pip install megatron-miniplm[wandb]; offline
with --wandb-mode offline). A resumed run continues its W&B run.
"""

from __future__ import annotations

import argparse
import sys

from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.models.config import ModelConfig
    from megatron_miniplm.settings import add_arguments
    from megatron_miniplm.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", help="a preset of tools/model_info.py (e.g. qwen-104M)")
    g.add_argument("--model-config", help="a model_config.json (e.g. beside a checkpoint)")
    add_arguments(p, ModelConfig, overrides=True)  # over the preset / config / checkpoint's model
    add_arguments(p, TrainConfig)
    return p


def model_config_from_args(args, data_vocab: int):
    """The model: --model-config, else the checkpoint's under --load, else --model-preset,
    else the shape flags; any model flag given overrides it."""
    from megatron_miniplm.dist_checkpoint import latest_checkpoint, load_model_config
    from megatron_miniplm.models.config import ModelConfig, get_preset
    from megatron_miniplm.settings import given

    changes = given(args, ModelConfig)
    if args.model_config:
        config = ModelConfig.load(args.model_config)
    elif args.load and latest_checkpoint(args.load) is not None:
        config = load_model_config(args.load)
    elif args.model_preset:
        config = get_preset(args.model_preset)
    else:
        shape = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
        missing = [f"--{k.replace('_', '-')}" for k in shape if k not in changes]
        if missing:
            raise ValueError(f"give --model-preset, --model-config, or all of: {', '.join(missing)}")
        config = ModelConfig(**{k: changes.pop(k) for k in shape}, vocab_size=changes.pop("vocab_size", data_vocab))
    changes["max_position_embeddings"] = max(changes.get("max_position_embeddings", config.max_position_embeddings),
                                             args.seq_length)
    return config.replace(**changes)


@tool
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_miniplm.launch import launch_env
    from megatron_miniplm.locking import hold_output

    if args.save:
        hold_output(args.save, f"--save {args.save}", rank=launch_env().rank)
    from megatron_miniplm import parallel
    from megatron_miniplm.settings import from_args

    from megatron_miniplm.training.trainer import Trainer
    from megatron_miniplm.training.config import TrainConfig

    try:
        from megatron_miniplm.training.data import InstanceSource, parse_data_path

        data_vocab = max(InstanceSource(p).vocab_size for p in parse_data_path(args.data_path)[0])
        cfg = from_args(TrainConfig, args, model=model_config_from_args(args, data_vocab))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))  # flags that do not make a run: a usage error, status 2
    trainer = Trainer(cfg)  # a refused run (checkpoint, teacher, layout): status 1
    trainer.train()
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
