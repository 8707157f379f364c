"""Hi-Merging's resolution variants on a zoo pair: the paper's unchecked rule against the verified rule (accept_z 0, 1,
2), with and without the layer-scale refinement; validation and test mean gain kept, and the evaluations each spent.

Choosing among them: the verified rule raises validation by construction, so a lower accept_z always looks at least
as good on validation; the table shows test beside it to say whether that holds out, and the defaults are argued
from validation (the cost of a step taken on noise) rather than picked on test.

Usage: python bench/bench_resolution.py [--zoo DIR] [--results FILE]   (resumable: finished variants are kept in
FILE, default bench/results/resolution.json; the evaluation cache is shared, so the analysis runs once)."""
import argparse, json, tempfile, time
from pathlib import Path

VARIANTS = {
    "paper": dict(resolution="paper"),
    "verified z=0": dict(resolution="verified", accept_z=0.0),
    "verified z=1 (default)": dict(resolution="verified", accept_z=1.0),
    "verified z=2": dict(resolution="verified", accept_z=2.0),
    "verified z=1 + layer_scale": dict(resolution="verified", accept_z=1.0, refine="layer_scale"),
    "verified z=2 + layer_scale": dict(resolution="verified", accept_z=2.0, refine="layer_scale"),
}


def mean_gain_kept(scores: dict, sources: list) -> float:
    from himerge.gains import mean_gain_kept as kept
    owner = {s["task"]: scores["sources"][s["name"]] for s in sources}
    return kept(scores["merged"], scores["base"], owner)


def run_variant(config: dict, options: dict, root: Path, cache: Path) -> dict:
    from himerge.merge import merge
    cfg = {**config, "options": {**config["options"], **options, "test_scores": True, "cache_dir": str(cache)}}
    t0 = time.perf_counter()
    result = merge(cfg, out=root / "out", force=True, progress=False)
    rep = result.report
    return dict(validation=mean_gain_kept(rep["scores"]["validation"], rep["sources"]),
                test=mean_gain_kept(rep["scores"]["test"], rep["sources"]),
                resolution_evaluations=rep["resolution"]["evaluations"], seconds=time.perf_counter() - t0,
                decisions=[d["action"] for d in rep["decisions"] if d.get("taken", True)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "resolution.json"))
    args = ap.parse_args()
    from himerge.zoo import demo_config
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    root = Path(tempfile.mkdtemp(prefix="himerge-bench-resolution-"))
    cache = results_path.parent / "resolution-cache"
    config = demo_config(root / "out")
    for name, options in VARIANTS.items():
        if name in results: continue
        results[name] = run_variant(config, options, root, cache)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = results_path.with_suffix(".tmp"); tmp.write_text(json.dumps(results, indent=1)); tmp.replace(results_path)
    if "tuned task_arithmetic" not in results:   # the baseline to beat: λ chosen on validation, as in 09a
        from himerge.compare import compare_methods
        cfg = {**config, "options": {**config["options"], "cache_dir": str(cache)}}
        t0 = time.perf_counter()
        comparison = compare_methods(cfg, methods=["task_arithmetic"], out_root=root / "compare")
        row = {split: float(t.loc["task_arithmetic", "mean gain kept"]) for split, t in comparison.tables.items()}
        results["tuned task_arithmetic"] = dict(validation=row["validation"], test=row["test"],
                                                resolution_evaluations=0, seconds=time.perf_counter() - t0,
                                                chosen=comparison.chosen, decisions=[])
        tmp = results_path.with_suffix(".tmp"); tmp.write_text(json.dumps(results, indent=1)); tmp.replace(results_path)
    print(f"{'variant':28} {'val gain kept':>13} {'test gain kept':>14} {'resolution evals':>16}  steps taken")
    for name, r in results.items():
        print(f"{name:28} {r['validation']:13.3f} {r['test']:14.3f} {r['resolution_evaluations']:16d}  "
              f"{len(r['decisions'])}")


if __name__ == "__main__":
    main()
