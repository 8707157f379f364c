"""The merge written as a LoRA adapter, checked against PEFT itself.

Oracle: the written folder loaded with `PeftModel.from_pretrained(base, folder).merge_and_unload()` must equal
base + the merged delta computed by himerge's own `Deltas` (which tests/test_deltas_peft.py checks against PEFT).
Tolerance: ‖(merged − base) − Δ‖_F / ‖Δ‖_F ≤ 1e-6 per tensor (float32; PEFT and himerge sum the same products in
different orders), and every tensor the merge does not change must be the base's bit for bit.
Truncation: on a delta with a known spectrum the error must equal √(Σ_{i>k} S_i²)/√(Σ S_i²)."""
import json, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from himerge.adapter import (AdapterError, AdapterOptions, AdapterWriter, LoraFactors, check_adapter_output,
                             default_rank, exact_factors, truncated_factors, write_adapter)
from himerge.contributions import combine_deltas
from himerge.deltas import compute_deltas
from himerge.errors import InputError
from himerge.sources import resolve_sources

torch.set_num_threads(1)

REL_TOL = 1e-6


def tiny_model(arch: str, tie=False):
    "A random 2-block model of `arch` (hidden 32)."
    import transformers as tf
    torch.manual_seed(0)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    return cls[1](cls[0](**common))


def make_adapter(root: Path, arch: str, name: str, seed: int, **lora) -> str:
    "A PEFT adapter of the tiny `arch` base, every trainable tensor random (lora_B non-zero), saved under root/name."
    from peft import LoraConfig, get_peft_model
    if not (root / "base").exists(): tiny_model(arch).save_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notes
        model = get_peft_model(tiny_model(arch), LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad: p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p if "modules_to_save" in n else 0))
    model.save_pretrained(root / name)
    path = root / name / "adapter_config.json"
    cfg = json.loads(path.read_text()); cfg["base_model_name_or_path"] = str(root / "base")
    path.write_text(json.dumps(cfg))
    return str(root / name)


def peft_merged(base_folder, adapter_folder) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        warnings.filterwarnings("error", message=".*unexpected.*")
        model = PeftModel.from_pretrained(base, adapter_folder)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def base_weights(root: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(root / "base" / "model.safetensors"))


def assert_peft_gives(root: Path, folder: Path, delta: dict, tol=REL_TOL):
    "PEFT's merge of the written adapter is base + delta (relative to the delta); every other tensor is the base's."
    got, base = peft_merged(root / "base", folder), base_weights(root)
    tied = [n for n in got if n not in base]
    assert tied in ([], ["lm_head.weight"]), tied
    for n, b in base.items():
        if n in delta:
            gap = (torch.linalg.norm(got[n] - b - delta[n]) / torch.linalg.norm(delta[n])).item()
            assert gap <= tol, f"{n}: relative gap {gap:.2e}"
        else:
            assert torch.equal(got[n], b), f"{n} changed, but the merge does not change it"


def merged_delta(source_set, weights) -> tuple:
    "(merged_layer, all merged deltas) of Σ weights(layer)[i] ΔW_i, from himerge's Deltas."
    deltas = compute_deltas(source_set)
    def merged_layer(layer):
        return combine_deltas([{n: w * t for n, t in deltas.source_layer(i, layer).items()}
                               for i, w in enumerate(weights(layer)) if w != 0], "sum")
    everything = {}
    for layer in deltas.layers: everything.update(merged_layer(layer))
    return merged_layer, everything


