"""Deltas against their oracles: base + LoRA delta == PeftModel.merge_and_unload() for every tensor, full-checkpoint
deltas rebuild the checkpoint, and deltas stream one layer at a time.

Tolerance: LoRA deltas are compared in float32 with atol 1e-6 (the weights are ~0.02-1, so this is a few float32 ulps:
PEFT and himerge do the same B @ A * s product, possibly in a different summation order). Full checkpoints are stored
in bf16, where fine-tuned - base is exact in float32, so they must rebuild bit for bit."""
import json
from pathlib import Path

import pytest
import torch

from himerge.deltas import TensorStore, compute_deltas, layer_of, reconstruct
from himerge.sources import resolve_sources

torch.set_num_threads(1)

ATOL = 1e-6


def tiny_model(arch: str, tie=False):
    "A random 2-block model of `arch` (hidden 32)."
    import transformers as tf
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=True)
        return tf.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    return cls[1](cls[0](**common))


LORA_CASES = {
    "llama-all-linear": ("llama", False, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-rslora-patterns": ("llama", False, dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                                                   rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                                   alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 20})),
    "llama-embedding-modules_to_save": ("llama", False,
                                        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                             modules_to_save=["lm_head"])),
    "qwen2-tied": ("qwen2", True, dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "mistral-rslora": ("mistral", False,
                       dict(r=4, lora_alpha=4, use_rslora=True,
                            target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"])),
    "gpt2-fan_in_fan_out-lora_bias": ("gpt2", True, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                         fan_in_fan_out=True, lora_bias=True)),
    "gpt2-embedding": ("gpt2", True, dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
}


def lora_pair(root: Path, arch: str, tie: bool, lora_kwargs: dict, seed=1):
    "Save a tiny base and a LoRA adapter with every trainable tensor random; return merge_and_unload()'s state dict."
    from peft import LoraConfig, get_peft_model
    import warnings
    base = tiny_model(arch, tie)
    base.save_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / all-linear notes
        model = get_peft_model(base, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # lora_A/B, embedding A/B, lora bias, modules_to_save copies
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (p if "modules_to_save" in n else 0))
    model.save_pretrained(root / "adapter")
    path = root / "adapter" / "adapter_config.json"
    ac = json.loads(path.read_text()); ac["base_model_name_or_path"] = str(root / "base")
    path.write_text(json.dumps(ac))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_delta_equals_merge_and_unload(tmp_path, case):
    arch, tie, kw = LORA_CASES[case]
    merged = lora_pair(tmp_path, arch, tie, kw)
    with compute_deltas(resolve_sources([str(tmp_path / "adapter")])) as deltas:
        rebuilt = reconstruct(deltas, 0)
        changed = {n for layer in deltas.layers for n in deltas.source_layer(0, layer)}
        assert deltas.unassigned == []
    from safetensors import safe_open
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as h: saved_names = set(h.keys())
    assert set(rebuilt) == saved_names  # every checkpoint tensor, tied lm_head not duplicated
    for n, w in rebuilt.items():
        assert torch.allclose(w, merged[n], atol=ATOL, rtol=0), \
            f"{case}: {n} differs by {(w - merged[n]).abs().max():.3g}"
    # the delta is exactly the set of tensors PEFT changed (no silent drops, no spurious zeros)
    from safetensors.torch import load_file
    base = load_file(tmp_path / "base" / "model.safetensors")
    peft_changed = {n for n in saved_names if not torch.equal(base[n], merged[n])}
    assert changed == peft_changed
    if kw.get("lora_bias"): assert any(n.endswith(".bias") for n in changed)
    if "embed_tokens" in str(kw.get("target_modules")) or "wte" in str(kw.get("target_modules")):
        assert any(layer_of(n, deltas.config) == "embed" for n in changed)
    if kw.get("modules_to_save"): assert "lm_head.weight" in changed
    if kw.get("rank_pattern"):  # the patterns really took effect in PEFT, so the equality above tested them
        from safetensors import safe_open
        with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as h:
            rank = lambda m: h.get_slice(f"base_model.model.model.{m}.lora_A.weight").get_shape()[0]
            assert [rank("layers.0.self_attn.q_proj"), rank("layers.1.mlp.down_proj"),
                    rank("layers.0.mlp.down_proj")] == [2, 6, 4]


def full_pair(root: Path, arch="qwen2", tie=True, shard=None, extra_tied_head=False):
    "A bf16 base and a bf16 'fine-tune' (every weight perturbed); returns the fine-tune's saved tensors."
    from safetensors.torch import load_file, save_file
    base = tiny_model(arch, tie).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in base.parameters(): p.add_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    kw = dict(max_shard_size=shard) if shard else {}
    base.save_pretrained(root / "ft", **kw)
    files = sorted((root / "ft").glob("*.safetensors"))
    saved = {k: v for f in files for k, v in load_file(f).items()}
    if extra_tied_head:  # some checkpoints store the tied head as well: it must not count as a second delta
        assert len(files) == 1
        save_file({**saved, "lm_head.weight": saved["model.embed_tokens.weight"].clone()}, str(files[0]),
                  metadata={"format": "pt"})
    return saved, files


@pytest.mark.parametrize("shard,extra_head", [(None, False), ("20KB", False), (None, True)])
def test_full_checkpoint_rebuilds_exactly(tmp_path, shard, extra_head):
    saved, files = full_pair(tmp_path, shard=shard, extra_tied_head=extra_head)
    if shard: assert len(files) > 2 and (tmp_path / "ft" / "model.safetensors.index.json").exists()
    with compute_deltas(resolve_sources([str(tmp_path / "ft")], base=str(tmp_path / "base"))) as deltas:
        assert "lm_head" not in deltas.layers  # tied: the embedding is the only copy
        names = [n for layer in deltas.layers for n in deltas.names(layer)]
        assert len(names) == len(set(names)) == len(saved)
        rebuilt = reconstruct(deltas, 0)
        for n, w in saved.items():
            assert torch.equal(rebuilt[n].to(torch.bfloat16), w), n
        emb = deltas.source_layer(0, "embed")
        assert list(emb) == ["model.embed_tokens.weight"]
        name = "model.embed_tokens.weight"
        assert torch.equal(emb[name], saved[name].float() - deltas.base_layer("embed")[name])


def test_layer_of_naming_schemes():
    llama = {"num_hidden_layers": 2}
    names = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
    assert [layer_of(n, llama) for n in names] == ["embed", 0, 1, "norm", "lm_head"]
    gpt2 = {"n_layer": 2}
    names = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.attn.c_attn.bias",
             "transformer.ln_f.weight")
    assert [layer_of(n, gpt2) for n in names] == ["embed", "embed", 1, "norm"]
    # beyond the declared blocks: reported, not guessed
    assert layer_of("model.layers.7.mlp.up_proj.weight", llama) is None
    assert layer_of("model.vision_tower.patch.weight", llama) is None


def test_source_layer_streams_one_layer(tmp_path, monkeypatch):
    """source_layer reads the layer asked for once (to name a bad tensor then), and afterwards nothing until a tensor
    is read, then only what that tensor needs; nothing is kept, so reading it again reads again."""
    lora_pair(tmp_path / "l", "llama", False, LORA_CASES["llama-embedding-modules_to_save"][2])
    full_pair(tmp_path / "f", arch="llama", tie=False, shard="20KB")
    import shutil
    shutil.rmtree(tmp_path / "f" / "base"); shutil.copytree(tmp_path / "l" / "base", tmp_path / "f" / "base")
    reads = []
    original = TensorStore.get
    monkeypatch.setattr(TensorStore, "get", lambda self, name: (reads.append(name), original(self, name))[1])
    sset = resolve_sources([str(tmp_path / "l" / "adapter"), str(tmp_path / "f" / "ft")],
                           base=str(tmp_path / "l" / "base"))
    with compute_deltas(sset) as deltas:
        assert reads == []  # building the Deltas reads headers only
        cfg = deltas.config
        target = lambda n: (n.removeprefix("base_model.model.").replace(".lora_A", "").replace(".lora_B", "")
                            .replace(".lora_embedding_A", ".weight").replace(".lora_embedding_B", ".weight")
                            .replace(".base_layer.", "."))             # a saved copy of a targeted embedding
        for layer in deltas.layers:
            for i in range(deltas.n_sources):
                reads.clear()
                deltas.source_layer(i, layer)                       # the first read checks every tensor
                assert {layer_of(target(n), cfg) for n in reads} <= {layer}
                reads.clear()
                d = deltas.source_layer(i, layer)
                assert reads == []                                  # names only: nothing read yet
                if i == 1: assert d, f"the full fine-tune changes nothing in layer {layer}"
                if not d: continue  # the adapter leaves e.g. the final norm alone
                assert {layer_of(n, cfg) for n in d} == {layer}
                for name in d:
                    reads.clear()
                    d[name]
                    assert reads and {target(n) for n in reads} == {name}, (i, name, reads)
                reads.clear()
                d[next(iter(d))]
                assert reads                                        # nothing kept: a second read reads again
            reads.clear()
            assert {layer_of(n, cfg) for n in deltas.base_layer(layer)} == {layer}
            assert {layer_of(n, cfg) for n in reads} == {layer}


def test_tied_head_stored_in_the_base_too_is_counted_once(tmp_path):
    """A tied checkpoint that also stores lm_head.weight (an explicit copy of the embedding) must not yield a second
    delta."""
    from safetensors.torch import load_file, save_file
    saved, files = full_pair(tmp_path, extra_tied_head=True)
    base_file = tmp_path / "base" / "model.safetensors"
    base = load_file(base_file)
    save_file({**base, "lm_head.weight": base["model.embed_tokens.weight"].clone()}, str(base_file),
              metadata={"format": "pt"})
    with compute_deltas(resolve_sources([str(tmp_path / "ft")], base=str(tmp_path / "base"))) as deltas:
        names = [n for layer in deltas.layers for n in deltas.source_layer(0, layer)]
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def _rss_file_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"): return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_a_full_pass_does_not_keep_every_input_file_mapped(tmp_path):
    "Streaming means the memory of a pass stays near one layer: file mappings must not outlive the layer they served."
    from safetensors.torch import save_file
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=4, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (4096, 512), "model.norm.weight": (512,), "lm_head.weight": (4096, 512)}
    for layer in range(4):
        shapes |= {f"model.layers.{layer}.self_attn.{p}_proj.weight": (512, 512) for p in "qkvo"}
        shapes |= {f"model.layers.{layer}.mlp.{p}_proj.weight": (1024, 512) for p in ("gate", "up")}
        shapes[f"model.layers.{layer}.mlp.down_proj.weight"] = (512, 1024)
    for d in ("base", "ft"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text(json.dumps(cfg))
        save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(tmp_path / d / "model.safetensors"))
    total_mb = sum((tmp_path / d / "model.safetensors").stat().st_size for d in ("base", "ft")) / 2**20
    with compute_deltas(resolve_sources([str(tmp_path / "ft")], base=str(tmp_path / "base"))) as deltas:
        before = _rss_file_mb()
        for layer in deltas.layers:
            deltas.base_layer(layer); deltas.source_layer(0, layer)
        grown = _rss_file_mb() - before
    largest_layer_mb = 2 * 2 * 4096 * 512 * 4 / 2**20  # embed (or head) of base and source
    assert grown < largest_layer_mb, f"after one pass {grown:.0f} MB of the {total_mb:.0f} MB of inputs stay mapped"
