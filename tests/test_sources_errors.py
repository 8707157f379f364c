"""Every way a base and its sources can fail to fit stops before any weight is loaded, with an error naming the
culprit."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file, save_file

from himerge.deltas import compute_deltas
from himerge.errors import InputError
from himerge.source_files import SourceError
from himerge.sources import resolve_sources
from himerge.task_data import TaskError

torch.set_num_threads(1)


def tiny_llama(seed=0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False) | over
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    "A base, a full fine-tune of it and a LoRA adapter declaring it; each test copies what it breaks."
    from peft import LoraConfig, get_peft_model
    root = tmp_path_factory.mktemp("zoo")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    tiny_llama(seed=1).save_pretrained(root / "full")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(root / "lora")
    set_declared(root / "lora", str(root / "base"))
    return root


def set_declared(adapter: Path, base: str, **more):
    p = adapter / "adapter_config.json"
    cfg = json.loads(p.read_text()); cfg["base_model_name_or_path"] = base; cfg.update(more)
    p.write_text(json.dumps(cfg))


def copy(zoo, name, tmp_path) -> Path:
    return Path(shutil.copytree(zoo / name, tmp_path / name))


def rewrite(file: Path, edit):
    "Apply `edit(tensors) -> tensors` to a safetensors file."
    save_file(edit(load_file(file)), str(file), metadata={"format": "pt"})


def test_the_fixture_itself_resolves(zoo):
    sset = resolve_sources([str(zoo / "lora"), str(zoo / "full")])
    assert sset.base.path == (zoo / "base").resolve() and [s.kind for s in sset.sources] == ["lora", "full"]


def test_full_shape_mismatch_names_tensor_and_both_shapes(zoo, tmp_path):
    ft = copy(zoo, "full", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite(ft / "model.safetensors", lambda t: {**t, name: torch.zeros(48, 32)})
    with pytest.raises(SourceError, match=re.escape(f"'{name}' has shape [48, 32], the base's has [64, 32]")) as e:
        resolve_sources([str(ft)], base=str(zoo / "base"))
    assert "'full'" in str(e.value)


def test_full_missing_and_extra_tensor_named(zoo, tmp_path):
    ft = copy(zoo, "full", tmp_path)
    rewrite(ft / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    with pytest.raises(SourceError, match=re.escape("'model.norm.weight' of the base is missing")):
        resolve_sources([str(ft)], base=str(zoo / "base"))
    rewrite(ft / "model.safetensors",
            lambda t: {**t, "model.norm.weight": torch.ones(32), "model.extra.weight": torch.ones(3)})
    with pytest.raises(SourceError, match=re.escape("'model.extra.weight' [3] does not exist in the base")):
        resolve_sources([str(ft)], base=str(zoo / "base"))


def test_architecture_mismatch_named(zoo, tmp_path):
    ft = copy(zoo, "full", tmp_path)
    cfg = json.loads((ft / "config.json").read_text()); cfg["model_type"] = "qwen2"
    (ft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="model_type 'qwen2' differs from the base's 'llama'"):
        resolve_sources([str(ft)], base=str(zoo / "base"))


def test_lora_shape_mismatch_names_adapter_tensor_and_target(zoo, tmp_path):
    ad = copy(zoo, "lora", tmp_path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    rewrite(ad / "adapter_model.safetensors", lambda t: {**t, key: torch.zeros(4, 48)})
    with pytest.raises(SourceError, match=re.escape(f"'{key}' has shape [4, 48], which does not fit "
                                                    "'model.layers.0.self_attn.v_proj.weight' of shape [16, 32]")):
        resolve_sources([str(ad)])


def test_wrong_declared_base_named_and_override_accepts(zoo, tmp_path):
    ad = copy(zoo, "lora", tmp_path)
    set_declared(ad, "someorg/other-model")
    with pytest.raises(SourceError, match=r"declares base 'someorg/other-model'.*override_base") as e:
        resolve_sources([str(ad)], base=str(zoo / "base"))
    assert str(zoo / "base") in str(e.value)
    sset = resolve_sources([str(ad)], base=str(zoo / "base"), override_base=True)
    assert sset.sources[0].declared_base == "someorg/other-model"


def test_missing_target_module_named(zoo, tmp_path):
    ad = copy(zoo, "lora", tmp_path)
    rewrite(ad / "adapter_model.safetensors",
            lambda t: {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv_proj"): v for k, v in t.items()})
    with pytest.raises(SourceError,
                       match=re.escape("targets 'model.layers.1.self_attn.qkv_proj.weight', which is not in the base")):
        resolve_sources([str(ad)])


def test_dora_refused(zoo, tmp_path):
    from peft import LoraConfig, get_peft_model
    get_peft_model(tiny_llama(),
                   LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "dora")
    set_declared(tmp_path / "dora", str(zoo / "base"))
    with pytest.raises(SourceError, match="DoRA.*not an additive delta") as e:
        resolve_sources([str(tmp_path / "dora")])
    assert "dora" in str(e.value)
    # a DoRA magnitude vector in the weights is refused even when the config does not say use_dora
    set_declared(tmp_path / "dora", str(zoo / "base"), use_dora=False)
    with pytest.raises(SourceError, match="lora_magnitude_vector.*DoRA"):
        resolve_sources([str(tmp_path / "dora")])


def test_non_lora_adapter_refused(zoo, tmp_path):
    from peft import IA3Config, get_peft_model
    get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
                   ).save_pretrained(tmp_path / "ia3")
    with pytest.raises(SourceError, match="adapter type IA3 is not supported"):
        resolve_sources([str(tmp_path / "ia3")], base=str(zoo / "base"))


def test_pickle_checkpoint_refused_unless_allowed(zoo, tmp_path):
    ft = tmp_path / "pickled"; ft.mkdir()
    shutil.copy(zoo / "full" / "config.json", ft)
    torch.save(load_file(zoo / "full" / "model.safetensors"), ft / "pytorch_model.bin")
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*pickle.*allow_pickle"):
        resolve_sources([str(ft)], base=str(zoo / "base"))
    sset = resolve_sources([str(ft)], base=str(zoo / "base"), allow_pickle=True)
    assert sset.sources[0].kind == "full"


def test_pickle_adapter_refused(zoo, tmp_path):
    ad = copy(zoo, "lora", tmp_path)
    torch.save(load_file(ad / "adapter_model.safetensors"), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(SourceError, match=r"adapter_model\.bin is a pickle file.*allow_pickle"):
        resolve_sources([str(ad)])


def test_sharded_index_naming_missing_shard(zoo, tmp_path):
    tiny_llama(seed=2).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(SourceError,
                       match=re.escape(f"shard {shards[1].name} named in model.safetensors.index.json is missing")):
        resolve_sources([str(tmp_path / "sharded")], base=str(zoo / "base"))


def test_no_base_given_and_none_declared(zoo, tmp_path):
    with pytest.raises(SourceError, match="base: not given, and no adapter declares one"):
        resolve_sources([str(zoo / "full")])
    ad = copy(zoo, "lora", tmp_path)
    set_declared(ad, None)
    with pytest.raises(SourceError, match="base: not given"):
        resolve_sources([str(ad)])


def test_adapters_declaring_different_bases(zoo, tmp_path):
    ad = copy(zoo, "lora", tmp_path)
    set_declared(ad, "someorg/other-model")
    with pytest.raises(SourceError, match="adapters declare different bases"):
        resolve_sources([str(zoo / "lora"), str(ad)])


def test_bad_spec_named():
    with pytest.raises(SourceError, match=r"'no/such/folder/here'.*not a Hub id"):
        resolve_sources(["no/such/folder/here"], base="also-missing")


def test_errors_about_the_base_say_base(zoo):
    with pytest.raises(SourceError, match=r"^base 'also/missing/here': no such folder"):
        resolve_sources([str(zoo / "lora")], base="also/missing/here")
    with pytest.raises(SourceError, match=r"^base '[^']*lora': .*no config\.json"):
        resolve_sources([str(zoo / "full")], base=str(zoo / "lora"))


def test_every_error_here_is_an_input_error():
    "The CLI prints InputErrors as one line; these are the user's to fix."
    assert issubclass(SourceError, InputError) and issubclass(TaskError, InputError)
    assert issubclass(InputError, ValueError)


# --- found while writing these tests: allow_pickle=True must not switch the safetensors checks off ---

def test_allow_pickle_keeps_shape_checks_for_safetensors_sources(zoo, tmp_path):
    ft = copy(zoo, "full", tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight"
    rewrite(ft / "model.safetensors", lambda t: {**t, name: torch.zeros(48, 32)})
    with pytest.raises(SourceError, match=re.escape(name)):
        resolve_sources([str(ft)], base=str(zoo / "base"), allow_pickle=True)


def test_allowed_pickle_source_gives_deltas_or_a_clear_error(zoo, tmp_path):
    """A pickle checkpoint the user allowed either yields deltas or fails naming the limitation, never 'set
    allow_pickle'."""
    ft = tmp_path / "pickled"; ft.mkdir()
    shutil.copy(zoo / "full" / "config.json", ft)
    torch.save(load_file(zoo / "full" / "model.safetensors"), ft / "pytorch_model.bin")
    sset = resolve_sources([str(ft)], base=str(zoo / "base"), allow_pickle=True)
    try:
        with compute_deltas(sset) as deltas:
            d = deltas.source_layer(0, 0)
            assert d
    except SourceError as e:
        assert "allow_pickle" not in str(e), f"the user already allowed pickle, yet: {e}"