# arch, [(adapter kwargs)...], weights(layer) -> [w_i]
EXACT_CASES = {
    "task-arithmetic": ("llama", [dict(r=4, lora_alpha=8, target_modules="all-linear"),
                                  dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])],
                        lambda layer: [0.7, 1.3]),
    "drop-one-source-in-layer-1": ("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                             dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])],
                                   lambda layer: [0.5, 0.0 if layer == 1 else 0.5]),
    "ranks-rslora-patterns": ("llama", [dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2},
                                             alpha_pattern={"layers.1.mlp.down_proj": 3}),
                                        dict(r=8, lora_alpha=4, use_rslora=True,
                                             target_modules=["q_proj", "k_proj", "down_proj"],
                                             rank_pattern={"layers.0.self_attn.k_proj": 3})],
                              lambda layer: [1.0, 0.25]),
    "embedding-and-modules_to_save": ("llama", [dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                     modules_to_save=["lm_head"]),
                                                dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])],
                                      lambda layer: [0.6, 0.4]),
    "qwen2-lora_bias-on-some-modules": ("qwen2",
                                        [dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_bias=True),
                                         dict(r=4, lora_alpha=8, target_modules=["v_proj"])],
                                        lambda layer: [1.0, 1.0]),
    "gpt2-conv1d-fan_in_fan_out-lora_bias": ("gpt2",
                                             [dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                   fan_in_fan_out=True, lora_bias=True),
                                              dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                   fan_in_fan_out=True, lora_bias=True)],
                                             lambda layer: [0.5, 2.0]),
    "gpt2-embedding": ("gpt2", [dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
                                dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)],
                       lambda layer: [1.0, 0.0 if layer == 0 else 1.0]),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_adapter_equals_the_linear_merge(tmp_path, case):
    arch, adapters, weights = EXACT_CASES[case]
    sources = [make_adapter(tmp_path, arch, f"a{i}", seed=i + 1, **kw) for i, kw in enumerate(adapters)]
    sset = resolve_sources(sources, base=str(tmp_path / "base"))
    merged_layer, delta = merged_delta(sset, weights)
    report = write_adapter(tmp_path / "out", sset, merged_layer, weights=weights)
    assert_peft_gives(tmp_path, tmp_path / "out", delta)
    assert report["max_error"] == 0 and set(r["kind"] for r in report["records"].values()) <= {"exact", "bias", "full"}
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "base"   # the local base by its folder name, never a path of this machine
    assert cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"] and not cfg["use_rslora"]
    # each module's rank is the sum of the ranks of the sources that change it with a non-zero weight
    factors = [LoraFactors(s) for s in sset.sources]
    with compute_deltas(sset) as d:
        for layer in d.layers:
            w = weights(layer)
            for name in d.names(layer):
                if any(name in f.modules for f in factors):
                    expected = sum(f.rank(name) for f, wi in zip(factors, w) if wi != 0 and name in f.modules)
                    assert report["records"][name]["rank"] == expected, name
    if case.startswith("ranks"):
        assert len(set(r["rank"] for r in report["records"].values())) > 1 and cfg["rank_pattern"]
    if case.startswith("gpt2-conv1d"): assert cfg["fan_in_fan_out"] and cfg["lora_bias"]
    if case.startswith("embedding"): assert cfg["modules_to_save"] == ["lm_head"]


def known_spectrum(out_f, in_f, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, len(S), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_f, len(S), generator=g, dtype=torch.float64))
    return ((U * S.double()) @ V.T).float()


def predicted_error(S, k):
    return (S[k:].double().square().sum().sqrt() / S.double().square().sum().sqrt()).item()


@pytest.mark.parametrize("method,shape,k",
                         [("full", (96, 400), 8), ("full", (400, 96), 30), ("lowrank", (512, 1024), 16),
                          ("auto", (512, 1024), 64)])
def test_truncation_error_is_the_predicted_one(method, shape, k):
    S = 0.95 ** torch.arange(float(min(shape)))
    delta = known_spectrum(*shape, S)
    A, B, err = truncated_factors(delta, k, method=method)
    assert A.shape == (k, shape[1]) and B.shape == (shape[0], k)
    exact = (torch.linalg.norm(delta.double() - B.double() @ A.double()) / torch.linalg.norm(delta.double())).item()
    assert err == pytest.approx(exact, rel=1e-5)   # the error is measured on the factors, not predicted
    best = predicted_error(S, k)
    if method == "full": assert err == pytest.approx(best, rel=1e-4)
    else: assert best * (1 - 1e-4) <= err <= best * 1.01  # randomised: never better than Eckart-Young, within 1% of it
    # the two factors carry √S each
    torch.testing.assert_close(torch.linalg.norm(A, dim=1), torch.linalg.norm(B, dim=0), rtol=1e-4, atol=0)


