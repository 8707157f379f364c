"""The cost of Hi-Merging's contribution analysis on the real zoo, measured, and projected to a 7B model on GPUs.

One pair of the real zoo (`himerge zoo build --real`: LoRA adapters of SmolLM2-135M-Instruct, 30 blocks; by default
third, multiple choice with four choices, and reverse, generative, scored by ROUGE-L) is merged by Hi-Merging with
the paper's resolution rule and no decision scores, so that the method's time is its contribution analysis (plus a
resolution that scores nothing). The same merge runs twice, each with a fresh evaluation cache so that nothing is
served from an earlier run: as one process, then as two gloo processes under torchrun (1 thread each). LightEval is
imported before the merge starts in both, so that the method's time is the probes' alone.

Printed:
- evaluations: planned (by stage) and run, against the formula (sources + tasks) x (2 x blocks + 1) + tasks;
- seconds per evaluation and per row for the multiple-choice task and for the generative task (from the cache's
  records: every evaluation stores its seconds), split by probe kind;
- the share of block passes that prefix reuse skipped (it serves log-likelihood batches: the multiple-choice task);
- wall time of the method on 1 and on 2 processes, and the load average while each ran;
- a profile of the generative evaluations of the 1-process run (hooks on the model's forward): the share of their time
  in the prompt's pass (prefill) and in the decoding steps, and the most a reuse of the prompt's KV cache below the
  edited layer could save;
- the projection to a 7B / 32-block model on one GPU and on 8, with its formula and assumptions.

Run: nice -n 15 python bench/bench_real_cost.py [--zoo DIR] [--pair third reverse] [--limit 8] [--processes 1 2]
     (--limit: rows per task; the real zoo's validation split has 64)
"""
import argparse, json, os, subprocess, sys, tempfile, time
from collections import defaultdict
from pathlib import Path

import yaml

HERE = Path(__file__).resolve()
PROFILE_ENV = "HIMERGE_BENCH_PROFILE"      # set in a child: where it writes its forward profile (JSON)


# ---------------------------------------------------------------- the child: a merge, LightEval imported first
def _install_profile(path: str):
    "Time every forward of the model during each task evaluation: per task, prefill (many tokens) and decode (one)."
    import torch
    from himerge.evaluate import Evaluator
    stats = defaultdict(lambda: defaultdict(float))
    score = Evaluator.score

    def timed_score(self, task):
        s, kind, started = stats[task], self.tasks[task].type, []
        def pre(_, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            started.append((time.perf_counter(), time.process_time(), ids))
        def post(_, args, kwargs, out):
            t0, c0, ids = started.pop()
            if ids is None or not torch.is_tensor(ids): return
            phase = "decode" if ids.shape[-1] == 1 and kind == "generative" else "prefill"
            s[f"{phase}_s"] += time.perf_counter() - t0; s[f"{phase}_cpu_s"] += time.process_time() - c0
            s[f"{phase}_calls"] += 1; s[f"{phase}_tokens"] += ids.numel()
        hooks = [self.model.register_forward_pre_hook(pre, with_kwargs=True),
                 self.model.register_forward_hook(post, with_kwargs=True)]
        start, cpu = time.perf_counter(), time.process_time()
        try: result = score(self, task)
        finally:
            for h in hooks: h.remove()
        s["evaluations"] += 1; s["score_s"] += time.perf_counter() - start; s["rows"] += result.n
        s["score_cpu_s"] += time.process_time() - cpu      # this process's CPU: the load's waits left out
        s["type"] = kind
        Path(path).write_text(json.dumps(stats, indent=1))   # after each evaluation: a stopped run keeps its profile
        return result

    Evaluator.score = timed_score


def child(argv: list) -> int:
    import torch
    grad = torch.is_grad_enabled()
    import lighteval.metrics, lighteval.models.transformers.transformers_model  # noqa: F401  (warm start)
    torch.set_grad_enabled(grad)         # LightEval's model module switches grad off globally
    if os.environ.get(PROFILE_ENV): _install_profile(os.environ[PROFILE_ENV])
    from himerge.cli import main
    return main(argv)


# ---------------------------------------------------------------- the parent: configs, runs, figures
def adapter_on_blocks(adapter: Path, blocks: list, out: Path, base: str) -> Path:
    """A copy of the LoRA adapter folder `adapter` that keeps only the tensors of `blocks` (the model keeps its depth),
    naming `base` as its base (the original's relative path does not resolve from the copy)."""
    from safetensors.torch import load_file, save_file
    out.mkdir(parents=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}, indent=1))
    tensors = load_file(adapter / "adapter_model.safetensors")
    keep = {k: v for k, v in tensors.items() if any(f".layers.{b}." in k for b in blocks)}
    save_file(keep, out / "adapter_model.safetensors")
    return out


