#!/usr/bin/python3
"""GFLOP/s against N for attn's flash and core paths, PyTorch, and the GEMM peaks.

    /usr/bin/python3 benchmarks/plot.py benchmarks/results/attn_bench.json \\
        --torch benchmarks/results/torch.json --out benchmarks/results/attention_gflops.png

One PNG, four panels: d = 64 and d = 128, non-causal and causal, H = 8 (the single-head
N = 16384 case as an unconnected hollow marker at the right). One line per implementation
and thread count; the Eigen GEMM of the same FLOPs (Eigen's peak for these products) dashed,
the same line in the causal panels (its products do not change with the mask). Causal
GFLOP/s count half the FLOPs of non-causal for every implementation. The square 2048³
sgemm peaks on 1 thread, OpenBLAS's (the machine's practical peak) and Eigen's, are dotted
horizontal lines in every panel when the run has them.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ratios import PEAK_N, PEAKS, is_attention, load_runs, sgemm_peak  # noqa: E402

STYLE = {  # implementation: (label, colour)
    "flash": ("attn flash", "tab:blue"),
    "core": ("attn core", "tab:orange"),
    "torch_naive": ("torch naive", "tab:green"),
    "torch_sdpa": ("torch sdpa", "tab:red"),
    "gemm": ("Eigen GEMM (peak)", "black"),
}
PEAK_COLOURS = {"openblas_sgemm": "tab:purple", "eigen_sgemm": "dimgray"}


def series(runs, impl, d, heads, causal, threads):
    points = sorted((key[3], entry["GFLOP/s"]) for key, entry in runs.items()
                    if key[0] == impl and key[1] == d and key[2] == heads and key[4] == causal
                    and key[5] == threads and "GFLOP/s" in entry)
    return [p[0] for p in points], [p[1] for p in points]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attn_json")
    parser.add_argument("--torch", help="compare_torch.py's JSON")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    runs = load_runs(args.attn_json, args.torch)
    threads = sorted({key[5] for key in runs if is_attention(key)})
    ds = sorted({key[1] for key in runs if is_attention(key)}) or [64]
    peaks = [(impl, sgemm_peak(runs, impl)) for impl in PEAKS]
    peaks = [(impl, entry["GFLOP/s"]) for impl, entry in peaks if entry and "GFLOP/s" in entry]

    figure, axes = plt.subplots(len(ds), 2, figsize=(13, 5 * len(ds)), squeeze=False, sharex=True)
    for row, d in enumerate(ds):
        for column, causal in enumerate((0, 1)):
            ax = axes[row][column]
            for impl, (label, colour) in STYLE.items():
                for t in threads:
                    alpha = 1.0 if t == 1 else 0.55
                    marker = "o" if t == 1 else "s"
                    name = f"{label}, {t} thread{'s' if t > 1 else ''}"
                    mask = 0 if impl == "gemm" else causal
                    xs, ys = series(runs, impl, d, 8, mask, t)
                    if xs:
                        ax.plot(xs, ys, linestyle="--" if impl == "gemm" else "-", marker=marker, markersize=4,
                                color=colour, alpha=alpha, label=name)
                    xs, ys = series(runs, impl, d, 1, mask, t)
                    if xs:
                        ax.plot(xs, ys, linestyle="none", marker=marker, markersize=6, markerfacecolor="none",
                                color=colour, alpha=alpha)
            ax.set_xscale("log", base=2)
            for impl, value in peaks:
                ax.axhline(value, linestyle=":", linewidth=1.5, color=PEAK_COLOURS[impl],
                           label=f"{PEAKS[impl]} {PEAK_N}³, 1 thread")
            ns = sorted({key[3] for key in runs if is_attention(key)})
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns], fontsize=8)
            ax.minorticks_off()
            ax.set_xlabel("N (tokens); hollow markers: H = 1")
            ax.set_ylabel("GFLOP/s (4·H·N²·d, half if causal)")
            ax.set_title(f"d = {d}, H = 8, fp32, {'causal' if causal else 'non-causal'}")
            ax.set_ylim(bottom=0)
            if peaks:  # room above the highest reference line
                ax.set_ylim(top=max(ax.get_ylim()[1], 1.05 * max(value for _, value in peaks)))
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.06 if len(ds) > 1 else 0.1, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
