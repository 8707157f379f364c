"""Contribution probes shared by several processes, started by torchrun as a user would (gloo, on this CPU), and the
exchange their results travel by.

The zoo's Hi-Merging with two processes gives the same γ, decisions, scores and written model as one process; a
rank that fails ends the job naming the rank, and the next run resumes from rank 0's cache; an input error is
reported once, not once per rank."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import yaml

from himerge.merge import merge
from himerge.zoo import demo_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def environment(tmp_path, extra_path=None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    if extra_path: env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return env


def config_file(tmp_path, name: str, **options) -> Path:
    cfg = demo_config(tmp_path / name)
    cfg["options"] = {**cfg["options"], "test_scores": False, "cache_dir": str(tmp_path / f"cache-{name}"), **options}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(tmp_path, cfg: Path, out: Path, extra_path=None, timeout=600):
    return subprocess.run(TORCHRUN + ["-m", "himerge", "merge", str(cfg), "--out", str(out), "--quiet"],
                          capture_output=True,
                          text=True, env=environment(tmp_path, extra_path), timeout=timeout, cwd=tmp_path)


def test_two_processes_merge_exactly_as_one(tmp_path):
    single = merge(str(config_file(tmp_path, "single")), out=tmp_path / "one", progress=False).report
    run = launch(tmp_path, config_file(tmp_path, "shared"), tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    shared = json.loads((tmp_path / "two" / "himerge_report.json").read_text())
    for key in ("gamma", "contributions", "classes", "decisions", "scores"):
        assert shared[key] == single[key], key
    two, one = ((tmp_path / folder / "model.safetensors").read_bytes() for folder in ("two", "one"))
    assert two == one
    assert shared["evaluations"]["done"] == single["evaluations"]["done"]     # every evaluation ran once, on some rank
    assert run.stdout.count("merged model written to") == 1                      # rank 0 alone reports


def test_failed_rank_named_and_rerun_resumes(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import himerge.evaluate as e
            score, calls = e.Evaluator.score, [0]
            def failing(self, task):
                calls[0] += 1
                if calls[0] > 6: raise RuntimeError("the GPU fell off the bus")
                return score(self, task)
            e.Evaluator.score = failing
    """))
    cfg = config_file(tmp_path, "flaky")
    failed = launch(tmp_path, cfg, tmp_path / "out", extra_path=hook)
    assert failed.returncode != 0
    assert "rank 1 failed: RuntimeError: the GPU fell off the bus" in failed.stderr
    assert not (tmp_path / "out").exists()
    saved = len(list((tmp_path / "cache-flaky").glob("*/*.json")))
    assert saved > 0                                                             # rank 0 kept what was gathered
    again = merge(str(cfg), out=tmp_path / "out", progress=False).report          # resumed in one process
    assert again["evaluations"]["reused"] >= saved and again["evaluations"]["done"] < again["evaluations"]["planned"]


