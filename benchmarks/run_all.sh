#!/usr/bin/env bash
# Builds and runs every attn benchmark, PyTorch's comparison and the peak-memory runs, then
# writes the plot and prints the target ratios. Results go to benchmarks/results/:
#
#   attn_bench.json / .txt    Google Benchmark JSON and console output (cases measured while
#                             another process used the CPUs re-run: rerun_contaminated.py)
#   torch.json                compare_torch.py (same schema, plus "skipped")
#   peak_memory.txt           attn_peak_memory flash|core under /usr/bin/time -v
#   attention_gflops.png      plot.py
#   ratios.md                 ratios.py: the target table and GFLOP/s tables
#   environment.txt           machine, compiler, load before and after
#
# Usage: benchmarks/run_all.sh [--quick] [--no-build] [--no-torch]
#   --quick     N ≤ 1024 only (a smoke test of the whole pipeline, a minute or two)
#   --no-build  use the existing build/default binaries
#   --no-torch  keep the existing results/torch.json (or run without torch)
# Environment: RESULTS (the results' folder instead of benchmarks/results, e.g.
#   benchmarks/results/intel for a run on a second machine kind),
#   ATTN_BENCH_ARGS (extra attn_bench flags, e.g. --benchmark_repetitions=3),
#   TORCH_ARGS (extra compare_torch.py flags, e.g. --max-call-seconds 30),
#   IDLE_WAIT (seconds to wait for other processes to leave the CPUs; default 300).
# A full run takes 10-20 minutes on 2 cores.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
results="${RESULTS:-$here/results}"
python=/usr/bin/python3  # Debian's python3-torch and python3-matplotlib live here
bin="$root/build/default/benchmarks"

quick=0 build=1 torch=1
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    --no-torch) torch=0 ;;
    *) echo "usage: $0 [--quick] [--no-build] [--no-torch]" >&2; exit 2 ;;
  esac
done

read -r -a bench_args <<< "${ATTN_BENCH_ARGS:-}"
read -r -a torch_args <<< "${TORCH_ARGS:-}"
if [[ $quick == 1 ]]; then
  bench_args+=(--attn_max_n=1024)
  torch_args+=(--max-n 1024)
fi

cd "$root"
if [[ $build == 1 ]]; then
  cmake --preset default
  cmake --build build/default --target attn_bench attn_peak_memory -j2
fi
mkdir -p "$results"

# Fraction of the CPUs busy over one second, from /proc/stat (0-100).
cpu_busy_percent() {
  local a b
  read -r -a a < <(grep '^cpu ' /proc/stat)
  sleep 1
  read -r -a b < <(grep '^cpu ' /proc/stat)
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

# A benchmark on a shared 2-core machine measures whoever else is running too: wait (a
# bounded time) until the CPUs are nearly idle, and record what the load was.
wait_for_idle() {
  local waited=0 busy
  busy=$(cpu_busy_percent)
  while (( busy > 10 && waited < ${IDLE_WAIT:-300} )); do
    (( waited % 30 == 0 )) && echo "run_all: CPUs ${busy}% busy before '$1'; waiting (up to ${IDLE_WAIT:-300} s)" >&2
    sleep 4; waited=$(( waited + 5 ))
    busy=$(cpu_busy_percent)
  done
  echo "$(date -Is) before $1: CPUs ${busy}% busy, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >> "$results/environment.txt"
}

{
  echo "date: $(date -Is)"
  echo "host: $(uname -a)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs"
  echo "compiler: $(grep -m1 CMAKE_CXX_COMPILER: build/default/CMakeCache.txt | cut -d= -f2) $(c++ --version | head -1)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) files changed"
} > "$results/environment.txt"

echo "== attn_bench ==" >&2
wait_for_idle attn_bench
"$bin/attn_bench" "${bench_args[@]}" \
  --benchmark_out="$results/attn_bench.json" --benchmark_out_format=json | tee "$results/attn_bench.txt"
# Cases that shared the CPUs with another process (other_cpus > 0.15) run again when the
# machine is idle; the first run stays in attn_bench.json.first.json.
"$python" "$here/rerun_contaminated.py" "$bin/attn_bench" "$results/attn_bench.json" | tee -a "$results/attn_bench.txt"

if [[ $torch == 1 ]]; then
  echo "== compare_torch.py ==" >&2
  wait_for_idle compare_torch
  "$python" "$here/compare_torch.py" --out "$results/torch.json" "${torch_args[@]}"
fi

echo "== peak memory ==" >&2
wait_for_idle peak_memory
: > "$results/peak_memory.txt"
for path in flash core; do
  {
    echo "== $path =="
    echo "\$ /usr/bin/time -v attn_peak_memory $path"
    /usr/bin/time -v "$bin/attn_peak_memory" "$path" 2>&1
    echo
  } >> "$results/peak_memory.txt"
done
grep -E '^== |Maximum resident|^(input|scratch)_bytes' "$results/peak_memory.txt"

echo "$(date -Is) done: loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >> "$results/environment.txt"

torch_json=()
[[ -f "$results/torch.json" ]] && torch_json=(--torch "$results/torch.json")
"$python" "$here/plot.py" "$results/attn_bench.json" "${torch_json[@]}" --out "$results/attention_gflops.png"
"$python" "$here/ratios.py" "$results/attn_bench.json" "${torch_json[@]}" \
  --peak-memory "$results/peak_memory.txt" | tee "$results/ratios.md"
