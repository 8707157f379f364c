"""Contribution probes on 2 processes against 1, on this 2-core machine (1 thread each), on the same probes.

The zoo's demo merge (Hi-Merging, validation only) runs once as a single process and once under torchrun with two
processes (gloo), each with a fresh evaluation cache. Printed: the wall time of the method (contribution analysis and
conflict resolution, which the ranks share) both ways and their ratio, and whether γ and the decisions are identical.
Target (issue #16): <= 0.6x.

Run: python bench/bench_distributed.py [--repeats 1]
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

import yaml


def run(cmd: list, env: dict) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode: raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from himerge.merge import demo_config
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    times = {"1 process": [], "2 processes": []}
    reports = {}
    for r in range(args.repeats):
        for label, launcher in (("1 process", [sys.executable, "-m", "himerge"]),
                                ("2 processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc-per-node", "2", "-m", "himerge"])):
            with tempfile.TemporaryDirectory() as d:
                cfg = demo_config(Path(d) / "out")
                cfg["options"] = {**cfg["options"], "test_scores": False, "cache_dir": str(Path(d) / "cache")}
                path = Path(d) / "merge.yaml"
                path.write_text(yaml.safe_dump(cfg))
                run(launcher + ["merge", str(path), "--quiet"], env)
                report = json.loads((Path(d) / "out" / "himerge_report.json").read_text())
            times[label].append(report["timings"]["method_s"])
            reports[label] = report
            print(f"run {r + 1}, {label}: method (analysis + resolution) {report['timings']['method_s']:.1f} s, "
                  f"{report['evaluations']['done']} evaluations")
    best = {k: min(v) for k, v in times.items()}
    same = all(reports["1 process"][k] == reports["2 processes"][k] for k in ("gamma", "classes", "decisions"))
    print(f"2 processes / 1 process: {best['2 processes'] / best['1 process']:.2f}x (target <= 0.6); "
          f"γ, classes and decisions identical: {same}")


if __name__ == "__main__":
    main()