def test_input_error_reported_once(tmp_path):
    cfg = yaml.safe_load(config_file(tmp_path, "bad").read_text())
    cfg["options"]["batch_size"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = launch(tmp_path, path, tmp_path / "out")
    assert run.returncode != 0
    assert run.stderr.count("options.batch_size") == 1, run.stderr[-2000:]
    # No rank prints a traceback (torchrun itself ends with its own report of the failed exit code).
    assert not any(line.startswith(("[rank0]", "[rank1]")) for line in run.stderr.splitlines()), run.stderr[-2000:]


def test_a_single_process_run_stays_single(tmp_path):
    "Without a launcher, a merge imports no part of himerge's distributed code and starts no process group."
    code = textwrap.dedent(f"""
        import sys, torch.distributed as dist
        from himerge.merge import merge
        from himerge.zoo import load_zoo
        zoo = load_zoo()
        sources = [str(p) for p in list(zoo.adapters.values())[:2]]
        merge(dict(base=str(zoo.base), sources=sources, method="task_arithmetic"),
              out={str(tmp_path / 'out')!r}, progress=False)
        print("distributed module:", "himerge.distributed" in sys.modules, "group:", dist.is_initialized())
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment(tmp_path),
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "distributed module: False group: False" in run.stdout


def _exchange_rank(rank: int, store_path: str, results):
    import time
    import torch.distributed as dist
    from himerge.distributed import Exchange, Group
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        group = Group(rank, 2, rank, "gloo")
        if rank == 1: time.sleep(2.0)                    # rank 1 is busy: rank 0's exchange must not block
        exchange = Exchange(group, {"rank": rank, "scores": [rank] * 3})
        arrived_at_once = exchange.poll()
        gathered = exchange.result()
        again = Exchange(group, rank * 10).result()       # the next exchange keeps the order of the collectives
        results.put((rank, arrived_at_once, gathered, again))
    finally:
        dist.destroy_process_group()


def test_exchange_gathers_without_blocking(tmp_path):
    "Two gloo processes: an exchange returns at once while the other rank is still busy, then gathers both objects."
    import torch.multiprocessing as mp
    context = mp.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_exchange_rank, args=(rank, str(tmp_path / "store"), results)) for rank in (0, 1)]
    for process in ranks: process.start()
    got = dict((rank, rest) for rank, *rest in (results.get(timeout=120) for _ in ranks))
    for process in ranks: process.join(timeout=60)
    assert [process.exitcode for process in ranks] == [0, 0]
    both = [{"rank": 0, "scores": [0, 0, 0]}, {"rank": 1, "scores": [1, 1, 1]}]
    assert got[0] == [False, both, [0, 10]]         # rank 0 had to wait for rank 1: poll said so without waiting
    assert got[1][1:] == [both, [0, 10]]


class _BlockLayers:
    "A tiny model's blocks as layers, read from a copy of its loaded weights."
    def __init__(self, model):
        self.weights = {k: v.clone() for k, v in model.state_dict().items()}
        self.layers = [0, 1, 2]

    def base_layer(self, layer):
        return {k: v for k, v in self.weights.items() if k.startswith(f"model.layers.{layer}.")}


class _BlockMeans:
    "Per-sample scores: the mean q-projection weight of each block (any wrong weight shows); `pause` s per call."
    def __init__(self, model, pause: float):
        self.model, self.pause, self.calls = model, pause, 0

    def score(self, task):
        import time
        self.calls += 1
        time.sleep(self.pause)
        layers = self.model.model.layers
        per = [block.self_attn.q_proj.weight.float().mean().item() + (task == "qa") for block in layers]
        return type("TaskScore", (), {"per_sample": per})()


def _block_scoring(rank: int | None, store_path: str | None = None, results=None):
    "Score three states' probes on two tasks: alone (rank None), or as one of two gloo ranks, rank 1 slow."
    import torch
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from himerge.distributed import Group
    from himerge.scoring import Probe, Scorer, State
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    name = "model.layers.{}.self_attn.q_proj.weight"
    shape = model.model.layers[0].self_attn.q_proj.weight.shape
    states = [State(f"source:{s}", lambda layer, s=s: {name.format(layer): torch.full(shape, s + 1.0)}, {"s": s})
              for s in range(3)]
    requests = [(Probe(state, kind, layer), ["mc", "qa"], "validation")
                for state in states for kind in ("add", "delete") for layer in range(3)]
    group = None
    if rank is not None:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
        group = Group(rank, 2, rank, "gloo")
    try:
        evaluator = _BlockMeans(model, pause=0.1 if rank == 1 else 0.0)
        scorer = Scorer(model, _BlockLayers(model), lambda split: evaluator, group=group)
        scores = [{task: values.tolist() for task, values in result.items()} for result in scorer.run(requests)]
        out = (scores, scorer.cache.done, evaluator.calls)
        if results is None: return out
        results.put((rank, *out))
    finally:
        if rank is not None: dist.destroy_process_group()


def test_shared_scoring_with_a_slow_rank_matches_one_process(tmp_path):
    """Rank 1 takes 0.1 s an evaluation, rank 0 none: rank 0 runs ahead of its promises and takes rank 1's work, and
    every score is still the single process's, each counted once in rank 0's cache."""
    import torch.multiprocessing as mp
    alone, alone_done, _ = _block_scoring(None)
    context = mp.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_block_scoring, args=(rank, str(tmp_path / "store"), results)) for rank in (0, 1)]
    for process in ranks: process.start()
    got = {rank: rest for rank, *rest in (results.get(timeout=300) for _ in ranks)}
    for process in ranks: process.join(timeout=60)
    assert [process.exitcode for process in ranks] == [0, 0]
    for rank in (0, 1):
        assert got[rank][0] == alone, rank
    assert got[0][1] == alone_done == 36                   # 18 probes × 2 tasks, each stored once by rank 0
    assert got[0][2] > got[1][2]                           # the fast rank scored more than the slow one
