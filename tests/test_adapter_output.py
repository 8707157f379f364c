"""The merge written as a LoRA adapter (output_format: adapter), end to end through `merge()`.

Exact where the merge is a weighted sum of the sources: PEFT's merge_and_unload of the written adapter equals the
merged model written with output_format: model. Truncated elsewhere, with the error in the report. Refused at dry run
when a source is a full checkpoint. The scores are the adapter's as written."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from himerge.merge import merge
from himerge.zoo import demo_config
from himerge.errors import InputError

torch.set_grad_enabled(False)


def lora_world(root: Path, n: int = 2):
    "A random 2-block Qwen2 base and `n` LoRA adapters of it (rank 4, non-zero B) declaring it."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "base")
    for k in range(n):
        torch.manual_seed(k + 1)
        model = get_peft_model(Qwen2ForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_B" in name: param.normal_(0, 0.05)
        model.save_pretrained(root / f"a{k}")
        cfg_path = root / f"a{k}" / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()),
                                        "base_model_name_or_path": str(root / "base")}))
    return [str(root / f"a{k}") for k in range(n)]


def merged_by_peft(adapter: Path, base: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def assert_same_model(got: dict, want: dict, tol=1e-6):
    assert set(got) == set(want)
    for name, tensor in want.items():
        scale = tensor.abs().max().item() or 1.0
        assert (got[name] - tensor).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("method,options",
                         [("task_arithmetic", {}), ("task_arithmetic", {"lamb": 0.7}), ("linear", {})])
def test_exact_methods_equal_the_merged_model(tmp_path, method, options):
    sources = lora_world(tmp_path)
    config = dict(base=str(tmp_path / "base"),
                  sources=[dict(path=sources[0], scale=0.8), dict(path=sources[1], scale=0.5)],
                  method=method, options=options, dtype="float32")
    model = merge(config, out=tmp_path / "model", progress=False)
    adapter = merge({**config, "options": {**options, "output_format": "adapter"}}, out=tmp_path / "adapter",
                    progress=False)
    assert adapter.report["adapter"]["exact"] and adapter.report["adapter"]["max_relative_error"] == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert_same_model(merged_by_peft(tmp_path / "adapter", tmp_path / "base"),
                      load_file(model.output / "model.safetensors"))
    assert adapter.report["adapter"]["rank"] == 8                                    # two rank-4 sources, stacked


def test_pruned_merge_is_truncated_and_its_error_reported(tmp_path):
    sources = lora_world(tmp_path)
    config = dict(base=str(tmp_path / "base"), sources=sources, method="ties", dtype="float32",
                  options={"output_format": "adapter", "adapter_rank": 4})
    result = merge(config, out=tmp_path / "adapter", progress=False)
    info = result.report["adapter"]
    assert not info["exact"] and 0 < info["max_relative_error"] < 1
    assert {t["kind"] for t in info["tensors"]} == {"svd"} and max(t["rank"] for t in info["tensors"]) <= 4
    assert max(t["relative_error"] for t in info["tensors"]) == info["max_relative_error"]
    # what PEFT loads is the truncated merge, within the reported error of the full one
    full = merge({**config, "options": {}}, out=tmp_path / "model", progress=False)
    got, want = merged_by_peft(tmp_path / "adapter", tmp_path / "base"), load_file(full.output / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    for t in info["tensors"]:
        delta_full, delta_written = want[t["tensor"]] - base[t["tensor"]], got[t["tensor"]] - base[t["tensor"]]
        error = ((delta_full - delta_written).norm() / delta_full.norm()).item()
        assert error == pytest.approx(t["relative_error"], rel=1e-3, abs=1e-6), t["tensor"]


def test_full_checkpoint_refused_at_dry_run(tmp_path):
    sources = lora_world(tmp_path, n=1)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "full")
    with pytest.raises(InputError, match="full"):
        merge(dict(base=str(tmp_path / "base"), sources=[sources[0], str(tmp_path / "full")], method="task_arithmetic",
                   options={"output_format": "adapter"}), out=tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists()


def test_hi_merging_with_drops_and_scalings_is_exact(tmp_path):
    "With p = 1 and density_factor 1, every resolution edit is a drop or a rescaling: the adapter is exact."
    cfg = demo_config(tmp_path / "adapter")
    cfg["options"] = {"test_scores": False, "density_factor": 1.0, "cache_dir": str(tmp_path / "cache"),
                      "output_format": "adapter"}
    result = merge(cfg, out=tmp_path / "adapter", progress=False)
    assert result.report["decisions"], "the zoo's merge resolves some layers"
    assert result.report["adapter"]["exact"]
    model = merge({**cfg, "options": {**cfg["options"], "output_format": "model"}}, out=tmp_path / "model",
                  progress=False)
    assert model.report["decisions"] == result.report["decisions"]
    assert_same_model(merged_by_peft(tmp_path / "adapter", Path(cfg["base"])),
                      load_file(model.output / "model.safetensors"), 1e-5)
    merged_score = model.report["scores"]["validation"]["merged"]
    assert result.report["scores"]["validation"]["merged"] == pytest.approx(merged_score, abs=1e-6)