def test_truncation_of_low_rank_zero_and_bad_rank():
    A, B, err = truncated_factors(known_spectrum(64, 80, torch.tensor([2.0, 1.0])), 16)
    assert A.shape[0] == 2 and err < 1e-6
    A, B, err = truncated_factors(torch.zeros(6, 4), 3)
    assert (A.shape, B.shape, err) == ((0, 4), (6, 0), 0.0)
    with pytest.raises(ValueError, match="adapter_rank"): truncated_factors(torch.ones(3, 3), 0)


def test_lowrank_truncation_is_deterministic():
    delta = known_spectrum(512, 768, 0.97 ** torch.arange(512.0))
    first, second = truncated_factors(delta, 16, method="lowrank"), truncated_factors(delta, 16, method="lowrank")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_truncated_adapter_loads_and_reproduces_delta_k(tmp_path):
    "A merged delta with a known spectrum on one module: PEFT's merge of the written adapter adds exactly Δ_k."
    src = make_adapter(tmp_path, "llama", "a0", seed=1, r=4, lora_alpha=8, target_modules=["down_proj", "q_proj"])
    sset = resolve_sources([src], base=str(tmp_path / "base"))
    S = torch.linspace(1.0, 0.05, 32)
    target = "model.layers.1.mlp.down_proj.weight"   # 32 x 64
    delta = known_spectrum(32, 64, S)
    merged_layer = lambda layer: {target: delta} if layer == 1 else {}
    k = 6
    report = write_adapter(tmp_path / "out", sset, merged_layer, options=AdapterOptions(rank=k))
    rec = report["records"][target]
    assert rec["rank"] == k and rec["kind"] == "svd"
    assert rec["error"] == pytest.approx(predicted_error(S, k), rel=1e-4)
    assert report["max_error"] == rec["error"]
    U, s, Vh = torch.linalg.svd(delta.double())
    delta_k = ((U[:, :k] * s[:k]) @ Vh[:k]).float()
    assert_peft_gives(tmp_path, tmp_path / "out", {target: delta_k}, tol=1e-5)
    # modules the merge left at zero get no LoRA layer at all
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.mlp.down_proj"]


def test_default_rank_is_the_sum_capped(tmp_path):
    assert default_rank([8, 16]) == 24 and default_rank([64, 64]) == 64 and default_rank([16, 16], shape=(20, 50)) == 20
    srcs = [make_adapter(tmp_path, "llama", f"a{i}", seed=i, r=r, lora_alpha=r, target_modules=["o_proj"])
            for i, r in enumerate((3, 5))]
    sset = resolve_sources(srcs, base=str(tmp_path / "base"))
    merged_layer, _ = merged_delta(sset, lambda layer: [1.0, 1.0])
    report = write_adapter(tmp_path / "out", sset, merged_layer)
    assert {r["rank"] for r in report["records"].values()} == {8}   # the exact sum has rank 3 + 5: nothing lost
    assert report["max_error"] < 1e-5


def test_exact_factors():
    A1, B1, A2, B2 = torch.randn(2, 5), torch.randn(4, 2), torch.randn(3, 5), torch.randn(4, 3)
    A, B = exact_factors([(A1, B1, 0.5), (A2, B2, -2.0)])
    torch.testing.assert_close(B @ A, 0.5 * B1 @ A1 - 2.0 * B2 @ A2)
    assert exact_factors([(A1, B1, 0.0), (A2, B2, 1.0)])[0].shape == (3, 5)
    assert exact_factors([(A1, B1, 0.0)])[0].shape == (0, 5)
    with pytest.raises(ValueError, match="do not fit"): exact_factors([(A1, B1, 1.0), (torch.randn(3, 6), B2, 1.0)])


