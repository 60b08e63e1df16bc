#!/usr/bin/env bash
# Fill .whl/ (gitignored) with the wheels that benchmarks/gpu_check.sh installs on the device
# machine: what this project needs at run time and the device image lacks. Run it HERE
# (it needs the package index); the device machine has no network.
#
#     bash benchmarks/gpu_wheels.sh        # then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], ...)
#
# The image (KINDS.md's package list: Python 3.12, torch 2.11 + CUDA 13, numpy, sentencepiece,
# tokenizers, transformers, pyarrow, pyyaml, tqdm, psutil, pybind11, setuptools, wheel, packaging)
# lacks two of setup.py's install_requires: megatron-core and zstandard. megatron-core's own
# requirements (numpy, packaging, torch) are all in the image; the script prints each wheel's
# Requires-Dist so that a new one shows. The extras (gpu: Transformer Engine; hf, report,
# eval, dev) are not needed by the check.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

# Compiled wheels for CPython 3.12 on x86-64 Linux (pip matches manylinux_2_N exactly: name each N).
BINARY=(megatron-core==0.16.1 zstandard==0.25.0)
# Pure-python wheels (none needed at present).
PURE=()

rm -rf .whl
mkdir -p .whl
grep -qx '.whl/' .gitignore || echo "warning: .whl/ is not in .gitignore" >&2

common=(download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --dest .whl --quiet)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip "${common[@]}" "${platforms[@]}" "${BINARY[@]}"
if ((${#PURE[@]})); then
    "$PY" -m pip "${common[@]}" --platform any "${PURE[@]}"
fi

"$PY" - <<'EOF'
import glob, os, zipfile

wheels = sorted(glob.glob(".whl/*.whl"))
names = [os.path.basename(w).split("-")[0].lower() for w in wheels]
assert len(names) == len(set(names)), f"two versions of one package in .whl/: {names}"
total = 0
for w in wheels:
    size = os.path.getsize(w)
    total += size
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    print(f"{os.path.basename(w):<80} {size / 2**20:6.2f} MiB   requires: {', '.join(reqs) or '-'}")
print(f"total {total / 2**20:.2f} MiB in {len(wheels)} wheels (the device tool carries at most 64 MiB, "
      f"the working tree included)")
if total > 48 * 2**20:
    raise SystemExit("too large: keep .whl/ well under 64 MiB")
EOF
