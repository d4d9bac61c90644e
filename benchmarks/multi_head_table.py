#!/usr/bin/env python3
"""Turns attn_bench_multi_head's JSON into the Markdown tables of results/multi_head.md.

    /usr/bin/python3 benchmarks/multi_head_table.py benchmarks/results/multi_head.json \\
        --command "the command that produced the JSON" > benchmarks/results/multi_head.md

Uses each case's median aggregate when the run had repetitions, else its single run. A
cell measured while other processes kept more than 0.15 CPUs busy (`other_cpus`) is
marked with †. Standard library only.
"""

import argparse
import json
import math
import re
import sys

INTERFERENCE = 0.15  # other_cpus above this marks a cell


def load(path):
    with open(path) as f:
        data = json.load(f)
    runs, medians = {}, {}
    for b in data["benchmarks"]:
        name = b.get("run_name", b["name"])
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = b
        elif name not in runs:
            runs[name] = b
    runs.update(medians)
    return data.get("context", {}), runs


def parse(name):
    """('mha_forward'|'decode'|'decode_bf16'|'decode_half'|'decode_q8'|'copy'|'read', kind or None, {arg: int})"""
    parts = name.split("/")
    family = parts[0]
    kind = parts[1] if family in ("mha_forward", "decode", "decode_bf16", "decode_half", "decode_q8") else None
    args = {}
    for p in parts:
        m = re.fullmatch(r"(\w+):(\d+)", p)
        if m and m.group(1) != "repeats":  # Google Benchmark's, from Repetitions()
            args[m.group(1)] = int(m.group(2))
    return family, kind, args


def index(runs):
    table = {}
    for name, b in runs.items():
        family, kind, args = parse(name)
        table[(family, kind) + tuple(sorted(args.items()))] = b
    return table


def get(table, family, kind, **args):
    return table.get((family, kind) + tuple(sorted(args.items())))


def mark(b):
    return "†" if b is not None and b.get("other_cpus", 0.0) > INTERFERENCE else ""


def fmt(b, key, digits=0, scale=1.0):
    if b is None or key not in b:
        return "–"
    return f"{b[key] * scale:,.{digits}f}{mark(b)}"


def ratio(a, b, key, digits=2):
    if a is None or b is None or key not in a or key not in b or b[key] == 0:
        return "–"
    return f"{a[key] / b[key]:.{digits}f}{mark(a) or mark(b)}"


def sizes(table, family):
    return sorted({dict(k[2:]).get("bytes") for k in table if k[0] == family})


def threads_of(table):
    return sorted({dict(k[2:])["threads"] for k in table if "threads" in dict(k[2:])})


