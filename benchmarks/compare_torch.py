#!/usr/bin/python3
"""PyTorch's CPU attention on attn_bench's shapes, for comparison.

Run with the system Python that has torch (Debian 12: python3-torch 1.13):

    /usr/bin/python3 benchmarks/compare_torch.py --out benchmarks/results/torch.json

Two implementations, fp32, (H, N, d) tensors, at 1 thread and at all threads
(torch.set_num_threads(t) is set explicitly: its default here is 1):

- torch_naive: torch.softmax(q @ k.transpose(-2, -1) * scale, -1) @ v, the causal case
  masking the scores with masked_fill(mask, -inf) (the bool mask is built once, untimed).
- torch_sdpa:  torch.nn.functional._scaled_dot_product_attention (torch 1.13's private name;
  torch 2 made it scaled_dot_product_attention), is_causal=True for the causal case.

GFLOP/s counts exactly what attn_bench counts: 4*H*N^2*d per call, half of it when causal
(whether or not the implementation skips the masked half).

A shape is skipped, and listed under "skipped" with the reason, when its predicted time
per call (the last measured N of the same series, scaled by N^2 * H * d) exceeds
--max-call-seconds, or its predicted tensors exceed half the available memory.

Output: Google Benchmark's JSON schema (--benchmark_format=json), restricted to what
ratios.py and plot.py read: {"context": {...}, "benchmarks": [{"name", "run_name",
"run_type": "iteration", "iterations", "real_time", "cpu_time", "time_unit": "ms",
"GFLOP/s", "scratch_bytes", "other_cpus"}...]} plus a top-level "skipped": [{"name", "reason"}...].
Names follow attn_bench: torch_sdpa/d:64/H:8/N:1024/causal:0/threads:1/real_time.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

DEFAULT_NS = (128, 256, 512, 1024, 2048, 4096, 8192)


def attention_flops(heads, n, d, causal):
    """4*H*N^2*d, half for causal: the same count as attn_bench's attention_flops."""
    full = 4.0 * heads * n * n * d
    return full / 2 if causal else full


def naive(q, k, v, scale, mask):
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def sdpa(q, k, v, causal):
    # torch 1.13: _scaled_dot_product_attention(query, key, value, attn_mask=None,
    # dropout_p=0.0, need_attn_weights=False, is_causal=False) -> (output, weights)
    out, _ = torch.nn.functional._scaled_dot_product_attention(
        q, k, v, attn_mask=None, dropout_p=0.0, need_attn_weights=False, is_causal=causal)
    return out


def busy_seconds():
    """CPU-seconds all processes have spent busy since boot (steal included), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def time_calls(call, min_time, predicted):
    """Mean seconds per call over at least min_time (and at least one call), after one
    untimed warm-up call unless a single call is predicted to take longer than a second;
    and other_cpus, the CPUs other processes kept busy meanwhile (as attn_bench reports)."""
    if predicted is None or predicted < 1.0:
        call()
    iterations = 0
    busy_start = busy_seconds()
    start = time.perf_counter()
    cpu_start = time.process_time()
    while True:
        call()
        iterations += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            break
    cpu = time.process_time() - cpu_start
    busy_end = busy_seconds()
    other = None
    if busy_start is not None and busy_end is not None:
        other = max(0.0, (busy_end - busy_start - cpu) / elapsed)
    return elapsed / iterations, cpu / iterations, iterations, other


def wait_for_idle(limit_seconds):
    """Waits (at most limit_seconds) until other processes leave the CPUs alone."""
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        start = busy_seconds()
        time.sleep(1.0)
        end = busy_seconds()
        if start is None or end is None or end - start < 0.1:
            return


def available_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def scratch_bytes(impl, heads, n, causal):
    """The n x n float tensors a call holds at its peak: scores, then their scaled (and
    masked) copy, then the softmax; sdpa's math path does about the same."""
    per_matrix = heads * n * n * 4
    return per_matrix * (3 if causal else 2) if impl == "torch_naive" else per_matrix * 2


