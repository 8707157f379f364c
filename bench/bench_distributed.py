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

Two workloads:
- zoo: the demo pair on the zoo (46 evaluations of about 0.1 s): synchronisation and start-up dominate;
- zoo-rows (`--workload zoo-rows`): the same pair on `--zoo-rows` rows per task taken from the zoo's training
  split (512 by default, against the 64 of its validation split), so that evaluations, not synchronisation, take
  the time, while the model stays small enough to be compute-bound;
- scale (`--workload scale`): bench_scale.py's 24-block ~0.36B Llama (random bf16 weights, two LoRA sources on four
  blocks, computed in float32), Hi-Merging on `--rows` rows of two tasks, so that each evaluation takes seconds, as
  the probes of the models people merge do.

The machine's speed moves by a third from one minute to the next (other machines share its host), so each
configuration's best of `--repeats` runs, alternated, is compared: use 2 or 3 for a figure to quote.

Run: python bench/bench_distributed.py [--workload zoo zoo-rows scale] [--repeats 1] [--start cold warm]
     [--rows 8] [--zoo-rows 512]
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


def zoo_config(out: Path) -> dict:
    "The zoo's demo merge."
    from himerge.zoo import demo_config
    return demo_config(out)


def zoo_rows_config(root: Path, rows: int):
    "A function out -> the demo merge with `rows` rows per task, from the zoo's training split, as validation."
    from himerge.zoo import demo_config
    from himerge.zoo import load_zoo
    zoo = load_zoo()
    for task in zoo.demo_tasks:
        folder = root / "zoo-rows" / task
        folder.mkdir(parents=True, exist_ok=True)
        lines = (zoo.data[task] / "train.jsonl").read_text().splitlines()[:rows]
        (folder / "validation.jsonl").write_text("\n".join(lines) + "\n")
    def make(out: Path) -> dict:
        cfg = demo_config(out)
        for task in cfg["tasks"]:
            cfg["tasks"][task] = {**cfg["tasks"][task], "data": str(root / "zoo-rows" / task), "limit": rows}
        return cfg
    return make


def scale_config(root: Path, rows: int):
    "A function out -> the merge config of bench_scale.py's model (built once into `root`)."
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_scale import build, config
    tasks, *_ = build(root, 24, rows)
    return lambda out: yaml.safe_load(config(root, tasks, "auto", "out").read_text()) | {"output": str(out)}


def merge_report(launcher: list, env: dict, make_config) -> dict:
    "The report of the merge `make_config(out)` (validation only) run by `launcher`, with a fresh cache."
    with tempfile.TemporaryDirectory() as d:
        cfg = make_config(Path(d) / "out")
        cfg["options"] = {**cfg["options"], "test_scores": False, "cache_dir": str(Path(d) / "cache")}
        path = Path(d) / "merge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run(launcher + ["merge", str(path), "--quiet"], env)
        return json.loads((Path(d) / "out" / "himerge_report.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--start", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    ap.add_argument("--workload", nargs="+", choices=["zoo", "zoo-rows", "scale"], default=["zoo", "zoo-rows", "scale"])
    ap.add_argument("--rows", type=int, default=8, help="rows per task of the scale workload")
    ap.add_argument("--zoo-rows", type=int, default=512, help="rows per task of the zoo-rows workload")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for workload in args.workload:
            print(f"workload {workload}:", flush=True)
            make = {"zoo": lambda: zoo_config, "zoo-rows": lambda: zoo_rows_config(Path(root), args.zoo_rows),
                    "scale": lambda: scale_config(Path(root), args.rows)}[workload]()
            compare(args, make)


def compare(args, make_config):
    "Time the merge of `make_config` on 1 and 2 processes, both starts, and print the ratios."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    times = {(start, n): [] for start in args.start for n in (1, 2)}
    reports = {}
    for r in range(args.repeats):
        for (start, n) in times:                     # alternated, so that a change of load hits both alike
            report = merge_report(LAUNCHERS[(start, n)], env, make_config)
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
