"""Every merge method on the real zoo (LoRA adapters of SmolLM2-135M-Instruct, 30 blocks; `himerge zoo build --real`).

For every pair of adapters and for the 3-way merge, each registered method that takes that many sources gets the fair
grid of `compare_methods` (the registry's `search`): every grid point is merged and scored on validation, the point
with the best mean gain kept is chosen, and that merge alone is scored on test. Hi-Merging also runs as four fixed
variants (conflict_z 0 and 1, layer and module granularity), each with the rest of its grid (`auto`), and at its
defaults alone (no search: what a user gets without a grid).

Each (target, method, setting) runs in its own process, which reports its wall time and peak RSS, and its result is
cached as JSON under the results folder: an interrupted run resumes with the next unfinished job, and a finished job
is never rerun. Jobs run cheapest first (the per-tensor methods, then Hi-Merging, whose contribution analysis alone
is (sources + tasks) x (2 x 30 + 1) + tasks evaluations per grid point: 246 for a pair).

Printed per target, one row per method (or Hi-Merging variant): test score and gain kept per task, mean gain kept
(share of each adapter's own test gain over the base that the merge keeps), task evaluations spent (search and final
test scores), wall seconds and peak RSS.

A job may also set a method's options by name (one point, no grid): `--methods layerwise_search:budget=300`
runs the layer-wise search at 300 evaluations, cached and reported as its own row.

Run:    nice -n 10 python bench/bench_real.py [--zoo DIR] [--results DIR] [--targets last+reverse ...]
Report: python bench/bench_real.py --report      (prints what has finished; runs nothing)
"""
import argparse, itertools, json, os, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

HI_VARIANTS = {f"z{z:g}-{g}": dict(conflict_z=float(z), granularity=g) for g in ("layer", "module") for z in (0, 1)}


def zoo_targets(zoo) -> dict:
    "target name -> its tasks: every pair of adapters, and all of them."
    tasks = [t for t in zoo.tasks if t in zoo.adapters]
    pairs = {"+".join(p): list(p) for p in itertools.combinations(tasks, 2)}
    return {**pairs, "all": tasks} if len(tasks) > 2 else pairs


def merge_config(zoo, tasks: list) -> dict:
    "The merge config of the adapters of `tasks` over the zoo's base (absolute data paths: the config has no file)."
    specs = {t: {**zoo.tasks[t].to_dict(), "data": str(zoo.tasks[t].data_dir)} for t in tasks}
    return dict(base=str(zoo.base), sources=[dict(path=str(zoo.adapters[t]), task=t, name=t) for t in tasks],
                tasks=specs, method="task_arithmetic", options=dict(test_scores=False), dtype="float32")


SEARCHING = ("hi-merging", "layerwise_search", "auto")   # methods that spend hundreds of evaluations per merge


def jobs(zoo, targets: list) -> list:
    """(target, method, setting) in the order they run: target by target, the per-tensor methods' fair grids, then
    Hi-Merging at its defaults (one point: the comparison a user meets first); after every target has those, the
    searching methods (Hi-Merging's fair grid and variants, layerwise_search, auto)."""
    from himerge.methods import METHODS
    first, later = [], []
    for target in targets:
        n = len(zoo_targets(zoo)[target])
        for name, m in METHODS.items():
            if m.min_sources > n or (m.max_sources is not None and n > m.max_sources): continue
            (later if name in SEARCHING else first).append((target, name, "fair grid"))
        if "hi-merging" in METHODS:
            first.append((target, "hi-merging", "defaults"))
            later += [(target, "hi-merging", v) for v in HI_VARIANTS]
    return first + later


def result_path(results: Path, target: str, method: str, setting: str) -> Path:
    return results / target / f"{method}--{setting.replace(' ', '_')}.json"


def finished(results: Path, zoo, target: str) -> list:
    "(method, setting) of the target's finished jobs: the standard list's in its order, then option settings."
    standard = [(m, s) for _, m, s in jobs(zoo, [target])]
    done = [(m, s) for m, s in standard if result_path(results, target, m, s).is_file()]
    extra = sorted(tuple(p.stem.split("--", 1)) for p in (results / target).glob("*--*=*.json"))
    return done + [(m, s) for m, s in extra if (m, s) not in standard]


def selected(todo: list, method: str, target: str) -> list:
    "The jobs of `todo` on `target` that `method` (a name, or name:setting) names; an option setting is its own job."
    if "=" in method: return [(target, *method.split(":", 1))]
    return [j for j in todo if j[0] == target and method in (j[1], f"{j[1]}:{j[2]}")]


