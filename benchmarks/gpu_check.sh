#!/usr/bin/env bash
# On the device machine (one H200, its image's python3 with torch 2.11 + CUDA 13; no
# megatron-core, no Transformer Engine, no network): install the wheels carried in .whl/
# (benchmarks/gpu_wheels.sh fills it here), build the C++ extension in place, run
# benchmarks/gpu_check.py. Everything it writes goes under $OUT: install.log, build.log,
# gpu_check.log (the whole output), gpu_check.txt (table), gpu_check.json (figures),
# gpu_check_logs.txt (each tool's command and output tail).
#
#     run(command="bash benchmarks/gpu_check.sh --part correctness", carry=[".whl"], timeout_s=300)
#     run(command="bash benchmarks/gpu_check.sh --part performance", carry=[".whl"], timeout_s=300)
#
# Arguments go to gpu_check.py, e.g. `bash benchmarks/gpu_check.sh --only flash,perf-score`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
t0=$SECONDS

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "no wheels in .whl/: run 'bash benchmarks/gpu_wheels.sh' on the development machine and carry .whl"
    exit 1
fi
echo "python: $(command -v "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
# Into the image's own python3 (the machine is bare each time); where that is not writable,
# into a directory on PYTHONPATH, which the tools' subprocesses inherit.
if ! "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --find-links .whl "${wheels[@]}" \
        >"$OUT/install.log" 2>&1; then
    echo "pip install into $("$PY" -c 'import sys; print(sys.prefix)') failed (see install.log); using --target"
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
        "${wheels[@]}" >>"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
echo "installed: ${wheels[*]#.whl/} ($((SECONDS - t0)) s)"
# The package from this checkout (not installed on the bare machine), for gpu_check.py and
# the tools/*.py it launches, which import megatron_miniplm.cli.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# megatron_miniplm._cpp for this python, next to the sources (-j: one compile per core).
if ! "$PY" setup.py build_ext --inplace -j "$(nproc)" >"$OUT/build.log" 2>&1; then
    echo "building the C++ extension failed:"
    tail -30 "$OUT/build.log"
    exit 1
fi
echo "built $(ls megatron_miniplm/_cpp*.so | grep "$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))')") ($((SECONDS - t0)) s)"

"$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.sh: exit $rc after $((SECONDS - t0)) s"
exit "$rc"