def merge_config(zoo, pair: list, limit: int, out: Path, cache: Path, blocks: list | None = None) -> dict:
    """bench_real's merge config of `pair`, as Hi-Merging whose method time is its contribution analysis; with
    `blocks`, of adapters cut to those blocks (fewer probes; each probe still runs the model's every block)."""
    sys.path.insert(0, str(HERE.parent))
    from bench_real import merge_config as real_config
    cfg = real_config(zoo, pair)
    if blocks:
        for s in cfg["sources"]:
            s["path"] = str(adapter_on_blocks(Path(s["path"]), blocks, out.parent / "adapters" / s["name"],
                                                cfg["base"]))
    for spec in cfg["tasks"].values(): spec["limit"] = limit
    cfg.update(method="hi-merging", output=str(out))
    cfg["options"].update(test_scores=False, cache_dir=str(cache), resolution="paper", score_decisions=False)
    return cfg


def run_merge(processes: int, cfg: dict, folder: Path, profile: Path | None) -> dict:
    "Run the merge `cfg` on `processes` processes; its report, the command's wall seconds, the load around it."
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg"}
    env.pop(PROFILE_ENV, None)
    if profile is not None: env[PROFILE_ENV] = str(profile)
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd = launch + [str(HERE), "--child", "merge", str(path), "--quiet"]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    if proc.returncode: raise SystemExit(f"the {processes}-process merge failed:\n{proc.stderr[-3000:]}")
    report = json.loads((Path(cfg["output"]) / "himerge_report.json").read_text())
    return dict(report=report, wall_s=wall, load=(load0, load1))


def cache_records(cache: Path) -> list:
    "Every evaluation record of a cache folder (each stores its task, probe kind and seconds)."
    from himerge.cache import DamagedRecord, read_record
    out = []
    for p in cache.rglob("*.json"):
        try: out.append(read_record(p))
        except DamagedRecord: continue
    return out


def per_evaluation(records: list, types: dict, rows: int) -> dict:
    "task type -> {kind or 'all': (evaluations, mean seconds)} of the records, and per row."
    by = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[types[r["task"]]][r.get("probe", "full")].append(r["seconds"])
        by[types[r["task"]]]["all"].append(r["seconds"])
    return {t: {k: (len(v), sum(v) / len(v)) for k, v in kinds.items()} for t, kinds in by.items()}


def analysis_evaluations(sources: int, tasks: int, blocks: int) -> int:
    "Hi-Merging's contribution analysis, as its plan counts it: every (state, task) pair, full and per block."
    return (sources + tasks) * (2 * blocks + 1) + tasks


