#!/usr/bin/python3
"""The ratios issue 4 sets as targets, computed from one run's results, as a Markdown table.

    /usr/bin/python3 benchmarks/ratios.py benchmarks/results/attn_bench.json \\
        [--torch benchmarks/results/torch.json] [--peak-memory benchmarks/results/peak_memory.txt]

Every ratio compares cases of the same run (same build, same machine, minutes apart).
GFLOP/s ratios are time ratios of the same FLOP count, so flash / gemm = t_gemm / t_flash;
against the square sgemm peaks (openblas_sgemm, eigen_sgemm: n×n×n, 2·n³ FLOPs) they are
rates of different work, flash's useful FLOPs per second over the BLAS's.
Also imported by plot.py for `load_runs`. Standard library only.
"""

import argparse
import json
import re
import statistics
import sys

MiB = 1 << 20
ARG = re.compile(r"^([A-Za-z_]+):(-?\d+)$")
# The square GEMM peaks: implementation -> label. Their keys have no d and no H (None) and
# hold the product's size n where the attention cases hold N.
PEAKS = {"openblas_sgemm": "OpenBLAS sgemm", "eigen_sgemm": "Eigen sgemm"}
PEAK_N = 2048  # the peak the targets read


def parse_name(name):
    """'flash/d:64/H:8/N:1024/causal:0/threads:1/real_time' -> ('flash', {'d': 64, ...})."""
    parts = name.split("/")
    args = {}
    for part in parts[1:]:
        match = ARG.match(part)
        if match:
            args[match.group(1)] = int(match.group(2))
    return parts[0], args


def load_runs(*paths):
    """{(impl, d, H, N, causal, threads): {'real_time': ms, 'GFLOP/s': …, …}} from Google
    Benchmark JSON files (or compare_torch.py's, the same schema). With repetitions, the
    median aggregate is used when present, else the median of the repetitions."""
    grouped = {}
    medians = {}
    for path in paths:
        if not path:
            continue
        with open(path) as handle:
            document = json.load(handle)
        for entry in document.get("benchmarks", []):
            if entry.get("error_occurred"):
                continue
            run_name = entry.get("run_name", entry["name"])
            if entry.get("run_type") == "aggregate":
                if entry.get("aggregate_name") == "median":
                    medians[run_name] = entry
                continue
            grouped.setdefault(run_name, []).append(entry)
    runs = {}
    for run_name in set(grouped) | set(medians):
        impl, args = parse_name(run_name)
        if run_name in medians:
            entry = dict(medians[run_name])
        else:
            entries = grouped[run_name]
            entry = dict(entries[0])
            for field in ("real_time", "GFLOP/s", "GB/s"):
                if field in entry:
                    entry[field] = statistics.median(e[field] for e in entries)
        entry["real_time_ms"] = to_ms(entry["real_time"], entry.get("time_unit", "ns"))
        key = (impl, args.get("d"), args.get("H"), args.get("N", args.get("n_k", args.get("n"))),
               args.get("causal", 1 if impl == "decode" else 0), args.get("threads", 1))
        runs[key] = entry
    return runs


def to_ms(value, unit):
    return value * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def is_attention(key):
    """An attention case (attn's or torch's): not a decode step, not a square GEMM peak."""
    return key[0] != "decode" and key[0] not in PEAKS


def sgemm_peak(runs, impl, n=PEAK_N, threads=1):
    """A square GEMM peak's entry, or None when the run has none (attn_bench built without
    OpenBLAS, or run with --attn_max_n below n)."""
    return runs.get((impl, None, None, n, 0, threads))


def max_threads(runs):
    return max((key[5] for key in runs), default=1)


def gflops(runs, impl, d, heads, n, causal, threads):
    entry = runs.get((impl, d, heads, n, causal, threads))
    return None if entry is None else entry.get("GFLOP/s")


def parse_peak_memory(path):
    """{path: {'max_rss_bytes', 'input_bytes', 'output_bytes', 'scratch_bytes', 'baseline_peak_rss_bytes'}}
    from run_all.sh's peak_memory.txt: sections '== flash ==' holding the driver's
    'key: value' lines and /usr/bin/time -v's report."""
    sections = {}
    current = None
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            header = re.match(r"^== (\w+) ==$", line)
            if header:
                current = sections.setdefault(header.group(1), {})
                continue
            if current is None:
                continue
            rss = re.match(r"^Maximum resident set size \(kbytes\): (\d+)$", line)
            if rss:
                current["max_rss_bytes"] = int(rss.group(1)) * 1024
                continue
            field = re.match(r"^(\w+_bytes): (-?\d+)$", line)
            if field:
                current[field.group(1)] = int(field.group(2))
    return sections