def test_allowed_pickle_adapter_gives_a_source_error_not_a_crash(zoo, tmp_path):
    ad = copy(zoo, "lora", tmp_path)
    torch.save(load_file(ad / "adapter_model.safetensors"), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    try:
        sset = resolve_sources([str(ad)], allow_pickle=True)
        with compute_deltas(sset) as deltas: assert deltas.source_layer(0, 0)
    except SourceError as e:
        assert "adapter_model.bin" in str(e)


def test_allow_pickle_with_a_sharded_safetensors_base_still_checks_against_it(zoo, tmp_path):
    "allow_pickle=True must not make the base's tensors vanish from the checks when the base is sharded."
    tiny_llama().save_pretrained(tmp_path / "sharded-base", max_shard_size="20KB")
    assert not (tmp_path / "sharded-base" / "model.safetensors").exists()
    ad = copy(zoo, "lora", tmp_path)
    set_declared(ad, str(tmp_path / "sharded-base"))
    sset = resolve_sources([str(ad)], allow_pickle=True)
    assert sset.sources[0].kind == "lora"


def test_allowed_pickle_adapter_is_checked_against_its_config_when_loaded(zoo, tmp_path):
    "A pickle adapter's shapes are unknown until it is loaded; then the same checks as for safetensors apply."
    ad = copy(zoo, "lora", tmp_path)
    torch.save(load_file(ad / "adapter_model.safetensors"), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    set_declared(ad, str(zoo / "base"), r=6)
    sset = resolve_sources([str(ad)], allow_pickle=True)   # nothing readable yet
    with pytest.raises(SourceError,
                       match=r"adapter_config\.json gives module '[^']+' rank 6 \(r\), but its tensors have rank 4"):
        compute_deltas(sset)