def show_measured(res: dict, limit: int, types: dict, n_blocks: int, profile: dict):
    "Evaluations, seconds per evaluation by task type, the prefix reuse's skip share and the wall time of each run."
    one = res[min(res)]
    ev = one["report"]["evaluations"]
    print(f"\nevaluations: planned {ev['planned']}, run {ev['done']}, served from the cache {ev['reused']}; the "
          f"contribution analysis is (2 + 2) x (2 x {n_blocks} + 1) + 2 = {analysis_evaluations(2, 2, n_blocks)} "
          f"of them (with all 30 blocks: {analysis_evaluations(2, 2, 30)})")
    print(f"seconds per evaluation ({limit} rows per task, 1 process; wall under the machine's load, and this "
          f"process's CPU seconds):")
    full = 0.0
    for t, kinds in one["per_eval"].items():
        n, mean = kinds["all"]
        cpu = next((s["score_cpu_s"] / s["evaluations"] for s in profile.values() if s.get("type") == t), None)
        parts = ", ".join(f"{k} {v[0]} x {v[1]:.2f} s" for k, v in kinds.items() if k != "all")
        print(f"  {t:16s} {n:4d} evaluations, wall {mean:.2f} s each" +
              (f", CPU {cpu:.2f} s each ({cpu / limit * 1000:.0f} ms per row)" if cpu is not None else "") +
              f"  (wall by probe kind: {parts})")
        if cpu is not None: full += cpu * n / (ev["done"] or 1) * analysis_evaluations(2, 2, 30)
    bp = ev.get("block_passes")
    if bp:
        skipped = bp["skipped"] / max(bp["run"] + bp["skipped"], 1)
        print(f"block passes (log-likelihood batches, prefix reuse): run {bp['run']}, skipped {bp['skipped']}: "
              f"{skipped:.1%} skipped")
    for n, r in sorted(res.items()):
        t = r["report"]["timings"]
        print(f"{n} process{'es' if n > 1 else ''}: method (analysis + resolution) {t['method_s']:.1f} s wall, "
              f"command {r['wall_s']:.1f} s, load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}")
    if 1 in res and 2 in res:
        print(f"2 processes / 1 process (method time, under that load): "
              f"{res[2]['report']['timings']['method_s'] / res[1]['report']['timings']['method_s']:.2f}x")
    if full:
        print(f"the full analysis (all 30 blocks, {analysis_evaluations(2, 2, 30)} evaluations) on one idle core, "
              f"from the CPU seconds above: about {full / 60:.1f} min at {limit} rows per task, "
              f"{full * 64 / limit / 60:.0f} min at the split's 64 (rows scale the time about linearly)")


def show_profile(profile: dict, skip_share: float | None):
    "The prompt's pass against the decoding steps in generative evaluations, and the most KV reuse could save."
    print("\ngenerative evaluations, 1 process (forward hooks):")
    for task, s in profile.items():
        if s.get("type") != "generative": continue
        total = s["score_s"]
        pre, dec = s.get("prefill_s", 0.0), s.get("decode_s", 0.0)
        rest = total - pre - dec
        print(f"  {task}: {int(s['evaluations'])} evaluations, {total:.1f} s: prompt pass {pre:.1f} s "
              f"({pre / total:.1%}), decoding steps {dec:.1f} s ({dec / total:.1%}, "
              f"{s.get('decode_calls', 0) / s['evaluations']:.1f} steps per evaluation), the rest (generate's "
              f"loop, stop checks, metric) {rest:.1f} s ({rest / total:.1%})")
        print(f"    prompt tokens per row {s['prefill_tokens'] / s['rows']:.1f} (padded); in CPU seconds: prompt "
              f"pass {s.get('prefill_cpu_s', 0) / s['score_cpu_s']:.1%}, decoding steps "
              f"{s.get('decode_cpu_s', 0) / s['score_cpu_s']:.1%} of {s['score_cpu_s']:.1f} s")
        print(f"    KV reuse below the edited layer saves at most the prompt pass: {pre / total:.1%} of this task's "
              f"time" + (f"; at the prefix reuse's measured skip share ({skip_share:.1%} of block passes), "
                         f"{pre / total * skip_share:.1%}" if skip_share is not None else ""))


# ---------------------------------------------------------------- the projection
GPU = dict(name="H100 SXM", peak_tflops=989.0, mfu=0.4, hbm_tbps=3.35, bw_eff=0.6)


def flops_s_of(gpu: dict) -> float: return gpu["peak_tflops"] * 1e12 * gpu["mfu"]


