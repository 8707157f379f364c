"""A realistic, synthetic merge output directory (the layout 09_merge writes) for the card and push tests.

Built by hand because most card tests need no merge: tiny safetensors weights, config files, a `himerge_report.json`
following the report schema 09_merge writes (`build_report`), the portable `himerge_config.yaml` and a γ heatmap.
Options cover what merges will soon write too: Stage 1 search grids and an adapter output.
"""
from __future__ import annotations
import dataclasses, json
from pathlib import Path

SOURCES = ("arith", "capitals", "antonyms")
TASKS = ("arith", "capitals", "antonyms")
LAYERS = (0, 1)
# task data as the report records it: Hub dataset ids (with or without a revision), and a local folder by its name
DATA = {"arith": ("himerge-zoo/arith-qa@v1", True, "v1"), "capitals": ("himerge-zoo/capitals", True, None),
        "antonyms": ("antonyms", False, None)}
METRIC = {"arith": "loglikelihood_acc", "capitals": "exact_match", "antonyms": "rougeL"}

def _options(method: str) -> tuple:
    "(options, method_options) as build_report writes them: every run option and every option of the method."
    from himerge.config import RunOptions
    from himerge.methods import METHODS
    run = dataclasses.replace(RunOptions(), batch_size=16)           # one run option changed from its default
    own = METHODS[method].options()
    return {**dataclasses.asdict(run), **dataclasses.asdict(own)}, sorted(f.name for f in dataclasses.fields(own))

def fake_report(hi_merging: bool = True, license: str | None = "apache-2.0", adapter: bool = False,
                grids: bool = False) -> dict:
    """A merge report as 09_merge writes it: 3 LoRA sources on a 2-layer base, 3 tasks.

    Args:
        hi_merging: Hi-Merging (with the per-layer analysis) rather than the TIES baseline.
        license: the base's license, or None.
        adapter: the output is a LoRA adapter of the base (`output_format: adapter`).
        grids: with Stage 1 search grids."""
    method = "hi-merging" if hi_merging else "ties"
    base = dict(name="tiny-base", spec="himerge-zoo/tiny-base@main", kind="base", repo_id="himerge-zoo/tiny-base",
                revision="main", commit_sha="a" * 40, license=license)
    sources = [dict(name=n, spec=f"himerge-zoo/lora-{n}@v1", kind="lora", repo_id=f"himerge-zoo/lora-{n}",
                    revision="v1", commit_sha=f"{i + 1}" * 40, task=n, density=0.5 + 0.1 * i, scale=1.0 - 0.1 * i)
               for i, n in enumerate(SOURCES)]
    score = lambda off: {t: round(0.3 + off + 0.05 * j, 4) for j, t in enumerate(TASKS)}
    validation = dict(base=score(0.0), sources={n: score(0.2 + 0.05 * i) for i, n in enumerate(SOURCES)},
                      merged=score(0.18))
    test = dict(base=score(0.01), sources={n: score(0.21) for n in SOURCES}, merged=score(0.15))
    test["merged"]["antonyms"] = 0.3   # below the base's 0.41: the card must flag it
    options, method_options = _options(method)
    report = dict(
        himerge_version="0.1.0", method=method, created="2026-11-23T08:00:00+00:00",
        base=base, sources=sources, options=options, method_options=method_options,
        tasks={t: dict(metric=METRIC[t], data=DATA[t][0], hub=DATA[t][1], revision=DATA[t][2], split="validation",
                       commit_sha=f"{j + 7}" * 40 if DATA[t][1] else None,   # the Hub datasets' commits read
                       type="multiple_choice" if t == "arith" else "generative") for j, t in enumerate(TASKS)},
        scores=dict(validation=validation, test=test),
        evaluations=dict(done=0, reused=0, planned=0), timings=dict(total_s=1.5),
        files=["model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"])
    if hi_merging:
        validation["pre_merge"] = score(0.1)
        test["task_arithmetic"] = score(0.12)
        report["contributions"] = [
            dict(layer=layer, state=st, task=t, alpha=0.1 + 0.01 * layer, beta=0.05, c=0.15 + 0.01 * layer,
                 alpha_se=0.01, beta_se=0.01, c_se=0.02)
            for layer in LAYERS for st in [f"source:{n}" for n in SOURCES] + ["pre_merge"] for t in TASKS]
        report["gamma"] = [dict(layer=layer, source=n, gamma=round(0.1 * (i + 1) - 0.15 * layer, 3), gamma_se=0.03,
                                significant=abs(0.1 * (i + 1) - 0.15 * layer) > 2 * 0.03)
                           for layer in LAYERS for i, n in enumerate(SOURCES)]
        report["classes"] = {"0": "mutual", "1": "severe"}
        report["decisions"] = [dict(order=1, layer=1, **{"class": "severe"}, gamma={n: -0.05 for n in SOURCES},
                                    total_conflict=-0.15, action="kept only capitals", edits={},
                                    score_before={t: 0.6 for t in TASKS}, score_after={t: 0.65 for t in TASKS})]
        report["resolution"] = dict(stopped="no conflicting layer left", evaluations=12)
        report["evaluations"] = dict(done=120, reused=4, planned=124)
        report["files"].append("gamma_heatmap.png")
    if grids:
        report["grids"] = [dict(source=n, task=n, densities=[0.3, 0.5, 1.0], scales=[0.5, 1.0],
                                table=[[0.4, 0.5], [0.45, 0.6 + 0.01 * i], [0.42, 0.55]], best=[0.5, 1.0])
                           for i, n in enumerate(SOURCES)]
    if adapter:
        report["output_format"] = "adapter"
        report["adapter"] = dict(rank=8, exact=False, max_relative_error=0.0123,
                                 tensors=[dict(tensor=f"model.layers.{layer}.mlp.up_proj.weight", rank=8,
                                               kind="svd" if layer else "exact", relative_error=0.0123 * layer)
                                          for layer in LAYERS])
        report["files"] = [f for f in report["files"] if f not in ("model.safetensors", "config.json")]
        report["files"] = ["adapter_model.safetensors", "adapter_config.json"] + report["files"]
    return report

