"""Contribution probes on 2 processes against 1, on this 2-core machine (1 thread each), on the same probes.

The zoo's demo merge (Hi-Merging, validation only) runs as a single process and under torchrun with two processes
(gloo), each with a fresh evaluation cache. Printed: the wall time of the method (contribution analysis and conflict
resolution, which the ranks share) both ways and their ratio, and whether γ and the decisions are identical.
Target (issue #16): <= 0.6x.

Two starts are timed:
- cold: `python -m himerge merge ...`, as a user runs it. Each process imports LightEval at its first evaluation,
  inside the method's time (2 to 10 s here, by the machine's load): every rank pays it at once, so it does not
  shrink with more processes, and on the zoo, whose probes take about 10 s in all, it is a third of the method.
- warm: the same command with LightEval imported before the merge starts, in both runs, so that the method's time is
  the probes' and resolution's alone, as in a job whose probes take hours. The target is read on this one.

Run: python bench/bench_distributed.py [--repeats 1] [--start cold warm]
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

import yaml

# LightEval imported first, with grad mode kept as it was (its model module switches grad off globally), then the CLI.
WARM = ("import sys, torch; grad = torch.is_grad_enabled(); "
        "import lighteval.metrics, lighteval.models.transformers.transformers_model; "
        "torch.set_grad_enabled(grad); from himerge.cli import main; sys.exit(main())")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
LAUNCHERS = {("cold", 1): [sys.executable, "-m", "himerge"],
             ("cold", 2): TORCHRUN + ["-m", "himerge"],
             ("warm", 1): [sys.executable, "-c", WARM],
             ("warm", 2): TORCHRUN + ["--no-python", sys.executable, "-c", WARM]}


def run(cmd: list, env: dict) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode: raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def merge_report(launcher: list, env: dict) -> dict:
    "The report of the demo merge (validation only) run by `launcher`, with a fresh cache."
    from himerge.merge import demo_config
    with tempfile.TemporaryDirectory() as d:
        cfg = demo_config(Path(d) / "out")
        cfg["options"] = {**cfg["options"], "test_scores": False, "cache_dir": str(Path(d) / "cache")}
        path = Path(d) / "merge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run(launcher + ["merge", str(path), "--quiet"], env)
        return json.loads((Path(d) / "out" / "himerge_report.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--start", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    times = {(start, n): [] for start in args.start for n in (1, 2)}
    reports = {}
    for r in range(args.repeats):
        for (start, n) in times:                     # alternated, so that a change of load hits both alike
            report = merge_report(LAUNCHERS[(start, n)], env)
            times[(start, n)].append(report["timings"]["method_s"])
            reports[(start, n)] = report
            print(f"run {r + 1}, {start} start, {n} process{'es' if n > 1 else ''}: method (analysis + resolution) "
                  f"{report['timings']['method_s']:.1f} s, {report['evaluations']['done']} evaluations, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for start in args.start:
        best = {n: min(times[(start, n)]) for n in (1, 2)}
        same = all(reports[(start, 1)][k] == reports[(start, 2)][k] for k in ("gamma", "classes", "decisions"))
        print(f"{start} start: 2 processes / 1 process: {best[2] / best[1]:.2f}x (target <= 0.6, read on the warm "
              f"start); γ, classes and decisions identical: {same}")


if __name__ == "__main__":
    main()