def nearest_size(candidates, nbytes):
    return min(candidates, key=lambda s: abs(math.log(s / nbytes)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--command", default=None, help="the command that produced the JSON, for the header")
    args = parser.parse_args()
    context, runs = load(args.json)
    table = index(runs)
    threads = threads_of(table)
    out = []
    w = out.append

    w("# attn_bench_multi_head: MultiHeadAttention forward and decode, with memory bandwidth")
    w("")
    w("E = 512, H = 8 heads of d = 64, float, biases on. `mha`: 8 key/value heads; `gqa`: 2 "
      "(groups of 4 query heads). Medians of the repetitions; † = measured while other processes "
      f"kept more than {INTERFERENCE} CPUs busy (`other_cpus`). What the cases and counters are, and "
      "why the decode steps read slower than the bandwidth below: benchmarks/README.md, "
      "*Multi-head attention and decoding*.")
    w("")
    if args.command:
        w("Produced by:")
        w("")
        w("```sh")
        w(args.command)
        w("```")
        w("")
    caches = ", ".join(f"L{c['level']} {c['size'] // 1024} KiB" + (" shared" if c.get("num_sharing", 1) > 1 else "")
                       for c in context.get("caches", []) if c.get("type") != "Instruction")
    w(f"Run {context.get('date', '?')} on {context.get('num_cpus', '?')} CPUs at "
      f"{context.get('mhz_per_cpu', '?')} MHz ({caches}); load average before the run "
      f"{', '.join(f'{x:.2f}' for x in context.get('load_avg', []))}; Eigen {context.get('eigen_version', '?')} "
      f"({context.get('eigen_simd', '?')}), -march=native {context.get('march_native', '?')}, "
      f"OpenMP threads {context.get('openmp_max_threads', '?')}.")
    w("")

    # Forward
    ns = sorted({dict(k[2:])["N"] for k in table if k[0] == "mha_forward"})
    for causal in (0, 1):
        w(f"## Forward, self-attention, {'causal' if causal else 'non-causal'}: tokens/s")
        w("")
        head = ["N"]
        for t in threads:
            head += [f"MHA {t}T", f"GQA {t}T", f"GQA÷MHA {t}T"]
        head += [f"GFLOP/s MHA {t}T" for t in threads] + [f"attention share MHA {threads[0]}T"]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for n in ns:
            row = [str(n)]
            for t in threads:
                m = get(table, "mha_forward", "mha", N=n, causal=causal, threads=t)
                g = get(table, "mha_forward", "gqa", N=n, causal=causal, threads=t)
                row += [fmt(m, "tokens/s"), fmt(g, "tokens/s"), ratio(g, m, "tokens/s")]
            for t in threads:
                row.append(fmt(get(table, "mha_forward", "mha", N=n, causal=causal, threads=t), "GFLOP/s", 1))
            m1 = get(table, "mha_forward", "mha", N=n, causal=causal, threads=threads[0])
            row.append(f"{m1['attn_share']:.0%}{mark(m1)}" if m1 is not None and "attn_share" in m1 else "–")
            w("| " + " | ".join(row) + " |")
        w("")

    # Bandwidth
    copy_sizes = [s for s in sizes(table, "copy") if s]
    read_sizes = [s for s in sizes(table, "read") if s]
    w("## Memory bandwidth of the same run (GB/s of bytes read)")
    w("")
    w("`copy`: std::memcpy, counted as bytes copied (= bytes read) per second; it also writes "
      "as many. `read`: an Eigen sum over the buffer, reads only.")
    w("")
    head = ["buffer"] + [f"copy {t}T" for t in threads] + [f"read {t}T" for t in threads]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for s in copy_sizes:
        row = [f"{s >> 20} MiB"]
        row += [fmt(get(table, "copy", None, bytes=s, threads=t), "read_GB/s", 1) for t in threads]
        row += [fmt(get(table, "read", None, bytes=s, threads=t), "read_GB/s", 1) for t in threads]
        w("| " + " | ".join(row) + " |")
    w("")

    # Decode
    lengths = sorted({dict(k[2:])["cache"] for k in table if k[0] == "decode"})
    dram = max(copy_sizes) if copy_sizes else None
    w("## Decode: one new token over a cache of L tokens")
    w("")
    w("`KV GB/s`: the cache's keys and values, (L + 1)·2·H_kv·d·4 bytes per step; `total GB/s` adds "
      "the four projection weights and biases (4.0 MiB for MHA, 2.5 MiB for GQA). `copy`/`read` "
      "are the same run's bandwidth at the buffer size nearest the step's total bytes (in the same "
      f"thread count), and `DRAM copy` the {dram >> 20 if dram else '?'} MiB copy. Ratios are total GB/s ÷ "
      "those read_GB/s.")
    w("")
    head = ["L", "threads", "kind", "tokens/s", "GQA÷MHA", "MiB read/step", "KV GB/s", "total GB/s",
            "copy (size)", "read", "÷ copy", "÷ read", "÷ DRAM copy"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for length in lengths:
        for t in threads:
            mha = get(table, "decode", "mha", cache=length, threads=t)
            for kind in ("mha", "gqa"):
                b = get(table, "decode", kind, cache=length, threads=t)
                if b is None:
                    continue
                total = b["kv_bytes"] + b["weight_bytes"]
                size = nearest_size(copy_sizes, total) if copy_sizes else None
                c = get(table, "copy", None, bytes=size, threads=t) if size else None
                r = get(table, "read", None, bytes=nearest_size(read_sizes, total), threads=t) if read_sizes else None
                d = get(table, "copy", None, bytes=dram, threads=t) if dram else None
                row = [str(length), str(t), kind.upper(), fmt(b, "tokens/s"),
                       ratio(b, mha, "tokens/s") if kind == "gqa" else "",
                       f"{total / 2**20:.1f}", fmt(b, "kv_GB/s", 1), fmt(b, "total_GB/s", 1),
                       f"{fmt(c, 'read_GB/s', 1)} ({size >> 20} MiB)" if c else "–", fmt(r, "read_GB/s", 1),
                       _ratio_to(b, c), _ratio_to(b, r), _ratio_to(b, d)]
                w("| " + " | ".join(row) + " |")
    w("")

    # Decode over 16- and 8-bit caches
    if any(k[0] in ("decode_bf16", "decode_half", "decode_q8") for k in table):
        w("## Decode over 16- and 8-bit caches")
        w("")
        w("The same steps over a cache stored as bfloat16 or half (half the bytes) or q8_0 (34 bytes per 32 "
          "values, 0.27 of float's), each row converted to float in registers as the kernel reads it. "
          "`÷ float`: tokens/s over the float cache's in the same run; `÷ read`: total GB/s over the same "
          "run's read of about the step's bytes, as above.")
        w("")
        head = ["L", "threads", "kind", "storage", "tokens/s", "÷ float", "KV GB/s", "total GB/s", "read (size)",
                "÷ read"]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for length in lengths:
            for t in threads:
                for kind in ("mha", "gqa"):
                    base = get(table, "decode", kind, cache=length, threads=t)
                    for family, storage in (("decode_bf16", "bfloat16"), ("decode_half", "half"),
                                            ("decode_q8", "q8_0")):
                        b = get(table, family, kind, cache=length, threads=t)
                        if b is None:
                            continue
                        total = b["kv_bytes"] + b["weight_bytes"]
                        size = nearest_size(read_sizes, total) if read_sizes else None
                        r = get(table, "read", None, bytes=size, threads=t) if size else None
                        w("| " + " | ".join([str(length), str(t), kind.upper(), storage, fmt(b, "tokens/s"),
                                             ratio(b, base, "tokens/s"), fmt(b, "kv_GB/s", 1),
                                             fmt(b, "total_GB/s", 1),
                                             f"{fmt(r, 'read_GB/s', 1)} ({size >> 20} MiB)" if r else "–",
                                             _ratio_to(b, r)]) + " |")
        w("")
    print("\n".join(out))


def _ratio_to(decode, bandwidth):
    if decode is None or bandwidth is None:
        return "–"
    return f"{decode['total_GB/s'] / bandwidth['read_GB/s']:.2f}{mark(decode) or mark(bandwidth)}"


if __name__ == "__main__":
    sys.exit(main())