def fake_config(report: dict) -> dict:
    "The portable himerge_config.yaml matching `report` (local paths as folder names, no output, no cache folder)."
    tasks = {t: dict(data=r["data"], type=r["type"], prompt="Q: {question}\nA:", gold_field="answer",
                     metric=r["metric"], **({"choices_field": "choices"} if r["type"] == "multiple_choice" else {}))
             for t, r in report["tasks"].items()}
    return dict(base=report["base"]["spec"],
                sources=[dict(path=s["spec"], task=s["task"], density=s["density"], scale=s["scale"], name=s["name"])
                         for s in report["sources"]],
                tasks=tasks, method=report["method"], options=report["options"], dtype="float32")

def make_fake_output(folder, hi_merging: bool = True, license: str | None = "apache-2.0", heatmap: bool = True,
                     adapter: bool = False, grids: bool = False) -> Path:
    """Write a synthetic merge output into `folder` (created) and return its path.

    Args:
        folder: where to write it.
        hi_merging, license, adapter, grids: as in `fake_report`.
        heatmap: write gamma_heatmap.png (Hi-Merging only)."""
    import numpy as np, yaml
    from safetensors.numpy import save_file
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = {f"model.layers.{layer}.mlp.up_proj.weight": rng.standard_normal((8, 4), dtype=np.float32)
               for layer in LAYERS}
    if adapter:
        save_file({f"base_model.model.{k[:-len('.weight')]}.lora_{ab}.weight": v[:2] if ab == "A" else v[:, :2]
                   for k, v in weights.items() for ab in "AB"}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", r=2, lora_alpha=2,
                                                                    base_model_name_or_path="himerge-zoo/tiny-base",
                                                                    target_modules=["up_proj"])))
    else:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(dict(model_type="llama", num_hidden_layers=len(LAYERS),
                                                            hidden_size=4, intermediate_size=8)))
    (folder / "generation_config.json").write_text(json.dumps(dict(eos_token_id=2)))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(model_max_length=128)))
    report = fake_report(hi_merging, license, adapter=adapter, grids=grids)
    (folder / "himerge_report.json").write_text(json.dumps(report, indent=2))
    config = yaml.safe_dump(fake_config(report), sort_keys=False, allow_unicode=True)
    (folder / "himerge_config.yaml").write_text(config)
    if hi_merging and heatmap:
        import matplotlib; matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(3, 2))
        g = np.array([[r["gamma"] for r in report["gamma"] if r["layer"] == layer] for layer in LAYERS])
        ax.imshow(g, cmap="RdBu"); ax.set_xlabel("source"); ax.set_ylabel("layer")
        fig.savefig(folder / "gamma_heatmap.png", dpi=50); plt.close(fig)
    elif hi_merging:
        report["files"].remove("gamma_heatmap.png")
        (folder / "himerge_report.json").write_text(json.dumps(report, indent=2))
    return folder


