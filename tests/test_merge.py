"""The merge entry point end to end on tiny models: exactness against PEFT, the dry run, and output safety."""
import json, subprocess, sys
from pathlib import Path

import pytest
import torch
import yaml

from himerge.config import ConfigError
from himerge.merge import merge
from himerge.plan import Plan
from himerge.output import OutputExistsError

HIMERGE = str(Path(sys.executable).parent / "himerge")   # the console script of this environment


def tiny_lora(root: Path, seed=0):
    "A random 2-block Qwen2 base and a LoRA adapter on every linear module, with non-zero B."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    base = Qwen2ForCausalLM(cfg)
    base.save_pretrained(root / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.05)
    peft_model.save_pretrained(root / "adapter")
    cfg_path = root / "adapter" / "adapter_config.json"
    ac = json.loads(cfg_path.read_text()); ac["base_model_name_or_path"] = str(root / "base")
    cfg_path.write_text(json.dumps(ac))
    return peft_model


def test_single_lora_task_arithmetic_equals_merge_and_unload(tmp_path):
    peft_model = tiny_lora(tmp_path)
    expected = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    result = merge(dict(base=str(tmp_path / "base"), sources=[dict(path=str(tmp_path / "adapter"))],
                        method="task_arithmetic", dtype="float32"), out=tmp_path / "merged", progress=False)
    from safetensors.torch import load_file
    saved = load_file(result.output / "model.safetensors")
    assert set(saved) == set(expected)
    worst = max((saved[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"saved model differs from merge_and_unload by {worst}"
    assert any((saved[k] != load_file(tmp_path / "base" / "model.safetensors")[k]).any() for k in saved)
    report = json.loads((result.output / "himerge_report.json").read_text())
    assert report["method"] == "task_arithmetic" and "decisions" not in report and "gamma" not in report


def test_existing_output_is_kept_without_force(tmp_path):
    tiny_lora(tmp_path)
    cfg = dict(base=str(tmp_path / "base"), sources=[str(tmp_path / "adapter")], method="task_arithmetic")
    out = tmp_path / "merged"
    merge(cfg, out=out, progress=False)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        merge(cfg, out=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    merge(cfg, out=out, force=True, progress=False)   # a himerge output: --force replaces it
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging folder left behind


def test_force_never_replaces_a_folder_himerge_did_not_write(tmp_path):
    from himerge.output import OutputError
    tiny_lora(tmp_path)
    cfg = dict(base=str(tmp_path / "base"), sources=[str(tmp_path / "adapter")], method="task_arithmetic")
    out = tmp_path / "mine"
    out.mkdir(); (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a himerge output"):
        merge(cfg, out=out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_dry_run_loads_nothing_and_counts_evaluations(tmp_path):
    from himerge.zoo import demo_config
    cfg = demo_config(tmp_path / "demo")
    p = merge(cfg, dry_run=True)
    assert isinstance(p, Plan) and not (tmp_path / "demo").exists()
    n_layers = p.n_layers
    assert n_layers == json.loads((Path(cfg["base"]) / "config.json").read_text())["num_hidden_layers"]
    # two sources on two tasks: (2 sources + 2 tasks of the pre-merge) pairs × (2L + 1) probes + 2 base scores
    assert p.evaluations["contribution analysis"] == 4 * (2 * n_layers + 1) + 2
    text = str(p)
    for s in cfg["sources"]: assert s["name"] in text


def test_cli_dry_run_and_config_errors(tmp_path):
    from himerge.zoo import demo_config
    cfg = demo_config(tmp_path / "demo")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([HIMERGE, "merge", str(path), "--dry-run"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "evaluations" in run.stdout and not (tmp_path / "demo").exists()
    cfg["sources"][0]["density"] = 2
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([HIMERGE, "merge", str(path), "--dry-run"], capture_output=True, text=True)
    assert run.returncode != 0 and "sources[0].density" in run.stderr


def test_bad_config_names_field():
    with pytest.raises(ConfigError, match=r"options\.prune_scope"):
        merge(dict(sources=["a", "b"], method="task_arithmetic", options=dict(prune_scope="global")), dry_run=True)
