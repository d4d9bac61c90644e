#!/usr/bin/python3
"""Re-runs the attn_bench cases that shared the CPUs with another process, and merges the
new measurements into the JSON.

    /usr/bin/python3 benchmarks/rerun_contaminated.py build/default/benchmarks/attn_bench \\
        benchmarks/results/attn_bench.json [--threshold 0.15] [--rounds 2]

attn_bench reports `other_cpus` for every case: the CPUs other processes kept busy during
its timed loop. On a shared 2-core machine a compiler starting in the middle of a run
halves a 2-thread case (and Eigen's threaded GEMM collapses far more: its threads spin at
barriers while one is descheduled). Cases above the threshold are run again, after
waiting for the machine to be idle, and replace the originals when they are cleaner; the
first run is kept as <json>.first.json. Cases still contaminated are listed at the end.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time


def busy_fraction(seconds=1.0):
    def sample():
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 0.0 if total1 == total0 else 1.0 - (idle1 - idle0) / (total1 - total0)


def wait_for_idle(limit_seconds):
    waited = 0.0
    while busy_fraction() > 0.10 and waited < limit_seconds:
        time.sleep(4)
        waited += 5
    return waited


def groups(document):
    """{run_name: [entries]} in file order: a case's repetitions and their aggregates."""
    grouped = {}
    for entry in document["benchmarks"]:
        grouped.setdefault(entry.get("run_name", entry["name"]), []).append(entry)
    return grouped


def sharing(entries):
    """A case's other_cpus: its median aggregate's when it was repeated (one disturbed
    repetition of three does not move the median it is judged by), else its run's."""
    for entry in entries:
        if entry.get("run_type") == "aggregate" and entry.get("aggregate_name") == "median":
            return entry.get("other_cpus", 0.0)
    return max((e.get("other_cpus", 0.0) for e in entries if e.get("run_type", "iteration") == "iteration"),
               default=0.0)


def contaminated(document, threshold):
    return [name for name, entries in groups(document).items() if sharing(entries) > threshold]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attn_bench")
    parser.add_argument("json")
    parser.add_argument("--threshold", type=float, default=0.15, help="other_cpus above which a case is re-run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-wait", type=float, default=120, help="seconds to wait for idle CPUs per round")
    args = parser.parse_args()

    with open(args.json) as handle:
        document = json.load(handle)
    names = contaminated(document, args.threshold)
    if not names:
        print("rerun_contaminated: no case shared the CPUs (other_cpus ≤ %g)" % args.threshold)
        return 0
    if not os.path.exists(args.json + ".first.json"):
        shutil.copyfile(args.json, args.json + ".first.json")

    for round_number in range(1, args.rounds + 1):
        print(f"rerun_contaminated: round {round_number}, {len(names)} case(s) with other_cpus > {args.threshold}",
              flush=True)
        wait_for_idle(args.idle_wait)
        # run_name is the name Google Benchmark filters on (repetitions included).
        pattern = "^(" + "|".join(re.escape(name) for name in names) + ")$"
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as scratch:
            out_path = scratch.name
        subprocess.run([args.attn_bench, f"--benchmark_filter={pattern}", f"--benchmark_out={out_path}",
                        "--benchmark_out_format=json"], check=True)
        with open(out_path) as handle:
            retry = groups(json.load(handle))
        os.unlink(out_path)
        merged = []
        for name, entries in groups(document).items():
            new = retry.get(name)
            if new is not None and sharing(new) < sharing(entries):
                for entry in new:
                    entry["rerun"] = round_number
                entries = new
            merged.extend(entries)
        document["benchmarks"] = merged
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)
        names = contaminated(document, args.threshold)
        if not names:
            break
    for name in names:
        print(f"rerun_contaminated: still contaminated: {name} (other_cpus = {sharing(groups(document)[name]):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