def verdict(value, target, at_least):
    if value is None:
        return "n/a"
    return "yes" if (value >= target if at_least else value <= target) else "**no**"


def fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


SHARED = 0.15  # other_cpus above which a case is marked as measured on a shared machine


def table(runs, peak=None, d=64, heads=8):
    t_max = max_threads(runs)
    rows = []  # (target, case, value, goal, met, note)

    def get(impl, n, causal, threads):
        return runs.get((impl, d, heads, n, causal, threads))

    def add(target, case, value, goal, at_least, entries=(), digits=2, note=""):
        shared = max((e.get("other_cpus", 0.0) for e in entries if e), default=0.0)
        if shared > SHARED:
            note = "; ".join(filter(None, (note, f"other processes used {shared:.2f} CPUs")))
        rows.append((target, case, fmt(value, digits), ("≥ " if at_least else "≤ ") + f"{goal:g}",
                     verdict(value, goal, at_least), note))

    def rate(entry):
        return None if entry is None else entry.get("GFLOP/s")

    for n in (1024, 2048, 4096, 8192):
        flash, gemm = get("flash", n, 0, 1), get("gemm", n, 0, 1)
        add("1a flash / gemm (1 thread)", f"N = {n}", ratio(rate(flash), rate(gemm)), 0.85, True, (flash, gemm))
    for n in (2048, 4096, 8192):
        flash = get("flash", n, 0, 1)
        torch = [e for e in (get("torch_naive", n, 0, 1), get("torch_sdpa", n, 0, 1)) if e and "GFLOP/s" in e]
        best = max(torch, key=rate) if torch else None
        add("1b flash / best torch fp32 (1 thread)", f"N = {n}", ratio(rate(flash), rate(best)), 1.2, True,
            (flash, best))
    for n in (2048, 4096, 8192):
        flash, core = get("flash", n, 0, 1), get("core", n, 0, 1)
        add("2 flash / core (1 thread)", f"N = {n}", ratio(rate(flash), rate(core)), 1.15, True, (flash, core))
    for n in (1024, 2048, 4096, 8192):
        many, one = get("flash", n, 0, t_max), get("flash", n, 0, 1)
        add(f"3 flash {t_max} threads / 1 thread", f"N = {n}", ratio(rate(many), rate(one)), 1.7, True, (many, one))
    causal, full = get("flash", 4096, 1, 1), get("flash", 4096, 0, 1)
    add("4 flash causal / non-causal time (1 thread)", "N = 4096",
        ratio(causal and causal["real_time_ms"], full and full["real_time_ms"]), 0.6, False, (causal, full))
    if peak and "flash" in peak and "max_rss_bytes" in peak["flash"]:
        flash = peak["flash"]
        add("5 flash peak RSS − inputs, MiB", "N = 16384, H = 1, d = 64",
            (flash["max_rss_bytes"] - flash.get("input_bytes", 0)) / MiB, 16, False, digits=1)
    else:
        add("5 flash peak RSS − inputs, MiB", "N = 16384, H = 1, d = 64", None, 16, False)
    # flash against the machine's practical peak (a tuned BLAS's sgemm) and Eigen's, both
    # square n = 2048 products on 1 thread; at d = 64 and d = 128.
    for number, impl in (("6a", "openblas_sgemm"), ("6b", "eigen_sgemm")):
        target = f"{number} flash / {PEAKS[impl]} {PEAK_N}³ (1 thread)"
        reference = sgemm_peak(runs, impl)
        if reference is None or "GFLOP/s" not in reference:
            if any(key[0] == impl for key in runs):
                why = f"no {impl}/n:{PEAK_N}/threads:1 in this run (--attn_max_n < {PEAK_N}?)"
            else:
                why = f"no {impl} case in this run" + (
                    " (attn_bench built without OpenBLAS: libopenblas-dev)" if impl == "openblas_sgemm" else "")
            add(target, "d = 64, 128; N = 1024 … 8192", None, 0.8, True, note=why)
            continue
        for flash_d in (64, 128):
            for n in (1024, 2048, 4096, 8192):
                flash = runs.get(("flash", flash_d, heads, n, 0, 1))
                add(target, f"d = {flash_d}, N = {n}", ratio(rate(flash), rate(reference)), 0.8, True,
                    (flash, reference))

    lines = [f"d = {d}, H = {heads}, fp32, non-causal unless stated; ratios of GFLOP/s within one run",
             "",
             "| target | case | value | goal | met | note |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def peak_memory_table(peak):
    lines = ["| path | max RSS (MiB) | inputs q,k,v (MiB) | RSS − inputs (MiB) | output (MiB) | "
             "scratch reported (MiB) | process baseline (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for path, values in peak.items():
        if "max_rss_bytes" not in values:
            continue
        rss, inputs = values["max_rss_bytes"], values.get("input_bytes", 0)
        lines.append(f"| {path} | {rss / MiB:.1f} | {inputs / MiB:.1f} | {(rss - inputs) / MiB:.1f} | "
                     f"{values.get('output_bytes', 0) / MiB:.1f} | {values.get('scratch_bytes', 0) / MiB:.2f} | "
                     f"{values.get('baseline_peak_rss_bytes', 0) / MiB:.1f} |")
    return "\n".join(lines)


def cell(entry, field="GFLOP/s"):
    """A value, with a dagger when other processes shared the CPUs during its run."""
    if entry is None or field not in entry:
        return "n/a"
    return fmt(entry[field], 1) + (" †" if entry.get("other_cpus", 0.0) > SHARED else "")


def gflops_table(runs, d=64, causal=0):
    """GFLOP/s per implementation and thread count against N, for the README."""
    impls = [i for i in ("gemm", "flash", "core", "torch_naive", "torch_sdpa")
             if any(k[0] == i for k in runs)]
    threads = sorted({k[5] for k in runs if is_attention(k)})
    columns = [(i, t) for i in impls for t in threads]
    # H = 8 at every N, then the single-head N = 16384 case
    shapes = sorted({(-k[2], k[3]) for k in runs if k[1] == d and k[0] != "decode"})
    lines = [f"GFLOP/s, d = {d}, {'causal' if causal else 'non-causal'} (×t: t threads; "
             f"†: other processes used > {SHARED} CPUs during the run)",
             "",
             "| H | N | " + " | ".join(f"{i} ×{t}" for i, t in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for minus_heads, n in shapes:
        cells = [cell(runs.get((i, d, -minus_heads, n, 0 if i == "gemm" else causal, t))) for i, t in columns]
        lines.append(f"| {-minus_heads} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peaks_table(runs):
    """GFLOP/s of the square GEMM peaks (n×n×n, 2·n³ FLOPs per call) the targets 6a, 6b read."""
    keys = sorted(k for k in runs if k[0] in PEAKS)
    if not keys:
        return ""
    threads = sorted({k[5] for k in keys})
    lines = [f"Square sgemm peaks, GFLOP/s (n×n×n, column-major; †: other processes used > {SHARED} CPUs)",
             "",
             "| GEMM | n | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " |",
             "|---|---|" + "---|" * len(threads)]
    for impl in PEAKS:
        for n in sorted({k[3] for k in keys if k[0] == impl}):
            cells = [cell(runs.get((impl, None, None, n, 0, t))) for t in threads]
            lines.append(f"| {PEAKS[impl]} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_table(runs):
    keys = sorted(k for k in runs if k[0] == "decode")
    if not keys:
        return ""
    threads = sorted({k[5] for k in keys})
    lengths = sorted({k[3] for k in keys})
    lines = ["Decode (n_q = 1, H = 8, d = 64, causal, flash): GB/s of K and V read",
             "",
             "| n_k | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " |",
             "|---|" + "---|" * len(threads)]
    for n_k in lengths:
        cells = [cell(runs.get(("decode", 64, 8, n_k, 1, t)), "GB/s") for t in threads]
        lines.append(f"| {n_k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attn_json")
    parser.add_argument("--torch", help="compare_torch.py's JSON")
    parser.add_argument("--peak-memory", help="run_all.sh's peak_memory.txt")
    args = parser.parse_args()
    runs = load_runs(args.attn_json, args.torch)
    peak = parse_peak_memory(args.peak_memory) if args.peak_memory else None
    print(table(runs, peak))
    print()
    peaks = peaks_table(runs)
    if peaks:
        print(peaks)
        print()
    if peak:
        print(peak_memory_table(peak))
        print()
    for d in sorted({k[1] for k in runs if is_attention(k)}):
        for causal in (0, 1):
            print(gflops_table(runs, d=d, causal=causal))
            print()
    print(decode_table(runs))
    if args.torch:
        with open(args.torch) as handle:
            skipped = json.load(handle).get("skipped", [])
        if skipped:
            # One line per shape: the implementations, causal settings and thread counts
            # skipped for it, and the largest reason.
            shapes = {}
            for entry in skipped:
                impl, shape = parse_name(entry["name"])
                key = (shape.get("d"), shape.get("H"), shape.get("N"))
                shapes.setdefault(key, []).append(entry["reason"])
            print()
            print(f"torch cases skipped by compare_torch.py ({len(skipped)}, every implementation, "
                  "causal setting and thread count of these shapes unless counted otherwise):")
            for (d, heads, n), reasons in sorted(shapes.items()):
                print(f"- d = {d}, H = {heads}, N = {n} ({len(reasons)} cases): {reasons[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