def test_refuses_a_full_checkpoint_by_name(tmp_path):
    src = make_adapter(tmp_path, "llama", "adapter", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    tiny_model("llama").save_pretrained(tmp_path / "my-full-finetune")
    sset = resolve_sources([src, str(tmp_path / "my-full-finetune")], base=str(tmp_path / "base"))
    with pytest.raises(AdapterError, match="source 'my-full-finetune' is a full checkpoint") as e:
        check_adapter_output(sset)
    assert isinstance(e.value, InputError)
    with pytest.raises(AdapterError, match="my-full-finetune"): LoraFactors(sset.sources[1])


def test_refuses_adapters_of_different_bases(tmp_path):
    a = make_adapter(tmp_path, "llama", "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    b = make_adapter(tmp_path, "llama", "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    tiny_model("llama").save_pretrained(tmp_path / "other-base")
    path = Path(b) / "adapter_config.json"
    cfg = json.loads(path.read_text()); cfg["base_model_name_or_path"] = str(tmp_path / "other-base")
    path.write_text(json.dumps(cfg))
    sset = resolve_sources([a, b], base=str(tmp_path / "base"), override_base=True)
    with pytest.raises(AdapterError, match="'a' and 'b' declare different bases"): check_adapter_output(sset)


@pytest.mark.parametrize("field,value,message",
                         [("use_dora", True, "DoRA"), ("alora_invocation_tokens", [1, 2], "activated LoRA")])
def test_refuses_non_additive_adapters(tmp_path, field, value, message):
    a = make_adapter(tmp_path, "llama", "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    sset = resolve_sources([a], base=str(tmp_path / "base"))
    sset.sources[0].config[field] = value   # DoRA is refused earlier by resolve_sources; the check does not rely on it
    with pytest.raises(AdapterError, match=f"source 'a': {field} is set; {message}"): check_adapter_output(sset)


def test_refuses_lora_bias_with_embedding_lora(tmp_path):
    a = make_adapter(tmp_path, "qwen2", "biased", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    b = make_adapter(tmp_path, "qwen2", "embed", seed=2, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    with pytest.raises(AdapterError, match="PEFT cannot load both"):
        check_adapter_output(resolve_sources([a, b], base=str(tmp_path / "base")))


def test_refuses_a_tensor_an_adapter_cannot_carry(tmp_path):
    a = make_adapter(tmp_path, "llama", "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    sset = resolve_sources([a], base=str(tmp_path / "base"))
    merged_layer = lambda layer: {"model.layers.0.input_layernorm.weight": torch.ones(32)} if layer == 0 else {}
    with pytest.raises(AdapterError,
                       match="'model.layers.0.input_layernorm.weight': changed by the merge, but neither"):
        write_adapter(tmp_path / "out", sset, merged_layer, options=AdapterOptions(rank=4))
    assert not (tmp_path / "out").exists()


def test_writer_refusals_and_records(tmp_path):
    w = AdapterWriter(tmp_path / "w", "some/base")
    w.add("m.weight", torch.randn(2, 5), torch.randn(4, 2), "svd", 0.25)
    w.add("n.weight", torch.zeros(0, 5), torch.zeros(4, 0), "exact")
    with pytest.raises(ValueError, match="already added"): w.add("m.weight", torch.randn(2, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="different ranks"): w.add("o.weight", torch.randn(2, 5), torch.randn(4, 3))
    w.add_bias("m.bias", torch.zeros(4))
    w.add("p.weight", torch.randn(1, 5), torch.randn(4, 1))
    with pytest.raises(AdapterError, match="module 'p': has no bias"): w.close()
    assert w.records["n.weight"]["rank"] == 0 and w.summary()["max_error"] == 0.25 and w.summary()["modules"] == 2


def test_dry_run_check_does_not_import_torch():
    code = "import sys, himerge.adapter; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_embedding_base_copy_must_be_the_base(tmp_path):
    """PEFT saves a targeted embedding's own weight (base_layer); it is checked against the base, not written as a
    change."""
    from safetensors.torch import load_file, save_file
    a = make_adapter(tmp_path, "llama", "a", seed=1, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    file = Path(a) / "adapter_model.safetensors"
    tensors = load_file(str(file))
    copy = "base_model.model.model.embed_tokens.base_layer.weight"
    assert copy in tensors and LoraFactors(a).base_copies == {"model.embed_tokens.weight": copy}
    sset = resolve_sources([a], base=str(tmp_path / "base"))
    merged_layer, _ = merged_delta(sset, lambda layer: [1.0])
    report = write_adapter(tmp_path / "ok", sset, merged_layer, weights=lambda layer: [1.0])
    assert report["records"]["model.embed_tokens.weight"]["kind"] == "exact"
    tensors[copy] = tensors[copy] + 1
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="saved copy .* differs from the base's 'model.embed_tokens.weight'"):
        write_adapter(tmp_path / "bad", resolve_sources([a], base=str(tmp_path / "base")), merged_layer,
                      weights=lambda layer: [1.0])