def run_one(zoo_root: Path, target: str, method: str, setting: str, out: Path):
    "One job, in this process: compare_methods on one method; its tables, choice, search, cost and peak RSS as JSON."
    from himerge.compare import compare_methods
    from himerge.zoo import load_zoo
    zoo = load_zoo(zoo_root)
    cfg = merge_config(zoo, zoo_targets(zoo)[target])
    grids = None
    if setting == "defaults":
        grids = {method: {}}                               # one point: the method's own defaults
    if setting in HI_VARIANTS:
        cfg["options"].update(HI_VARIANTS[setting])
        grids = {method: {"auto": [False, True]}}          # the rest of Hi-Merging's fair grid
    if "=" in setting:                                     # "budget=300,sigma=0.2": one point, these options set
        grids = {method: {k: [json.loads(v)] for k, v in (kv.split("=", 1) for kv in setting.split(","))}}
    merges = Path(tempfile.mkdtemp(prefix="himerge-bench-real-"))
    t0 = time.perf_counter()
    try: cmp = compare_methods(cfg, methods=[method], grids=grids, out_root=merges)
    finally: shutil.rmtree(merges, ignore_errors=True)     # each merge is a 540 MB model
    res = dict(target=target, method=method, setting=setting, seconds=round(time.perf_counter() - t0, 1),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               evaluations=cmp.evaluations[method], chosen=cmp.chosen[method],
               searched=[[p, v] for p, v in cmp.searched[method]],
               tables={s: json.loads(t.to_json(orient="index")) for s, t in cmp.tables.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(res, indent=1)); os.replace(part, out)


def report(results: Path, zoo, targets: list) -> str:
    "The tables of every finished job, one per target, and the list of jobs not run."
    import pandas as pd
    lines, missing = [], []
    for target in targets:
        tasks, rows = zoo_targets(zoo)[target], {}
        missing += [f"{target} {m} {s}" for _, m, s in jobs(zoo, [target])
                    if not result_path(results, target, m, s).is_file()]
        for method, setting in finished(results, zoo, target):
            r = json.loads(result_path(results, target, method, setting).read_text()); test = r["tables"]["test"]
            if not rows:
                rows["base"] = {t: test["base"][t] for t in tasks}
                for t in tasks: rows[f"adapter {t}"] = {t2: test[f"source {t}"][t2] for t2 in tasks}
            name = method if setting == "fair grid" else f"{method} {setting}"
            row = {t: test[method][t] for t in tasks}
            row.update({f"kept {t}": test[method][f"gain kept {t}"] for t in tasks})
            row.update({"mean kept": test[method]["mean gain kept"], "evaluations": r["evaluations"],
                        "wall s": r["seconds"], "peak RSS MB": r["peak_rss_mb"],
                        "chosen": json.dumps(r["chosen"], separators=(",", ":"))})
            rows[name] = row
        if rows:
            table = pd.DataFrame(rows).T.to_string(float_format=lambda x: f"{x:.3f}")
            lines += [f"\n== {target} (test split) ==", table]
    if missing: lines += [f"\nnot run ({len(missing)}):", *[f"  {m}" for m in missing]]
    return "\n".join(lines)


def summary(results: Path, zoo, targets: list) -> str:
    """Mean gain kept on test, one row per method (or Hi-Merging setting), one column per target, with the mean over
    the pairs where a method has every pair; and the evaluations and wall seconds it spent over them."""
    import pandas as pd
    kept, spent, wall = {}, {}, {}
    for target in targets:
        for method, setting in finished(results, zoo, target):
            r = json.loads(result_path(results, target, method, setting).read_text())
            name = method if setting == "fair grid" else f"{method} {setting}"
            kept.setdefault(name, {})[target] = r["tables"]["test"][method]["mean gain kept"]
            spent[name] = spent.get(name, 0) + r["evaluations"]; wall[name] = wall.get(name, 0) + r["seconds"]
    if not kept: return "nothing has finished"
    table = pd.DataFrame(kept).T.reindex(columns=targets)
    pairs = [t for t in targets if t != "all"]
    table["mean over pairs"] = table[pairs].mean(axis=1, skipna=False)
    table["evaluations"], table["wall s"] = pd.Series(spent), pd.Series(wall).round(0)
    return table.sort_values("mean over pairs", ascending=False).to_string(float_format=lambda x: f"{x:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", help="the real zoo (default: himerge zoo build --real's folder)")
    ap.add_argument("--results", help="where job results are cached (default: <zoo>/bench)")
    ap.add_argument("--targets", nargs="*", help="targets to run (default: every pair, then all)")
    ap.add_argument("--methods", nargs="*", help="run only these methods (or method:setting, "
                    "e.g. hi-merging:defaults), in this order, each over every target")
    ap.add_argument("--report", action="store_true", help="print the finished jobs' tables; run nothing")
    ap.add_argument("--summary", action="store_true", help="print mean gain kept per method and target; run nothing")
    ap.add_argument("--one", nargs=3, metavar=("TARGET", "METHOD", "SETTING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    from himerge.real_zoo import default_root
    from himerge.zoo import load_zoo
    zoo_root = Path(a.zoo) if a.zoo else default_root()
    results = Path(a.results) if a.results else zoo_root / "bench"
    if a.one: return run_one(zoo_root, *a.one, result_path(results, *a.one))
    zoo = load_zoo(zoo_root)
    targets = a.targets or list(zoo_targets(zoo))
    if a.summary: return print(summary(results, zoo, targets))
    if not a.report:
        todo = [j for j in jobs(zoo, targets) if not result_path(results, *j).is_file()]
        if a.methods:   # method by method, in the order given, each over every target
            todo = [j for m in a.methods for t in targets for j in selected(todo, m, t)
                    if not result_path(results, *j).is_file()]
        for k, (target, method, setting) in enumerate(todo, 1):
            print(f"[{time.strftime('%H:%M:%S')}] job {k}/{len(todo)}: {target} {method} {setting}", flush=True)
            cmd = [sys.executable, __file__, "--zoo", str(zoo_root), "--results", str(results),
                   "--one", target, method, setting]
            if subprocess.run(cmd).returncode != 0: print(f"  failed: {target} {method} {setting}", flush=True)
    print(report(results, zoo, targets))


if __name__ == "__main__":
    main()
