"""A realistic, synthetic merge output directory (the layout 09_merge writes) for the card and push tests.

Built by hand because the tests must not run a merge: tiny safetensors weights, config files, a
`himerge_report.json` following the report schema of the common brief, `himerge_config.yaml` and a γ heatmap.
"""
from __future__ import annotations
import json
from pathlib import Path

SOURCES = ("arith", "capitals", "antonyms")
TASKS = ("arith", "capitals", "antonyms")
LAYERS = (0, 1)
# task data as the report records it: Hub dataset ids (with or without a revision) and a local folder
DATA = {"arith": "himerge-zoo/arith-qa@v1", "capitals": "himerge-zoo/capitals", "antonyms": "/srv/data/antonyms"}

def fake_report(hi_merging: bool = True, license: str | None = "apache-2.0") -> dict:
    "A merge report as 09_merge writes it: 3 LoRA sources on a 2-layer base, 3 tasks."
    base = dict(name="tiny-base", spec="himerge-zoo/tiny-base@main", repo_id="himerge-zoo/tiny-base",
                revision="main", commit_sha="a" * 40, license=license)
    sources = [dict(name=n, spec=f"himerge-zoo/lora-{n}@v1", kind="lora", repo_id=f"himerge-zoo/lora-{n}",
                    revision="v1", commit_sha=f"{i + 1}" * 40, task=n, density=0.5 + 0.1 * i, scale=1.0 - 0.1 * i)
               for i, n in enumerate(SOURCES)]
    score = lambda off: {t: round(0.3 + off + 0.05 * j, 4) for j, t in enumerate(TASKS)}
    validation = dict(base=score(0.0), sources={n: score(0.2 + 0.05 * i) for i, n in enumerate(SOURCES)},
                      merged=score(0.35))
    test = dict(base=score(0.01), sources={n: score(0.21) for n in SOURCES}, merged=score(0.33))
    report = dict(
        himerge_version="0.1.0", method="hi-merging" if hi_merging else "ties", created="2026-11-23T08:00:00+00:00",
        base=base, sources=sources,
        options=dict(prune_scope="tensor", combine="sum", remeasure="never", normalize="gain", seed=0),
        tasks={t: dict(metric="loglikelihood_acc" if t != "antonyms" else "rougeL", data=DATA[t],
                       split="validation", type="multiple_choice" if t != "antonyms" else "generative") for t in TASKS},
        scores=dict(validation=validation, test=test),
        contributions=[], gamma=[], decisions=[],
        evaluations=dict(done=0, reused=0), timings=dict(total_s=1.5),
        files=["model.safetensors", "config.json"])
    if hi_merging:
        validation["pre_merge"] = score(0.3)
        test["task_arithmetic"] = score(0.28)
        report["contributions"] = [
            dict(layer=l, state=st, task=t, alpha=0.1 + 0.01 * l, beta=0.05, c=0.15 + 0.01 * l,
                 alpha_se=0.01, beta_se=0.01, c_se=0.02)
            for l in LAYERS for st in [f"source:{n}" for n in SOURCES] + ["pre_merge"] for t in TASKS]
        report["gamma"] = [dict(layer=l, source=n, gamma=round(0.1 * (i + 1) - 0.15 * l, 3), gamma_se=0.02)
                           for l in LAYERS for i, n in enumerate(SOURCES)]
        report["classes"] = {"0": "mutual", "1": "severe"}
        report["decisions"] = [dict(order=1, layer=1, **{"class": "severe"}, gamma={n: -0.05 for n in SOURCES},
                                    total_conflict=-0.15, action="kept only capitals", edits={},
                                    score_before={t: 0.6 for t in TASKS}, score_after={t: 0.65 for t in TASKS})]
        report["resolution"] = dict(stopped="no conflicting layer left", evaluations=12)
        report["evaluations"] = dict(done=120, reused=4)
    return report

def fake_config(report: dict) -> dict:
    "The himerge_config.yaml matching `report`."
    return dict(method=report["method"], base=report["base"]["spec"],
                sources=[dict(spec=s["spec"], task=s["task"], density=s["density"], scale=s["scale"])
                         for s in report["sources"]],
                options=report["options"], dtype="float32")

def make_fake_output(folder, hi_merging: bool = True, license: str | None = "apache-2.0", heatmap: bool = True) -> Path:
    "Write a synthetic merge output into `folder` (created) and return its path."
    import numpy as np, yaml
    from safetensors.numpy import save_file
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file({f"model.layers.{l}.mlp.up_proj.weight": rng.standard_normal((8, 4), dtype=np.float32) for l in LAYERS},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(model_type="llama", num_hidden_layers=len(LAYERS),
                                                        hidden_size=4, intermediate_size=8)))
    (folder / "generation_config.json").write_text(json.dumps(dict(eos_token_id=2)))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(model_max_length=128)))
    report = fake_report(hi_merging, license)
    (folder / "himerge_report.json").write_text(json.dumps(report, indent=2))
    (folder / "himerge_config.yaml").write_text(yaml.safe_dump(fake_config(report), sort_keys=False))
    if hi_merging and heatmap:
        import matplotlib; matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(3, 2))
        g = np.array([[r["gamma"] for r in report["gamma"] if r["layer"] == l] for l in LAYERS])
        ax.imshow(g, cmap="RdBu"); ax.set_xlabel("source"); ax.set_ylabel("layer")
        fig.savefig(folder / "gamma_heatmap.png", dpi=50); plt.close(fig)
    return folder
