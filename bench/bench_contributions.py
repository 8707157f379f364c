"""Contribution analysis on the zoo: how much of each probe is overhead, and the speed-up over reload-per-probe.

(a) A full contribution analysis of two zoo sources, in place (model loaded once, layers edited and restored).
    Forward hooks time the model's forward passes; everything else in a probe is overhead: edit and restore,
    layer reads, LightEval's batching and response building, transformers' generation loop around the forward
    passes, the metric, the cache. Printed as a share of probe time, split into engine (outside the evaluator)
    and evaluator. The same analysis runs first with LightEval's stock scoring methods and no layer memo
    (`fast_paths=False, memo_bytes=0`), the peer (a0), so the ratio between them is measured in the same run.
    Both run after a warm-up (imports and first calls), as in a long analysis where one-time costs vanish.
(b) The paper's scripts' way, on a subset of layers in the same run: every probe's weights are saved to disk, then
    scored from a fresh load: (b1) in this process, with a fresh LightEval evaluator; (b2) in a new Python process
    per probe, as the paper's scripts ran a LightEval job per saved model. Printed per evaluation, with the ratios.

Targets (issue #6): overhead < 15 % of probe time; in-place >= 5x faster than reload-per-probe.
Run: python bench/bench_contributions.py [--reload-layers 2] [--threads 2]
"""
import argparse, subprocess, sys, tempfile, time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reload-layers", type=int, default=2, help="layers probed the reload-per-probe way")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from himerge.zoo import load_zoo
    from himerge.sources import resolve_sources
    from himerge.deltas import compute_deltas
    from himerge.prune import ProcessedDeltas
    from himerge.evaluate import Evaluator
    from himerge.cache import EvalCache
    from himerge.contributions import ContributionAnalysis, LayerMemo, MemoDeltas, states_for
    from himerge.zoo import demo_config
    from himerge.loading import load_model
    from himerge.scoring import Scorer
    from transformers import AutoTokenizer

    cfg = demo_config()
    zoo = load_zoo()
    tasks = {s["task"]: zoo.tasks[s["task"]] for s in cfg["sources"]}
    names, src_tasks = [s["name"] for s in cfg["sources"]], [s["task"] for s in cfg["sources"]]
    sset = resolve_sources([s["path"] for s in cfg["sources"]], base=cfg["base"])
    deltas = compute_deltas(sset)
    processed = ProcessedDeltas(deltas, density=[1.0] * len(names), scale=[1.0] * len(names))

    # (a0) the peer: LightEval's stock scoring methods, no layer memo; (a) as shipped. Same model, same cache-less run.
    model = load_model(sset.base.path)

    def analyse(fast: bool):
        evaluator = Evaluator(model, sset.base.path, tasks, fast_paths=fast)
        forward, inside = [0.0], [0.0]
        score = evaluator.score
        def timed_score(task):
            s = score(task)
            forward[0] += s.model_seconds; inside[0] += s.seconds
            return s
        evaluator.score = timed_score
        with tempfile.TemporaryDirectory() as d:
            memo = 2**30 if fast else 0
            scorer = Scorer(model, MemoDeltas(deltas, LayerMemo(memo)), lambda split: evaluator, cache=EvalCache(d))
            analysis = ContributionAnalysis(scorer, processed, names, src_tasks, memo_bytes=memo)
            t0 = time.perf_counter()
            result = analysis.run()
            total = time.perf_counter() - t0
        evaluator.close()
        n = result.evaluations["done"]
        return dict(n=n, total=total, per_eval=total / n, overhead=1 - forward[0] / total,
                    engine=(total - inside[0]) / total, evaluator=(inside[0] - forward[0]) / total,
                    gamma=result.gamma.gamma.values)

    # Warm-up, so that neither run pays the one-time costs (imports, first calls): a layer read, a score per task.
    processed.source_layer(0, processed.layers[0])
    for fast in (False, True):
        with Evaluator(model, sset.base.path, tasks, fast_paths=fast) as ev: ev.score_all()

    runs = {}
    for label, fast in (("a0", False), ("a", True)):
        r = runs[label] = analyse(fast)
        what = "LightEval's stock methods, no layer memo (peer)" if label == "a0" else "in place, as shipped"
        print(f"({label}) {what}: {r['n']} evaluations in {r['total']:.1f} s, {r['per_eval'] * 1000:.0f} ms per "
              f"evaluation; overhead {r['overhead']:.1%} of probe time "
              f"(engine {r['engine']:.1%}, evaluator {r['evaluator']:.1%})")
    assert (runs["a"]["gamma"] == runs["a0"]["gamma"]).all(), "the fast paths changed γ"
    in_place, overhead = runs["a"]["per_eval"], runs["a"]["overhead"]
    print(f"overhead {overhead:.1%} (target < 15%); "
          f"time per evaluation {in_place / runs['a0']['per_eval']:.2f}x the peer's; γ identical")

    # (b) reload per probe: addition probes of source 0 on a few layers. Each probe's weights are written to
    # disk and scored from a fresh load: (b1) in this process with a fresh evaluator, (b2) in a new process
    # per probe, as the paper's scripts ran a LightEval job per saved model.
    state = states_for(processed, names)[0]
    state_tasks = [src_tasks[0]]
    layers = [layer for layer in processed.layers if isinstance(layer, int)][: args.reload_layers]
    score_code = ("import sys, torch; torch.set_num_threads(%d)\n"
                  "from himerge.zoo import load_zoo\n"
                  "from himerge.loading import load_model\n"
                  "from himerge.evaluate import Evaluator\n"
                  "z = load_zoo(); t = sys.argv[2]\n"
                  "print(Evaluator(load_model(sys.argv[1]), sys.argv[1], {t: z.tasks[t]}).score(t).score)"
                  ) % args.threads
    timings = {"b1": [], "b2": []}
    with tempfile.TemporaryDirectory() as d:
        for layer in layers:
            fresh = load_model(sset.base.path)
            sd = fresh.state_dict()
            with torch.no_grad():
                for name, v in state.layer_delta(layer).items(): sd[name].add_(v)
            fresh.save_pretrained(d); AutoTokenizer.from_pretrained(sset.base.path).save_pretrained(d)
            del fresh
            for t in state_tasks:
                t0 = time.perf_counter()
                ev = Evaluator(load_model(d), d, {t: tasks[t]}); ev.score(t); ev.close()
                timings["b1"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", score_code, d, t], check=True, capture_output=True)
                timings["b2"].append(time.perf_counter() - t0)
    b1, b2 = (sum(v) / len(v) for v in (timings["b1"], timings["b2"]))
    print(f"(b1) reload from disk per probe, same process: {len(timings['b1'])} evaluations, "
          f"{b1 * 1000:.0f} ms per evaluation")
    print(f"(b2) new process per probe (the paper's scripts): {len(timings['b2'])} evaluations, "
          f"{b2 * 1000:.0f} ms per evaluation")
    print(f"speed-up of in-place probing: {b1 / in_place:.1f}x over (b1), {b2 / in_place:.1f}x over (b2) "
          "(target >= 5x)")
    print(f"ratios: overhead_share={overhead:.3f} peer_overhead_share={runs['a0']['overhead']:.3f} "
          f"time_vs_peer={in_place / runs['a0']['per_eval']:.2f} speedup_b1={b1 / in_place:.2f} "
          f"speedup_b2={b2 / in_place:.2f}")


if __name__ == "__main__":
    main()