def blas_libraries():
    """The BLAS torch actually loaded: Debian's torch calls whatever libblas.so.3 points to
    (update-alternatives), the reference BLAS unless OpenBLAS, BLIS or MKL is installed,
    and that decides its matmul speed."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "blas" in line.lower() or "mkl" in line.lower()}
        return sorted(path for path in paths if path.startswith("/"))
    except OSError:
        return []


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default: 1 and os.cpu_count())")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--max-n", type=int, default=16384, help="largest N to try")
    parser.add_argument("--max-call-seconds", type=float, default=25.0,
                        help="skip a shape whose predicted time per call exceeds this")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of measurement per case")
    args = parser.parse_args()

    threads = args.threads or sorted({1, os.cpu_count() or 1})
    shapes = []  # (d, H, N)
    for d in args.d:
        shapes += [(d, 8, n) for n in DEFAULT_NS if n <= args.max_n]
        if 16384 <= args.max_n:
            shapes.append((d, 1, 16384))

    results, skipped = [], []
    last = {}  # series -> (seconds per call, H*N^2*d) of its last measured shape
    memory = available_bytes()
    torch.manual_seed(0)
    with torch.inference_mode():
        for d, heads, n in shapes:
            q, k, v = (torch.randn(heads, n, d) for _ in range(3))
            scale = 1.0 / math.sqrt(d)
            for causal in (False, True):
                mask = torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None
                for t in threads:
                    torch.set_num_threads(t)
                    for impl in ("torch_naive", "torch_sdpa"):
                        name = f"{impl}/d:{d}/H:{heads}/N:{n}/causal:{int(causal)}/threads:{t}/real_time"
                        series = (impl, d, causal, t)
                        work = heads * n * n * d
                        predicted = None
                        if series in last:
                            seconds, last_work = last[series]
                            predicted = seconds * work / last_work
                        need = scratch_bytes(impl, heads, n, causal)
                        if memory is not None and need > memory / 2:
                            skipped.append({"name": name, "reason": f"needs ~{need / 2**30:.1f} GiB, "
                                            f"{memory / 2**30:.1f} GiB available"})
                            continue
                        if predicted is not None and predicted > args.max_call_seconds:
                            skipped.append({"name": name, "reason": f"predicted {predicted:.1f} s per call "
                                            f"> --max-call-seconds {args.max_call_seconds:g}"})
                            continue
                        if impl == "torch_naive":
                            call = lambda: naive(q, k, v, scale, mask)  # noqa: E731
                        else:
                            call = lambda: sdpa(q, k, v, causal)  # noqa: E731
                        # A measurement taken while another process used the CPUs is
                        # retried (after waiting for idle CPUs) when the call is short.
                        real, cpu, iterations, other = time_calls(call, args.min_time, predicted)
                        for _ in range(2):
                            if other is None or other <= 0.15 or real > 2.0:
                                break
                            wait_for_idle(60)
                            retry = time_calls(call, args.min_time, real)
                            if retry[3] is not None and retry[3] < other:
                                real, cpu, iterations, other = retry
                        last[series] = (real, work)
                        gflops = attention_flops(heads, n, d, causal) * 1e-9 / real
                        results.append({
                            "name": name, "run_name": name, "run_type": "iteration",
                            "iterations": iterations, "real_time": real * 1e3, "cpu_time": cpu * 1e3,
                            "time_unit": "ms", "GFLOP/s": gflops, "scratch_bytes": need,
                        })
                        if other is not None:
                            results[-1]["other_cpus"] = other
                        print(f"{name:60s} {real * 1e3:10.2f} ms {gflops:8.2f} GFLOP/s", flush=True)
            del q, k, v
    torch.set_num_threads(1)

    document = {
        "context": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host_name": platform.node(),
            "executable": f"{sys.executable} {os.path.abspath(__file__)}",
            "num_cpus": os.cpu_count(),
            "torch_version": torch.__version__,
            "torch_blas_libraries": blas_libraries(),
            "torch_parallel": torch.__config__.parallel_info().splitlines()[-1].strip(),
            "load_avg": list(os.getloadavg()),
            "flops": "4*H*N^2*d per call, half when causal",
        },
        "benchmarks": results,
        "skipped": skipped,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump(document, out, indent=2)
    for entry in skipped:
        print(f"skipped {entry['name']}: {entry['reason']}")


if __name__ == "__main__":
    main()
