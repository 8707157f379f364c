"""Contribution probes shared by several processes, started by torchrun as a user would (gloo, on this CPU), and the
exchange their results travel by.

The zoo's Hi-Merging with two processes gives the same γ, decisions, scores and written model as one process; a
rank that fails ends the job naming the rank, and the next run resumes from rank 0's cache; an input error is
reported once, not once per rank."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import yaml

from himerge.merge import demo_config, merge

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
