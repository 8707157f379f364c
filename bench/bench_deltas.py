"""Benchmark: a task-arithmetic merge of two full fine-tunes of a generated Llama-shaped model, himerge vs mergekit.

Generates a random bf16 base (default about 1e9 parameters) and two fine-tuned variants (base + small noise) as
sharded safetensors in a temporary folder, then runs, each in its own subprocess (one model pass at a time):
  (a) himerge.merge.merge(method="task_arithmetic", dtype="bfloat16"): deltas streamed layer by layer, shards
      written as it goes;
  (b) mergekit 0.1.5 `mergekit-yaml` task_arithmetic (weights 1, no normalisation, float32 maths, bf16 output),
      from its own virtualenv (default /work/venvs/mergekit-prune), CPU, default options.
Prints wall time, CPU time (user + system, and system alone), peak RSS and minor page faults
(resource.getrusage(RUSAGE_CHILDREN) of a wrapper process per run) and the ratios himerge / mergekit (CPU time moves
less than wall time when other processes share the CPUs), then checks that the two merged models agree tensor by
tensor (bf16 rounding).
The two run alternately --rounds times (3 by default: load on a shared machine hits both alike) and the ratios of
the best and of the median runs are printed. With --before DIR, a second himerge source tree (an earlier commit, e.g.
from `git archive`) runs in the same rounds, for a before/after comparison.

    python bench/bench_deltas.py --params 2e8
    python bench/bench_deltas.py --params 1e9 --mergekit /work/venvs/mergekit-prune/bin/mergekit-yaml
    python bench/bench_deltas.py --params 2.7e8 --rounds 5
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

import torch

# Runs the command given on its command line and reports its wall time and the peak RSS of its process tree.
MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    t0 = time.perf_counter()
    rc = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps(dict(rc=rc, wall_s=wall, cpu_s=use.ru_utime + use.ru_stime, system_s=use.ru_stime,
                          peak_rss_mb=use.ru_maxrss / 1024, page_faults=use.ru_minflt)))
""")

HIMERGE_RUN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from himerge.merge import merge
    base, a, b, out = sys.argv[1:5]
    merge(dict(base=base, sources=[a, b], method="task_arithmetic", dtype="bfloat16"), out=out, progress=False)