def tiny_local_sources(root) -> dict:
    """A random 2-block Qwen2 base and two LoRA adapters of it (every linear module, non-zero B), saved as local
    folders under `root`, each adapter naming its base by absolute path (as a local fine-tune does).
    Returns {"base", "adapter-a", "adapter-b": path}."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from peft import LoraConfig, get_peft_model
    root = Path(root)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "tiny-base")
    paths = {"base": root / "tiny-base"}
    for seed, name in enumerate(("adapter-a", "adapter-b"), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(Qwen2ForCausalLM.from_pretrained(root / "tiny-base"),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n: p.normal_(0, 0.05)
        model.save_pretrained(root / name)
        config_path = root / name / "adapter_config.json"
        config = json.loads(config_path.read_text()); config["base_model_name_or_path"] = str(root / "tiny-base")
        config_path.write_text(json.dumps(config))
        paths[name] = root / name
    return paths

def make_merge_output(root, method: str = "task_arithmetic") -> Path:
    "A REAL merge output: `method` over `tiny_local_sources(root)`, every input a local folder; returns `root/merged`."
    from himerge.merge import merge
    paths = tiny_local_sources(root)
    config = dict(base=str(paths["base"]), method=method, dtype="float32", output=str(Path(root) / "merged"),
                  sources=[dict(path=str(paths[n]), density=0.5, scale=0.9) for n in ("adapter-a", "adapter-b")])
    return merge(config, progress=False).output

def make_zoo_merge_output(root, method: str = "task_arithmetic") -> Path:
    """A REAL, scored merge output from local folders: the zoo's base, two of its LoRA sources and their task data,
    copied under `root`, merged by `method` and scored on validation and test. Returns `root/merged`."""
    import shutil
    from himerge.merge import merge
    from himerge.zoo import load_zoo
    zoo, root = load_zoo(), Path(root)
    picks = zoo.demo_tasks
    shutil.copytree(zoo.base, root / "zoo-base")
    tasks = {}
    for t in picks:
        shutil.copytree(zoo.adapters[t], root / f"lora-{t}")
        shutil.copytree(zoo.tasks[t].data_dir, root / "data" / t)
        tasks[t] = {**zoo.tasks[t].to_dict(), "data": str(root / "data" / t)}
    for t in picks:   # the adapters name the zoo's base in the package: point them at the copy
        config_path = root / f"lora-{t}" / "adapter_config.json"
        config = json.loads(config_path.read_text()); config["base_model_name_or_path"] = str(root / "zoo-base")
        config_path.write_text(json.dumps(config))
    config = dict(base=str(root / "zoo-base"), method=method, dtype="float32", output=str(root / "merged"),
                  sources=[dict(path=str(root / f"lora-{t}"), task=t, name=t) for t in picks], tasks=tasks,
                  options=dict(test_scores=True, cache_dir=str(root / "cache")))
    return merge(config, progress=False).output
