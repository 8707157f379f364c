"""Prefix reuse gives the full forward's logits, bit for bit, across model families, dtypes and device placements.

`himerge.prefix` starts a forward at block `l` from stored hidden states, through hooks on the model's own blocks.
Here: every family and dtype from every block, with the started-at block edited after the recording (a probe);
the contribution analysis' schedule through `PrefixForward` (with `verify=True`, which also runs the full forward)
under a full and a tight budget; models whose blocks are wrapped by accelerate's device hooks (`dispatch_model`
with hooks forced on an all-CPU map, blocks offloaded to disk, `cpu_offload` with parameters on the meta device);
blocks that return tuples, take `hidden_states=` as a keyword, or whose attributes the model's loop reads; and
the errors. This machine has no GPU, so device moves are exercised through accelerate's hooks on CPU only: the
substituted tensor goes to the device of the tensor it replaces, and those hooks move it on."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.utils import logging as hf_logging

from himerge.errors import InputError
from himerge.prefix import PrefixError, PrefixForward, find_blocks, recording, run_from, starting_at

hf_logging.set_verbosity_error()
N_BLOCKS = 4
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=N_BLOCKS, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    # sliding-window attention in blocks 1-3: the model picks each block's mask by its position in the loop
    "qwen2-sliding": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=3,
                                                          max_window_layers=1)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=N_BLOCKS, n_head=4, n_positions=64)),
}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad(): yield


def model_of(family, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family]().to(dtype).eval()


def inputs(seed=1, batch=3, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, length), generator=g)
    mask = torch.ones_like(ids); mask[0, :4] = 0  # left padding, as LightEval pads
    return ids, mask


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_every_block_identical(family, dtype, masked):
    model = model_of(family, dtype)
    ids, mask = inputs()
    kwargs = {"attention_mask": mask} if masked else {}
    blocks = find_blocks(model)
    with recording(blocks, range(N_BLOCKS)) as entering: model(ids, **kwargs)
    for start in range(N_BLOCKS):
        weight = next(blocks.modules[start].parameters())
        saved = weight.clone()
        weight.add_(torch.randn_like(weight))  # the probe changes block `start`; the blocks below are as recorded
        ours, full = run_from(model, start, entering[start], ids, blocks, **kwargs), model(ids, **kwargs).logits
        weight.copy_(saved)
        difference = (ours.float() - full.float()).abs().max()
        assert torch.equal(ours, full), f"{family} {dtype} from block {start}: max diff {difference}"
        # and the substitution is real: other hidden states give other logits
        assert not torch.equal(run_from(model, start, entering[start] * 2, ids, blocks, **kwargs), full)


def schedule(n_blocks, states=("a", "g")):
    "The contribution analysis' forwards: (units per block, record_at, forget after)."
    yield ["base"] * n_blocks, "all", False
    for s in states:
        yield [s] * n_blocks, "all", False
        for block in range(n_blocks): yield ["base"] * block + [s] + ["base"] * (n_blocks - block - 1), (), False
        for block in range(n_blocks):
            yield [s] * block + ["base"] + [s] * (n_blocks - block - 1), (), block == n_blocks - 1


def run_schedule(model, pf, batches):
    """Every forward of the schedule through `pf` (verify=True checks each hit against the full forward), weights
    edited in place."""
    blocks = find_blocks(model)
    params = {n: p for n, p in model.named_parameters() if blocks.index_of(n) is not None}
    base = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(5)
    delta = {s: {n: 0.1 * torch.randn(b.shape, generator=g).to(b.dtype) for n, b in base.items()} for s in ("a", "g")}
    n_blocks = len(blocks)
    for units, record_at, done in schedule(n_blocks):
        for n, p in params.items():
            s = units[blocks.index_of(n)]
            p.copy_(base[n] if s == "base" else base[n] + delta[s][n])
        pf.set_weights(["embed"] + units, record_at)
        for ids, mask in batches: pf(ids, attention_mask=mask)
        if done: pf.forget(["embed"] + [units[-1]] * n_blocks, keep=[["embed"] + ["base"] * n_blocks])
    for n, p in params.items(): p.copy_(base[n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2-sliding", "gpt2"])
def test_schedule_through_prefix_forward(family, dtype):
    model = model_of(family, dtype)
    batches = [inputs(seed) for seed in (1, 2)]
    pf = PrefixForward(model, verify=True)
    run_schedule(model, pf, batches)
    s = pf.stats
    # 2 batches × 2 states × 2 kinds of probe; a probe at block l starts at l (at 1 for l = 0)
    assert s["blocks_skipped"] == 2 * 2 * 2 * (sum(range(N_BLOCKS)) + 1)
    assert s["misses"] == 2 * 3 and s["evicted"] == 0


def test_tight_budget_still_identical_and_bounded():
    model = model_of("llama")
    batches = [inputs(seed) for seed in (1, 2, 3)]
    entry = 3 * 9 * 32 * 4
    pf = PrefixForward(model, max_bytes=5 * entry, verify=True)
    run_schedule(model, pf, batches)
    full = PrefixForward(model)
    run_schedule(model, full, batches)
    s = pf.stats
    assert s["evicted"] > 0 and s["bytes"] <= 5 * entry and s["entries"] <= 5
    assert 0 < s["blocks_skipped"] < full.stats["blocks_skipped"]


def test_lru_policy_and_store_device():
    model = model_of("llama")
    pf = PrefixForward(model, max_bytes=4 * 3 * 9 * 32 * 4, policy="lru", store_device="cpu", verify=True)
    run_schedule(model, pf, [inputs(seed) for seed in (1, 2)])
    assert pf.stats["evicted"] > 0 and pf.stats["hits"] > 0


def placements(tmp_path):
    "The same Llama under accelerate's device hooks, three ways."
    from accelerate import cpu_offload, dispatch_model
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(N_BLOCKS)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    yield "hooks-on-all-cpu", dispatch_model(model_of("llama"), device_map, force_hooks=True)
    on_disk = {**device_map, "model.layers.1": "disk", "model.layers.2": "disk"}
    yield "blocks-on-disk", dispatch_model(model_of("llama"), on_disk, offload_dir=str(tmp_path))
    yield "cpu-offload-meta-params", cpu_offload(model_of("llama"), execution_device="cpu")


def test_accelerate_hooks(tmp_path):
    reference = model_of("llama")
    ids, mask = inputs()
    full = reference(ids, attention_mask=mask).logits
    for name, model in placements(tmp_path):
        blocks = find_blocks(model)
        assert blocks.name == "model.layers"
        with recording(blocks, range(N_BLOCKS)) as entering:
            assert torch.equal(model(ids, attention_mask=mask).logits, full)
        for start in range(N_BLOCKS):
            logits = run_from(model, start, entering[start], ids, blocks, attention_mask=mask)
            assert torch.equal(logits, full), (name, start)
        # hooks put back in place
        assert all(hasattr(b, "_hf_hook") or name.startswith("cpu-offload") for b in blocks.modules)


def test_accelerate_hooks_schedule():
    from accelerate import dispatch_model
    model = model_of("llama")
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(N_BLOCKS)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map, force_hooks=True)
    pf = PrefixForward(model, verify=True)
    run_schedule(model, pf, [inputs(1)])
    assert pf.stats["hits"] == 2 * 2 * N_BLOCKS


class TupleBlock(nn.Module):
    "A block in the older style: returns `(hidden_states, attention weights)`, has no return annotation."
    def __init__(self, width, kind):
        super().__init__()
        self.linear, self.kind = nn.Linear(width, width), kind

    def forward(self, hidden_states, scale=None):
        return (hidden_states + torch.tanh(self.linear(hidden_states)) * scale, None)


class TupleModel(nn.Module):
    """A toy decoder whose loop reads element 0 of each block's output and a block attribute, and passes hidden states
    by keyword."""
    def __init__(self, n_blocks=4, width=8, vocab=16):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=n_blocks)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([TupleBlock(width, "wide" if i % 2 else "narrow") for i in range(n_blocks)])
        self.head = nn.Linear(width, vocab)
        self.spare = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])  # another list, of another length

    def forward(self, input_ids, use_cache=None):
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden = block(hidden_states=hidden, scale={"wide": 2.0, "narrow": 0.5}[block.kind])[0]
        return SimpleNamespace(logits=self.head(hidden))


def test_tuple_blocks_keyword_hidden_states_and_attributes():
    torch.manual_seed(0)
    model = TupleModel().eval()
    assert find_blocks(model).name == "layers"
    ids = torch.randint(0, 16, (2, 5))
    full = model(ids).logits
    pf = PrefixForward(model, verify=True)
    pf.set_weights(["e", "b", "b", "b", "b"], "all")
    assert torch.equal(pf(ids), full)          # records, and sees that the blocks return tuples
    for start in range(1, 4):
        pf.set_weights(["e"] + ["b"] * start + ["x"] * (4 - start))
        assert torch.equal(pf(ids), full)
    assert pf.stats["blocks_skipped"] == 1 + 2 + 3


def test_errors():
    model = model_of("llama")
    with pytest.raises(PrefixError, match="no list of 4 blocks"):
        model.model.layers = nn.ModuleList(list(model.model.layers)[:3])
        find_blocks(model)
    model = model_of("llama")
    assert issubclass(PrefixError, InputError)
    pf = PrefixForward(model)
    ids, _ = inputs()
    with pytest.raises(RuntimeError, match="set_weights"): pf(ids)
    with pytest.raises(ValueError, match="3 unit keys for a model of 4 blocks"): pf.set_weights(["e", "b", "b"])
    with pytest.raises(ValueError, match=r"record_at: \[4\]"): pf.set_weights(["e"] + ["b"] * 4, record_at=[4])
    pf.set_weights(["e"] + ["b"] * 4, "all")
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"): pf(ids)
    model.eval()
    pf(ids, batch_key="k")
    with pytest.raises(PrefixError, match="another batch"): pf(ids[:2], batch_key="k")  # a key reused for another batch
    blocks = find_blocks(model)
    with pytest.raises(IndexError, match="block 4"):
        with starting_at(blocks, 4, None): pass
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks.modules)  # nothing left swapped after errors
