"""What a tool's process spends importing megatron-core, with megatron-core's fused functions
wrapped by torch.compile at import (as megatron-core does) and compiled at their first call
(as megatron_miniplm has them: megatron_compat.compile_fusions_at_first_call).

Each round starts two fresh interpreters, one per way, in alternating order, and times
``import megatron.core.models.gpt`` after torch is imported (torch's own import is the same
for both). Prints the median of each and their ratio.

    python benchmarks/bench_import.py [--rounds 5]
"""

import argparse
import statistics
import subprocess
import sys

TIMED = """
import sys, time
import torch
{before}
start = time.perf_counter()
import megatron.core.models.gpt
print(time.perf_counter() - start, "torch._inductor.compile_fx" in sys.modules)
"""
WAYS = {"wrapped at import (megatron-core)": "",
        "compiled at first call (megatron_miniplm)": "import megatron_miniplm"}


def once(before: str) -> tuple[float, bool]:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", TIMED.format(before=before)], capture_output=True,
                         text=True, check=True)
    seconds, inductor = out.stdout.split()
    return float(seconds), inductor == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = {way: [] for way in WAYS}
    inductor = {}
    for r in range(args.rounds):
        for way in (list(WAYS) if r % 2 == 0 else list(WAYS)[::-1]):
            seconds, inductor[way] = once(WAYS[way])
            times[way].append(seconds)
    for way, values in times.items():
        print(f"{way:45s} median {statistics.median(values):6.2f} s  "
              f"(rounds: {', '.join(f'{v:.2f}' for v in values)}; TorchInductor imported: {inductor[way]})")
    base, ours = (statistics.median(times[w]) for w in WAYS)
    print(f"import megatron.core.models.gpt: {base / ours:.2f}x faster compiled at first call")


if __name__ == "__main__":
    main()