def project(measured: dict, params: float = 7e9, blocks: int = 32, rows: int = 64, sources: int = 2, tasks: int = 2,
            scaling2: float | None = None) -> dict:
    """Seconds of the contribution analysis of a `params` model with `blocks` blocks on one GPU and on 8.

    Per row, a forward over t tokens costs 2 x params x t FLOPs, run at `mfu` of the GPU's bf16 peak; a decoding step
    of a batch also reads every weight once (2 bytes each) at `bw_eff` of the memory bandwidth, and takes the larger
    of the two. Multiple-choice rows are one pass over prompt and choices (measured tokens per row), of which the
    prefix reuse skips `skip` (the measured share of block passes); generative rows are one prompt pass and the
    measured decoding steps per evaluation, all rows of an evaluation in one batch. Each evaluation also pays the
    fixed cost measured here outside the model's forward (LightEval's bookkeeping, generate's loop, the metric)."""
    g = GPU
    flops_s = flops_s_of(g)
    step_floor = 2 * params / (g["hbm_tbps"] * 1e12 * g["bw_eff"])
    ev = analysis_evaluations(sources, tasks, blocks)
    mc_share = measured["mc_evaluations"] / max(measured["mc_evaluations"] + measured["gen_evaluations"], 1)
    ev_mc, ev_gen = ev * mc_share, ev * (1 - mc_share)
    t_mc = rows * 2 * params * measured["mc_tokens_per_row"] / flops_s * (1 - measured["skip"])
    t_prompt = rows * 2 * params * measured["gen_prompt_tokens_per_row"] / flops_s
    t_steps = measured["gen_steps"] * max(step_floor, rows * 2 * params / flops_s)
    one = ev_mc * t_mc + ev_gen * (t_prompt + t_steps) + ev * measured["overhead_s"]
    serial = None if scaling2 is None else max(0.0, 2 * scaling2 - 1)   # Amdahl, from T2 / T1 = f + (1 - f) / 2
    return dict(evaluations=ev, ev_mc=ev_mc, ev_gen=ev_gen, t_mc=t_mc, t_prompt=t_prompt, t_steps=t_steps,
                one_gpu_s=one, eight_ideal_s=one / 8,
                eight_amdahl_s=None if serial is None else one * (serial + (1 - serial) / 8), serial=serial)


