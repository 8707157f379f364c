"""Real scale on one CPU machine: a 24-block ~0.36B Llama stored in bf16, two LoRA sources on a few blocks.

Each configuration runs `himerge merge` (Hi-Merging, two tasks of the zoo's data on a few rows) in its own process,
which reports its peak RSS after its imports (the peak is reset once they are done: importing LightEval peaks far
above what it keeps, and would hide the merge's own peak). Printed:
- peak RSS above the process's RSS after its imports (LightEval's metric and model modules included, which
  `import lighteval` leaves to the first evaluation: about 0.38 GB), as a multiple of the bf16 base's bytes, and the
  same counting those modules as the merge's, for compute_dtype
  auto (float32 computed module by module on CPU) and bfloat16. Targets (issue #15): <= 2.0x with auto, <= 1.3x
  with bfloat16;
- seconds per evaluation of each configuration;
- that the merged output of the bfloat16 run loads with AutoModelForCausalLM.from_pretrained;
- with --before PATH (a checkout of an earlier himerge), the same run with that code, for the before figure.

Run: python bench/bench_scale.py [--blocks 24] [--rows 12] [--before /path/to/old/checkout]
"""
import argparse, json, os, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

CHILD = textwrap.dedent('''
    import json, resource, sys, time
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    import transformers, lighteval, himerge.evaluate, himerge.merge
    import gc; gc.collect()
    status = lambda key: int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith(key))) * 1024
    before_metrics = status("VmRSS:")
    # LightEval's metric and model modules (nltk, sacrebleu, ...), which `import lighteval` leaves out and the first
    # evaluation imports: imports too, whose memory is no part of the merge's.
    getattr(himerge.evaluate, "import_lighteval", lambda: __import__("lighteval.metrics"))(); gc.collect()
    # Importing LightEval peaks far above what it keeps: reset the peak (Linux clear_refs 5) so that the figure is
    # the merge's own peak above the memory the imports hold.
    with open("/proc/self/clear_refs", "w") as f: f.write("5")
    mode, config = sys.argv[1], sys.argv[2]
    out = {"after_imports": status("VmRSS:"), "before_metric_imports": before_metrics}
    if mode == "merge":
        from himerge.merge import merge
        t0 = time.perf_counter()
        result = merge(config, force=True, progress=False)
        out.update(seconds=time.perf_counter() - t0, evaluations=result.report["evaluations"],
                   timings=result.report.get("timings", {}), output=str(result.output))
    out["peak_rss"] = status("VmHWM:")            # the peak since the reset
    out["import_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))
''')


def build(root: Path, blocks: int, rows: int):
    "The bf16 base (random weights, the zoo's tokenizer), two LoRA adapters on a few blocks, and two tasks' data."
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    from himerge.zoo import load_zoo
    zoo = load_zoo()
    tok = AutoTokenizer.from_pretrained(zoo.base)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=blocks,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base.save_pretrained(root / "base"); tok.save_pretrained(root / "base")
    chosen = sorted({round(i * (blocks - 1) / 3) for i in range(4)})          # four blocks spread over the depth
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for k in range(2):
        torch.manual_seed(k + 1)
        peft = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16),
                              LoraConfig(r=8, lora_alpha=16, target_modules=modules, layers_to_transform=chosen))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n: p.normal_(0, 0.02)
        peft.save_pretrained(root / f"lora{k}")
    tasks = {}
    for t in zoo.demo_tasks:
        folder = root / "data" / t
        folder.mkdir(parents=True)
        for split in ("validation", "test"):
            lines = (zoo.data[t] / f"{split}.jsonl").read_text().splitlines()[:rows]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        tasks[t] = {**zoo.tasks[t].to_dict(), "data": str(folder), "limit": rows}
    size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    return tasks, chosen, size, sum(p.numel() for p in base.parameters())


