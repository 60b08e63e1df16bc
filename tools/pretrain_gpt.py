#!/usr/bin/env python
"""Pre-train a GPT (the MiniPLM reference LM or a student) with megatron-core.

    torchrun --nproc-per-node N tools/pretrain_gpt.py --model-preset qwen-200M \\
        --data-path BLEND_OR_DATASET [--valid-data-path PREFIX] --seq-length 1024 \\
        --micro-batch-size 8 --global-batch-size 512 --train-iters 100000 --lr 6e-4 \\
        --min-lr 6e-5 --lr-warmup-iters 2000 --bf16 --save ckpt/ --load ckpt/ --save-interval 1000

--data-path takes a dataset prefix, Megatron-style 'W1 P1 W2 P2' blends, or a
sampled blend written by tools/difference_sample.py.

--bf16 means what it means in Megatron-LM, on a GPU and on the CPU alike: bf16
parameters and activations, fp32 main parameters in the optimizer and fp32
gradient reduction. Preemption: --exit-signal-handler saves a checkpoint and
exits 0 on SIGTERM; rerun the same command (with --load = --save) to resume.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", help="a preset of tools/model_info.py (e.g. qwen-104M)")
    g.add_argument("--model-config", help="a model_config.json (e.g. beside a checkpoint)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--vocab-size", type=int, help="default: the data's vocabulary")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--rotary-base", type=float)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True)
    g.add_argument("--valid-data-path", nargs="+")
    g.add_argument("--seq-length", type=int, default=1024)
    g.add_argument("--data-order", choices=["shuffled", "original"], default="shuffled",
                   help="order of training instances within each epoch")
    g.add_argument("--data-cache-path", help="where megatron's GPTDataset keeps its index cache "
                   "(document-mode data; default: a cache/ directory beside the data, which must "
                   "then be writable). Built once by rank 0, read by the others: a shared filesystem")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=32)
    g.add_argument("--train-iters", type=int)
    g.add_argument("--train-tokens", type=int, help="alternative to --train-iters: token budget "
                   "(iterations = tokens / (global batch x seq length))")
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--min-lr", type=float, help="default: lr / 10 (the paper's cosine floor)")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state and fp32 main parameters over data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the gradient reduce-scatter/all-reduce with the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the parameter all-gather with the next forward pass "
                        "(needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=int,
                   help="elements per gradient bucket (default: megatron-core's, with overlap)")
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load the model weights only (the optimizer starts from them)")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state so that it reloads at any TP/PP/DP "
                        "(default: each rank writes its own shard, reloadable at another DP size only)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM: finish the iteration, save a checkpoint, exit 0")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="save and exit 0 once the run has used this many minutes")
    g.add_argument("--exit-interval", type=int,
                   help="save and exit 0 when the iteration is a multiple of this")
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--metrics-file", help="JSON lines, one per iteration (rank 0)")
    g.add_argument("--peak-tflops", type=float, help="device peak for MFU where it is not known")
    return p


def model_config_from_args(args, data_vocab: int):
    from megatron_miniplm.checkpointing import latest_checkpoint, load_model_config
    from megatron_miniplm.models.config import ModelConfig, get_preset

    shape = dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                 ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads)
    if args.model_config:
        config = ModelConfig.load(args.model_config)
    elif args.load and latest_checkpoint(args.load) is not None:
        config = load_model_config(args.load)
    elif args.model_preset:
        config = get_preset(args.model_preset)
    else:
        missing = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is None]
        if missing:
            raise ValueError(f"give --model-preset, --model-config, or all of: {', '.join(missing)}")
        config = ModelConfig(**shape, vocab_size=data_vocab, name="custom")
    changes = {k: v for k, v in shape.items() if v is not None}
    if args.num_query_groups:
        changes["num_query_groups"] = args.num_query_groups
    if args.rotary_base:
        changes["rotary_base"] = args.rotary_base
    if args.untie_embeddings_and_output_weights:
        changes["tie_embeddings"] = False
    if args.vocab_size:
        changes["vocab_size"] = args.vocab_size
    changes["max_position_embeddings"] = max(config.max_position_embeddings, args.seq_length)
    return config.replace(**changes)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_miniplm.training.engine import DDPSettings, OptimizerSettings
    from megatron_miniplm.training.trainer import TrainConfig, Trainer

    try:
        from megatron_miniplm.training.data import InstanceSource, parse_data_path

        data_vocab = max(InstanceSource(p).vocab_size for p in parse_data_path(args.data_path)[0])
        model = model_config_from_args(args, data_vocab)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if (args.train_iters is None) == (args.train_tokens is None):
        parser.error("give exactly one of --train-iters and --train-tokens")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        parser.error("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    ddp = DDPSettings(use_distributed_optimizer=args.use_distributed_optimizer,
                      overlap_grad_reduce=args.overlap_grad_reduce,
                      overlap_param_gather=args.overlap_param_gather, ddp_bucket_size=args.ddp_bucket_size)
    iters = args.train_iters if args.train_iters is not None else max(1, args.train_tokens // (args.global_batch_size * args.seq_length))
    cfg = TrainConfig(
        model=model, data_path=args.data_path, valid_data_path=args.valid_data_path,
        data_cache_path=args.data_cache_path, ddp=ddp, no_load_optim=args.no_load_optim,
        exit_signal_handler=args.exit_signal_handler, exit_duration_in_mins=args.exit_duration_in_mins,
        exit_interval=args.exit_interval,
        dist_ckpt_optim_fully_reshardable=args.dist_ckpt_optim_fully_reshardable,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, train_iters=iters,
        optimizer=OptimizerSettings(
            lr=args.lr, min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps, clip_grad=args.clip_grad, bf16=args.bf16,
        ),
        lr_warmup_iters=args.lr_warmup_iters, lr_decay_iters=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, bf16=args.bf16,
        save=args.save, load=args.load, save_interval=args.save_interval,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=args.log_interval,
        tensorboard_dir=args.tensorboard_dir, metrics_file=args.metrics_file, seed=args.seed,
        shuffle=args.data_order == "shuffled", peak_tflops=args.peak_tflops,
    )
    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train()
    from megatron_miniplm import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