def show_projection(measured: dict, scaling2: float | None, rows_list=(64, 1000)):
    g = GPU
    print(f"\nprojection to a 7B / 32-block model, contribution analysis of a pair (2 sources, 2 tasks): "
          f"{analysis_evaluations(2, 2, 32)} evaluations = (2 + 2) x (2 x 32 + 1) + 2")
    print(f"  GPU assumed: {g['name']}, {g['peak_tflops']:.0f} TFLOP/s bf16 dense peak at {g['mfu']:.0%} "
          f"utilisation for prompt passes; a decoding step reads the 14 GB of weights at {g['bw_eff']:.0%} of "
          f"{g['hbm_tbps']} TB/s")
    print(f"  per row: 2 x 7e9 x tokens FLOPs; tokens measured on the real zoo: multiple choice "
          f"{measured['mc_tokens_per_row']:.1f} per row (one pass, {measured['skip']:.1%} of its block passes skipped "
          f"by prefix reuse), generative {measured['gen_prompt_tokens_per_row']:.1f} prompt tokens + "
          f"{measured['gen_steps']:.1f} decoding steps per evaluation (measured; at most 16); plus "
          f"{measured['overhead_s']:.3f} s per evaluation outside the forward (measured CPU seconds)")
    print(f"  check: the 135M model reached {measured['cpu_gflops']:.0f} GFLOP/s on one core of this machine "
          f"(CPU seconds of the forwards); a 7B row on the GPU costs a 135M row here x (7e9 / 135e6) x "
          f"({measured['cpu_gflops']:.0f} / {flops_s_of(g) / 1e9:.0f}) GFLOP/s, the same as the FLOP count above")
    for rows in rows_list:
        p = project(measured, rows=rows, scaling2=scaling2)
        amdahl = "" if p["eight_amdahl_s"] is None else \
            f", {p['eight_amdahl_s'] / 60:.1f} min by the measured 2-process scaling (serial share {p['serial']:.2f})"
        print(f"  {rows} rows per task: an MC evaluation {p['t_mc']:.2f} s, a generative one {p['t_prompt']:.2f} s "
              f"prompt + {p['t_steps']:.2f} s decoding; one GPU {p['one_gpu_s'] / 60:.1f} min; 8 GPUs "
              f"{p['eight_ideal_s'] / 60:.1f} min ideal{amdahl}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child": sys.exit(child(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", help="the real zoo (default: himerge zoo build --real's folder)")
    ap.add_argument("--pair", nargs=2, default=["third", "reverse"], help="the two adapters' tasks")
    ap.add_argument("--limit", type=int, default=8, help="rows per task (the validation split has 64)")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time")
    ap.add_argument("--blocks", type=int, nargs="+", help="keep only these blocks' deltas in the adapters (fewer "
                    "probes, each as costly; e.g. 0 6 12 18 24 29 on a loaded machine; default: all 30)")
    ap.add_argument("--scaling2", type=float, help="the 2-process / 1-process time ratio the 8-GPU projection "
                    "extrapolates (default: this run's; on a loaded machine give one measured quietly, e.g. "
                    "bench_distributed's)")
    ap.add_argument("--json", help="write the raw figures to this file (before printing them)")
    ap.add_argument("--replay", help="print the figures of a file --json wrote; run nothing")
    a = ap.parse_args()
    from himerge.real_zoo import default_root
    from himerge.zoo import load_zoo
    zoo = load_zoo(Path(a.zoo) if a.zoo else default_root())
    types = {t: zoo.tasks[t].type for t in a.pair}
    print(f"pair {'+'.join(a.pair)} ({', '.join(f'{t}: {k}' for t, k in types.items())}), {a.limit} rows per task; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if a.replay:
        saved = json.loads(Path(a.replay).read_text())
        res, profile = {int(n): r for n, r in saved["runs"].items()}, saved["profile"]
        a.limit, a.blocks = saved["limit"], saved.get("blocks", a.blocks)
    else:
        res, profile = measure(zoo, a, types)
        if a.json:      # written before anything is printed: the figures of a long run are never lost
            Path(a.json).write_text(json.dumps(dict(limit=a.limit, pair=a.pair, blocks=a.blocks, profile=profile,
                                                    runs=res), indent=1))
    show(res, profile, a.limit, types, len(a.blocks or range(30)), a.scaling2)


def measure(zoo, a, types: dict) -> tuple:
    "Run the merge on each process count, each with a fresh cache: {processes: run}, the 1-process forward profile."
    res, profile = {}, {}
    for n in a.processes:
        with tempfile.TemporaryDirectory(prefix="himerge-real-cost-") as d:
            d = Path(d)
            prof = d / "profile.json" if n == 1 else None
            cfg = merge_config(zoo, a.pair, a.limit, d / "out", d / "cache", a.blocks)
            r = run_merge(n, cfg, d, prof)
            r["per_eval"] = per_evaluation(cache_records(d / "cache"), types, a.limit)
            if prof is not None and prof.is_file(): profile = json.loads(prof.read_text())
            res[n] = r
            print(f"[{time.strftime('%H:%M:%S')}] {n} process(es) done: method "
                  f"{r['report']['timings']['method_s']:.1f} s", flush=True)
    return res, profile


def show(res: dict, profile: dict, limit: int, types: dict, n_blocks: int, scaling2: float | None = None):
    show_measured(res, limit, types, n_blocks, profile)
    first = res[min(res)]
    bp = first["report"]["evaluations"].get("block_passes")
    skip = bp["skipped"] / max(bp["run"] + bp["skipped"], 1) if bp else 0.0
    if profile: show_profile(profile, skip if bp else None)
    else: print("\nno forward profile: the 1-process run was not timed (--processes without 1)")
    mc = next((s for s in profile.values() if s.get("type") == "multiple_choice"), None)
    gen = next((s for s in profile.values() if s.get("type") == "generative"), None)
    if scaling2 is None and 1 in res and 2 in res:
        scaling2 = res[2]["report"]["timings"]["method_s"] / res[1]["report"]["timings"]["method_s"]
    if mc and gen:
        pe = first["per_eval"]
        forward_cpu = mc["prefill_cpu_s"] + gen["prefill_cpu_s"] + gen.get("decode_cpu_s", 0.0)
        tokens = mc["prefill_tokens"] + gen["prefill_tokens"] + gen.get("decode_tokens", 0.0)
        measured = dict(mc_evaluations=pe["multiple_choice"]["all"][0], gen_evaluations=pe["generative"]["all"][0],
                        mc_tokens_per_row=mc["prefill_tokens"] / mc["rows"],
                        gen_prompt_tokens_per_row=gen["prefill_tokens"] / gen["rows"], skip=skip,
                        gen_steps=gen.get("decode_calls", 0.0) / gen["evaluations"],
                        overhead_s=(mc["score_cpu_s"] + gen["score_cpu_s"] - forward_cpu)
                        / (mc["evaluations"] + gen["evaluations"]),
                        # MC rows skip `skip` of their blocks: their FLOPs scaled so
                        cpu_gflops=2 * 135e6 * (tokens - mc["prefill_tokens"] * skip) / forward_cpu / 1e9)
        show_projection(measured, scaling2)

if __name__ == "__main__":
    main()