def config(root: Path, tasks: dict, compute: str, out: str) -> Path:
    import yaml
    path = root / f"merge-{out}.yaml"
    path.write_text(yaml.safe_dump(dict(
        base=str(root / "base"),
        sources=[dict(path=str(root / f"lora{k}"), task=t, name=f"s{k}") for k, t in enumerate(tasks)],
        tasks=tasks, method="hi-merging", dtype="bfloat16", output=str(root / out),
        options=dict(normalize="none", compute_dtype=compute, cache_dir=str(root / f"cache-{out}"), batch_size=16))))
    return path


def run(mode: str, cfg: Path, threads: int, pythonpath: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    if pythonpath: env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(cfg), str(threads)], capture_output=True, text=True,
                          env=env, cwd=pythonpath or None)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None: raise RuntimeError(f"{mode} {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def old_config(path: Path) -> Path:
    "The same config for the code before this issue: no compute_dtype option (it always built a float32 model)."
    import yaml
    d = yaml.safe_load(path.read_text())
    d["options"].pop("compute_dtype")
    out = path.with_name(path.stem + "-before.yaml")
    out.write_text(yaml.safe_dump(d))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--rows", type=int, default=12, help="rows per task and split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", help="a checkout of an earlier himerge to measure the same run with")
    ap.add_argument("--workdir", help="keep the generated model and outputs here")
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="himerge-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tasks, blocks, base_bytes, n_params = build(root, args.blocks, args.rows)
    print(f"base: {args.blocks} blocks, {n_params / 1e9:.3f}B parameters, {base_bytes / 1e6:.0f} MB in bf16; "
          f"LoRA sources on blocks {blocks}; built in {time.perf_counter() - t0:.0f} s")
    baseline = run("imports", root / "none", args.threads)
    imports = baseline["after_imports"]
    print(f"imports-only process: RSS {imports / 1e6:.0f} MB after the imports (their transient peak: "
          f"{baseline['import_peak_rss'] / 1e6:.0f} MB)")
    results = {}
    runs = [("auto", "compute_dtype auto (float32 on CPU, module by module)", None),
            ("bfloat16", "compute_dtype bfloat16", None)]
    if args.before: runs.append(("before", f"before: {args.before}", args.before))
    for key, label, path in runs:
        cfg = config(root, tasks, "auto" if key == "before" else key, f"out-{key}")
        if path: cfg = old_config(cfg)
        r = results[key] = run("merge", cfg, args.threads, path)
        above = (r["peak_rss"] - r["after_imports"]) / base_bytes
        metrics = (r["after_imports"] - r.get("before_metric_imports", r["after_imports"])) / base_bytes
        ev = r["evaluations"]["done"]
        print(f"{label}: peak RSS {r['peak_rss'] / 1e6:.0f} MB, {above:.2f}x the bf16 base above its RSS after "
              f"imports ({above + metrics:.2f}x counting LightEval's metric modules, {metrics:.2f}x, as the "
              f"merge's); "
              f"{ev} evaluations in {r['seconds']:.0f} s ({r['seconds'] / max(ev, 1):.1f} s per evaluation)")
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(results["bfloat16"]["output"])
    print(f"merged output of the bfloat16 run loads with AutoModelForCausalLM.from_pretrained: "
          f"{type(merged).__name__}, {sum(p.numel() for p in merged.parameters()) / 1e9:.3f}B parameters, "
          f"dtype {next(merged.parameters()).dtype}")
    ratio = lambda k: (results[k]["peak_rss"] - results[k]["after_imports"]) / base_bytes
    with_metrics = lambda k: (results[k]["peak_rss"] - results[k].get("before_metric_imports",
                                                                       results[k]["after_imports"])) / base_bytes
    print("ratios: rss_auto={:.2f} (target <= 2.0) rss_bfloat16={:.2f} (target <= 1.3){}; counting LightEval's "
          "metric modules as the merge's: auto {:.2f}, bfloat16 {:.2f}".format(
              ratio("auto"), ratio("bfloat16"), f" rss_before={ratio('before'):.2f}" if "before" in results else "",
              with_metrics("auto"), with_metrics("bfloat16")))


if __name__ == "__main__":
    main()