""")


def llama_shape(params: float) -> dict:
    "A Llama config of about `params` parameters (untied embeddings, GQA 4:1)."
    hidden, inter, heads = (2048, 5632, 16) if params >= 6e8 else (1024, 2816, 8) if params >= 1e8 else (256, 704, 4)
    vocab, kv = 32000, heads // 4
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)


def tensor_shapes(cfg: dict):
    "(name, shape) of every tensor of a LlamaForCausalLM in checkpoint order."
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvd = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kvd, h)
        yield p + "self_attn.v_proj.weight", (kvd, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def generate(root: Path, cfg: dict, shard_bytes: int, seed=0) -> list:
    "Write base/, ft-a/, ft-b/ (bf16 sharded safetensors + index); return the three folders."
    from safetensors.torch import save_file
    dirs = [root / n for n in ("base", "ft-a", "ft-b")]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    shards, current, size = [], [{}, {}, {}], 0
    def flush():
        nonlocal current, size
        if not current[0]: return
        shards.append(current[0].keys())
        fname = f"model-{len(shards):05d}.safetensors"
        for d, part in zip(dirs, current): save_file(part, str(d / fname), metadata={"format": "pt"})
        current, size = [{}, {}, {}], 0
    names = []
    for name, shape in tensor_shapes(cfg):
        base = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        current[0][name] = base.to(torch.bfloat16)
        for part in current[1:]:  # a fine-tune: the base plus a small update
            part[name] = (base + torch.randn(shape, generator=gen) * 0.002).to(torch.bfloat16)
        del base
        names.append(name); size += 2 * torch.Size(shape).numel()
        if size >= shard_bytes: flush()
    flush()
    n = len(shards)
    weight_map = {}
    for k, keys in enumerate(shards, 1):
        for name in keys: weight_map[name] = f"model-{k:05d}-of-{n:05d}.safetensors"
    total = sum(2 * torch.Size(s).numel() for _, s in tensor_shapes(cfg))
    for d in dirs:
        for k in range(1, n + 1): (d / f"model-{k:05d}.safetensors").rename(d / f"model-{k:05d}-of-{n:05d}.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(dict(metadata=dict(total_size=total),
                                                                        weight_map=weight_map)))
    return dirs


def measure(cmd: list, log: Path, env: dict) -> dict:
    "Wall time and peak RSS of `cmd`, run under a fresh wrapper process."
    # Run from the log's folder: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH, so a
    # himerge checkout there would shadow the one asked for (--before).
    out = subprocess.run([sys.executable, "-c", MEASURE, str(log), *cmd], capture_output=True, text=True, env=env,
                         check=True, cwd=log.parent)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0: raise SystemExit(f"{cmd[0]} failed (rc {res['rc']}); its log:\n{log.read_text()[-3000:]}")
    return res


def open_model(folder: Path):
    "name -> (safe_open handle) for a safetensors checkpoint folder."
    from safetensors import safe_open
    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        h = safe_open(str(f), "pt")
        for k in h.keys(): where[k] = h
    return where


def compare(a: Path, b: Path) -> dict:
    "Max abs difference, and the number of elements more than one bf16 step apart, between two merged models."
    ta, tb = open_model(a), open_model(b)
    if set(ta) != set(tb):
        raise SystemExit(f"the outputs hold different tensors: only himerge {sorted(set(ta) - set(tb))[:3]}, "
                         f"only mergekit {sorted(set(tb) - set(ta))[:3]}")
    worst, differ, beyond_ulp, n = 0.0, 0, 0, 0
    for name in ta:
        x, y = ta[name].get_tensor(name).float(), tb[name].get_tensor(name).float()
        assert x.shape == y.shape, name
        d = (x - y).abs()
        worst = max(worst, d.max().item())
        differ += int((d > 0).sum()); n += d.numel()
        ulp = torch.maximum(x.abs(), y.abs()) * 2.0 ** -7  # one bf16 step (8 significant bits)
        beyond_ulp += int((d > ulp + 1e-30).sum())
    return dict(max_abs_diff=worst, elements=n, differing=differ, beyond_one_bf16_step=beyond_ulp)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="approximate parameter count of the generated model")
    ap.add_argument("--mergekit", default="/work/venvs/mergekit-prune/bin/mergekit-yaml",
                    help="mergekit-yaml executable (mergekit 0.1.5 venv)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="input shard size in GB")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both tools")
    ap.add_argument("--workdir", default=None,
                    help="where to generate (default: a temporary folder, removed afterwards); models of the same "
                         "shape already there are reused")
    ap.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    ap.add_argument("--rounds", type=int, default=3, help="alternated runs of each tool")
    ap.add_argument("--before", default=None, help="another himerge source tree, run in the same rounds")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="himerge-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # this checkout's himerge, whatever the working directory
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    try:
        cfg = llama_shape(args.params)
        n_params = sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg))
        t0 = time.perf_counter()
        kept = [root / "models" / n for n in ("base", "ft-a", "ft-b")]
        reuse = args.workdir and all((d / "config.json").exists() for d in kept) and \
            json.loads((kept[0] / "config.json").read_text()) == cfg
        base, a, b = kept if reuse else generate(root / "models", cfg, int(args.shard_gb * 1e9))
        print(f"{'reused' if reuse else 'generated'} {n_params / 1e9:.3f}B-parameter Llama "
              f"(hidden {cfg['hidden_size']}, "
              f"{cfg['num_hidden_layers']} layers), base + 2 fine-tunes, bf16, "
              f"in {time.perf_counter() - t0:.0f} s under {root}", flush=True)

        out_hi, out_mk = root / "out-himerge", root / "out-mergekit"
        (root / "mergekit.yml").write_text(textwrap.dedent(f"""\
            merge_method: task_arithmetic
            base_model: {base}
            models:
              - model: {a}
                parameters: {{weight: 1.0}}
              - model: {b}
                parameters: {{weight: 1.0}}
            parameters: {{normalize: false}}
            dtype: float32
            out_dtype: bfloat16
            """))
        runs = {"himerge": [], "mergekit": [], "before": []}
        show = lambda r, who, x: print(f"round {r + 1}  {who:9}: {x['wall_s']:8.1f} s   CPU {x['cpu_s']:7.1f} s "
                                       f"(system {x['system_s']:5.1f} s)   peak RSS {x['peak_rss_mb']:8.0f} MB   "
                                       f"page faults {x['page_faults']:9d}", flush=True)
        for r in range(args.rounds):
            for out in (out_hi, out_mk, root / "out-before"): shutil.rmtree(out, ignore_errors=True)
            if args.before:
                runs["before"].append(measure([sys.executable, "-c", HIMERGE_RUN, str(base), str(a), str(b),
                                               str(root / "out-before")], root / "before.log",
                                              {**env, "PYTHONPATH": str(Path(args.before).resolve())}))
                show(r, "before", runs["before"][-1])
            runs["himerge"].append(measure([sys.executable, "-c", HIMERGE_RUN, str(base), str(a), str(b),
                                            str(out_hi)], root / "himerge.log", env))
            show(r, "himerge", runs["himerge"][-1])
            runs["mergekit"].append(measure([args.mergekit, str(root / "mergekit.yml"), str(out_mk), "-j",
                                             str(args.threads)], root / "mergekit.log", env))
            show(r, "mergekit", runs["mergekit"][-1])
        for label, f in {"best": min, "median": statistics.median}.items():
            for who in ("himerge", "before") if runs["before"] else ("himerge",):
                ratio = {k: f(x[k] for x in runs[who]) / f(x[k] for x in runs["mergekit"])
                         for k in ("wall_s", "cpu_s", "peak_rss_mb")}
                print(f"ratio {who}/mergekit ({label} of {args.rounds}): time {ratio['wall_s']:.2f}   "
                      f"CPU {ratio['cpu_s']:.2f}   peak RSS {ratio['peak_rss_mb']:.2f}")
        agree = compare(out_hi, out_mk)
        print(f"outputs: max |himerge - mergekit| = {agree['max_abs_diff']:.3g}; {agree['differing']} of "
              f"{agree['elements']} elements differ, {agree['beyond_one_bf16_step']} by more than one bf16 step")
        if agree["beyond_one_bf16_step"]: raise SystemExit("the two merges disagree beyond bf16 rounding")
        print(json.dumps(dict(params=n_params, himerge=runs["himerge"], mergekit=runs["mergekit"], agreement=agree)))
    finally:
        if not args.keep and not args.workdir: shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
