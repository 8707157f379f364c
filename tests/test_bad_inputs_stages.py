"""Bad input to the stages that read user files (sources, deltas, task data), as table-driven cases.

Each case breaks a copy of a small valid world built from the shipped zoo (a base, two LoRA adapters, a full
fine-tune, a multiple-choice and a generative task's data), runs one stage, and checks three things: the error is an
`InputError`, its message names the culprit (file, tensor, field, line), and no input file was changed.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from himerge.deltas import compute_deltas
from himerge.errors import InputError
from himerge.sources import peft_default, resolve_sources
from himerge.task_data import TaskWarning
from himerge.tasks import TaskSpec
from himerge.zoo import load_zoo

torch.set_num_threads(1)


# --- the valid world ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    "A valid world: base/, lora-a/ (multiple-choice task), lora-b/ (generative task), full/, data/mc, data/gen."
    zoo = load_zoo()
    kinds = {t: s.type for t, s in zoo.tasks.items()}
    mc = next(t for t in zoo.adapters if kinds[t] == "multiple_choice")
    gen = next(t for t in zoo.adapters if kinds[t] == "generative")
    w = tmp_path_factory.mktemp("template") / "w"
    shutil.copytree(zoo.base, w / "base")
    shutil.copytree(zoo.adapters[mc], w / "lora-a")  # the adapters declare "../base": it still names w/base
    shutil.copytree(zoo.adapters[gen], w / "lora-b")
    shutil.copytree(next(iter(zoo.full.values())), w / "full")
    shutil.copytree(zoo.data[mc], w / "data" / "mc")
    shutil.copytree(zoo.data[gen], w / "data" / "gen")
    tasks = {"mc": dict(zoo.tasks[mc].to_dict(), data="data/mc"),
             "gen": dict(zoo.tasks[gen].to_dict(), data="data/gen")}
    return w, tasks


@pytest.fixture
def world(template, tmp_path):
    w, tasks = template
    return Path(shutil.copytree(w, tmp_path / "w", symlinks=True)), {k: dict(v) for k, v in tasks.items()}


def fingerprint(root: Path) -> dict:
    "relative path -> sha256 of every file under `root` (symlinks by their target)."
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink(): out[rel] = "->" + os.readlink(p)
        elif p.is_file(): out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- small editing tools -------------------------------------------------------------------------------------------

def edit_tensors(file: Path, edit):
    "Apply `edit(dict of tensors)` (in place) to a safetensors file."
    t = load_file(file)
    edit(t)
    save_file(t, str(file), metadata={"format": "pt"})

def edit_json(file: Path, edit):
    d = json.loads(file.read_text())
    edit(d)
    file.write_text(json.dumps(d))

def key_with(file: Path, *parts) -> str:
    "The first tensor of `file` whose name contains every one of `parts`."
    with safe_open(str(file), "pt") as h: return next(k for k in h.keys() if all(p in k for p in parts))

def poison(file: Path, key: str, value: float, dtype=None):
    def edit(t):
        x = t[key].clone() if dtype is None else t[key].to(dtype)
        x.view(-1)[x.numel() // 2] = value
        t[key] = x
    edit_tensors(file, edit)

def edit_rows(file: Path, edit):
    "Apply `edit(list of row dicts)` (in place) to a jsonl file."
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    edit(rows)
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))

def replace_line(file: Path, lineno: int, text: str):
    lines = file.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text + "\n"
    file.write_text("".join(lines))

def shard_base(w: Path) -> tuple:
    "Split base/model.safetensors into two shards with an index; return (index path, shard names, weight_map)."
    base = w / "base"
    t = load_file(base / "model.safetensors")
    names = sorted(t)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    half = len(names) // 2
    weight_map = {}
    for shard, part in zip(shards, (names[:half], names[half:])):
        save_file({k: t[k] for k in part}, str(base / shard), metadata={"format": "pt"})
        weight_map |= {k: shard for k in part}
    (base / "model.safetensors").unlink()
    index = base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index, shards, weight_map

def lora_key(w: Path, adapter: str, *parts) -> str:
    return key_with(w / adapter / "adapter_model.safetensors", *parts)

def edit_lora(w: Path, adapter: str, layer: str, part: str, change):
    "Replace the tensor of `adapter` whose key holds `layer` and `part` ('layers.1.', 'o_proj.lora_B') by `change(it)`."
    key = lora_key(w, adapter, layer, part)
    edit_tensors(w / adapter / "adapter_model.safetensors", lambda x: x.__setitem__(key, change(x[key])))

def set_rank(w: Path, adapter: str, rank: int):
    "Cut every LoRA pair of `adapter` to `rank` and say so in its config: a valid adapter of another rank."
    def edit(t):
        for k in list(t):
            if ".lora_A." in k: t[k] = t[k][:rank].contiguous()
            elif ".lora_B." in k: t[k] = t[k][:, :rank].contiguous()
    edit_tensors(w / adapter / "adapter_model.safetensors", edit)
    edit_json(w / adapter / "adapter_config.json", lambda c: c.update(r=rank))

def put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> str:
    "Store `folder` as the `main` commit of `repo_id` in a Hugging Face cache laid out as the real one; return the SHA."
    files = sorted(p for p in folder.iterdir() if p.is_file())
    sha = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True); (repo / "refs").mkdir()
    for p in files: shutil.copy(p, snap / p.name)
    (repo / "refs" / "main").write_text(sha)
    return sha


# --- the cases -----------------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    stage: str                        # resolve | read | rows
    brk: Callable                     # (world, tasks, monkeypatch) -> dict of overrides or None
    expect: tuple                     # fragments of the message; "{w}" stands for the world folder
    starts: str | None = None         # what the message must start with (errors about the base start with "base")


def defaults(w):
    return dict(sources=[str(w / "lora-a"), str(w / "lora-b"), str(w / "full")], base=None, allow_pickle=False)


# 1. Poisoned weights: NaN or Inf in a tensor the merge reads, named when it is read.
POISON = [
    Case("nan-in-base", "read",
         lambda w, t, m: poison(w / "base/model.safetensors", "model.layers.1.mlp.up_proj.weight", float("nan")),
         ("base 'base'", "'model.layers.1.mlp.up_proj.weight'", "{w}/base/model.safetensors", "1 NaN"), starts="base"),
    Case("inf-in-base-bf16", "read",
         lambda w, t, m: poison(w / "base/model.safetensors", "model.embed_tokens.weight", float("inf"),
                                torch.bfloat16),
         ("base 'base'", "'model.embed_tokens.weight'", "1 infinite"), starts="base"),
    Case("inf-in-full-source", "read",
         lambda w, t, m: poison(w / "full/model.safetensors", "model.norm.weight", float("-inf")),
         ("source 'full'", "'model.norm.weight'", "{w}/full/model.safetensors", "infinite")),
    Case("nan-in-lora-A", "read",
         lambda w, t, m: poison(w / "lora-a/adapter_model.safetensors",
                                lora_key(w, "lora-a", "layers.2.", "q_proj.lora_A"), float("nan")),
         ("source 'lora-a'", "layers.2.self_attn.q_proj.lora_A.weight", "adapter_model.safetensors", "NaN")),
    Case("inf-in-lora-B-of-second-source", "read",
         lambda w, t, m: poison(w / "lora-b/adapter_model.safetensors",
                                lora_key(w, "lora-b", "layers.3.", "down_proj.lora_B"), float("inf")),
         ("source 'lora-b'", "layers.3.mlp.down_proj.lora_B.weight", "infinite")),
    Case("nan-in-fp16-full-source", "read",
         lambda w, t, m: poison(w / "full/model.safetensors", "lm_head.weight", float("nan"), torch.float16),
         ("source 'full'", "'lm_head.weight'", "NaN")),
    Case("lora-product-overflows", "read",
         lambda w, t, m: edit_tensors(w / "lora-a/adapter_model.safetensors", lambda x: [
             x.__setitem__(k, torch.full_like(x[k], 1e25)) for k in list(x) if "layers.3.self_attn.v_proj" in k]),
         ("source 'lora-a'", "'model.layers.3.self_attn.v_proj.weight'", "overflows float32")),
]

# 2. Adapter config against its tensors, at resolve time (headers only).
ADAPTER = [
    Case("r-disagrees-with-tensors", "resolve",
         lambda w, t, m: edit_json(w / "lora-a/adapter_config.json", lambda c: c.update(r=c["r"] * 2)),
         ("source 'lora-a'", "adapter_config.json gives module", "(r)", "but its tensors have rank")),
    Case("rank-pattern-disagrees", "resolve",
         lambda w, t, m: edit_json(w / "lora-b/adapter_config.json",
                                   lambda c: c.update(rank_pattern={"k_proj": c["r"] + 1})),
         ("source 'lora-b'", "self_attn.k_proj", "rank_pattern['k_proj']")),
    Case("lora-A-and-B-ranks-differ", "resolve",
         lambda w, t, m: edit_lora(w, "lora-a", "layers.1.", "o_proj.lora_B", lambda b: b[:, :1].contiguous()),
         ("source 'lora-a'", "layers.1.self_attn.o_proj.lora_A.weight", "layers.1.self_attn.o_proj.lora_B.weight",
          "share one rank")),
    Case("lora-A-without-B", "resolve",
         lambda w, t, m: edit_tensors(w / "lora-a/adapter_model.safetensors",
                                      lambda x: x.pop(lora_key(w, "lora-a", "layers.0.", "gate_proj.lora_B"))),
         ("source 'lora-a'", "layers.0.mlp.gate_proj.lora_A.weight", "no lora_B", "'model.layers.0.mlp.gate_proj'")),
    Case("lora-B-without-A", "resolve",
         lambda w, t, m: edit_tensors(w / "lora-b/adapter_model.safetensors",
                                      lambda x: x.pop(lora_key(w, "lora-b", "layers.3.", "up_proj.lora_A"))),
         ("source 'lora-b'", "layers.3.mlp.up_proj.lora_B.weight", "no lora_A")),
    Case("missing-r-takes-peft-default", "resolve",
         lambda w, t, m: (set_rank(w, "lora-a", 1), edit_json(w / "lora-a/adapter_config.json", lambda c: c.pop("r"))),
         ("source 'lora-a'", f"rank {peft_default('r')} (r)", "rank 1")),
    Case("alpha-pattern-key-not-a-regex", "resolve",
         lambda w, t, m: edit_json(w / "lora-b/adapter_config.json",
                                   lambda c: c.update(alpha_pattern={"layers.(1": 4})),
         ("source '{w}/lora-b'", "adapter_config.json, field 'alpha_pattern'", "regular expression")),
    Case("target-modules-leave-out-a-module", "resolve",
         lambda w, t, m: edit_json(w / "lora-b/adapter_config.json", lambda c: c.update(
             target_modules=[x for x in c["target_modules"] if x != "v_proj"])),
         ("source 'lora-b'", "v_proj", "target_modules", "does not select")),
    Case("lora-matrix-flattened", "resolve",
         lambda w, t, m: edit_lora(w, "lora-a", "layers.2.", "k_proj.lora_A", lambda a: a.flatten()),
         ("source 'lora-a'", "layers.2.self_attn.k_proj.lora_A.weight", "two dimensions")),
    Case("adapter-without-tensors", "resolve",
         lambda w, t, m: save_file({}, str(w / "lora-b/adapter_model.safetensors")),
         ("source 'lora-b'", "{w}/lora-b/adapter_model.safetensors", "no tensors")),
    Case("integer-lora-tensor", "resolve",
         lambda w, t, m: edit_lora(w, "lora-a", "layers.2.", "up_proj.lora_A", lambda a: a.to(torch.int8)),
         ("source 'lora-a'", "layers.2.mlp.up_proj.lora_A.weight", "I8", "not floating point")),
    Case("lora-alpha-not-a-number", "resolve",
         lambda w, t, m: edit_json(w / "lora-a/adapter_config.json", lambda c: c.update(lora_alpha="16")),
         ("source '{w}/lora-a'", "adapter_config.json, field 'lora_alpha'", "a finite number", "'16'")),
]

# 3. The same source twice, or the base as a source.
def _hub_twice(w, t, m):
    import huggingface_hub.constants as C
    cache = w / "hub"
    sha = put_in_hub_cache(cache, "himerge-test/lora-a", w / "lora-a")
    m.setenv("HF_HUB_OFFLINE", "1"); m.setenv("HF_HUB_CACHE", str(cache))
    m.setattr(C, "HF_HUB_OFFLINE", True); m.setattr(C, "HF_HUB_CACHE", str(cache))
    return dict(sources=["himerge-test/lora-a", str(w / "lora-b"), f"himerge-test/lora-a@{sha}"], base=str(w / "base"))

def _symlinked(w, t, m):
    (w / "alias").symlink_to(w / "lora-b", target_is_directory=True)
    return dict(sources=[str(w / "lora-a"), str(w / "lora-b"), str(w / "alias")])

DUPLICATES = [
    Case("same-folder-twice", "resolve",
         lambda w, t, m: dict(sources=[str(w / "lora-a"), str(w / "lora-b"), str(w / "lora-a")]),
         ("sources[0] '{w}/lora-a'", "sources[2] '{w}/lora-a'", "the same source")),
    Case("same-folder-spelled-differently", "resolve",
         lambda w, t, m: dict(sources=[str(w / "lora-a"), str(w / "base") + "/../lora-a"]),
         ("sources[0] '{w}/lora-a'", "sources[1] '{w}/base/../lora-a'", "the folder {w}/lora-a")),
    Case("same-folder-through-a-symlink", "resolve", _symlinked,
         ("sources[1] '{w}/lora-b'", "sources[2] '{w}/alias'")),
    Case("same-hub-repo-at-the-same-commit", "resolve", _hub_twice,
         ("sources[0] 'himerge-test/lora-a'", "sources[2] 'himerge-test/lora-a@",
          "the Hub repo himerge-test/lora-a at commit")),
    Case("the-base-as-a-source", "resolve",
         lambda w, t, m: dict(sources=[str(w / "lora-a"), str(w / "base")], base=str(w / "base")),
         ("sources[1] '{w}/base'", "is the base itself")),
    Case("the-declared-base-as-a-source", "resolve", lambda w, t, m: dict(sources=[str(w / "base"), str(w / "lora-b")]),
         ("sources[0] '{w}/base'", "is the base itself")),
]

# 4. Corrupt files, named with the file and what is wrong.
def _truncate(file: Path, keep: float = 0.5):
    data = file.read_bytes(); file.write_bytes(data[:int(len(data) * keep)])

def _garble_header(file: Path):
    data = bytearray(file.read_bytes()); data[8:20] = b"#" * 12; file.write_bytes(bytes(data))

def _truncate_after_resolve(w, t, m):
    return dict(after_resolve=lambda: _truncate(w / "full/model.safetensors", 0.9))

def _wrong_shard(w, t, m):
    index, shards, wm = shard_base(w)
    name = next(k for k, s in wm.items() if s == shards[0])
    edit_json(index, lambda d: d["weight_map"].__setitem__(name, shards[1]))

def _unlisted(w, t, m):
    index, shards, wm = shard_base(w)
    edit_json(index, lambda d: d["weight_map"].pop("model.norm.weight"))

def _phantom(w, t, m):
    index, shards, wm = shard_base(w)
    edit_json(index, lambda d: d["weight_map"].__setitem__("model.layers.0.extra.weight", shards[0]))

CORRUPT = [
    Case("base-weights-truncated", "resolve", lambda w, t, m: _truncate(w / "base/model.safetensors"),
         ("base 'base'", "{w}/base/model.safetensors", "not a valid safetensors file", "incomplete"), starts="base"),
    Case("full-source-weights-garbage", "resolve",
         lambda w, t, m: (w / "full/model.safetensors").write_bytes(b"\x00garbage" * 100),
         ("source 'full'", "{w}/full/model.safetensors", "not a valid safetensors file")),
    Case("adapter-weights-empty-file", "resolve",
         lambda w, t, m: (w / "lora-b/adapter_model.safetensors").write_bytes(b""),
         ("{w}/lora-b/adapter_model.safetensors", "not a valid safetensors file")),
    Case("adapter-weights-header-garbled", "resolve",
         lambda w, t, m: _garble_header(w / "lora-a/adapter_model.safetensors"),
         ("{w}/lora-a/adapter_model.safetensors", "not a valid safetensors file")),
    Case("weights-truncated-after-resolve", "read", _truncate_after_resolve,
         ("source 'full'", "{w}/full/model.safetensors", "cannot read tensor")),
    Case("base-config-invalid-json", "resolve",
         lambda w, t, m: (w / "base/config.json").write_text('{"model_type": "llama",\n  "vocab_size": 128,}'),
         ("base '", "{w}/base/config.json is not valid JSON", "line 2"), starts="base"),
    Case("base-generation-config-invalid-json", "resolve",
         lambda w, t, m: (w / "base/generation_config.json").write_text("{'eos_token_id': 1}"),
         ("{w}/base/generation_config.json is not valid JSON",), starts="base"),
    Case("adapter-config-invalid-json", "resolve", lambda w, t, m: _truncate(w / "lora-a/adapter_config.json"),
         ("source '{w}/lora-a'", "{w}/lora-a/adapter_config.json is not valid JSON")),
    Case("adapter-config-a-list", "resolve", lambda w, t, m: (w / "lora-b/adapter_config.json").write_text("[]"),
         ("{w}/lora-b/adapter_config.json must hold a JSON object", "a list")),
    Case("adapter-config-r-is-a-word", "resolve",
         lambda w, t, m: edit_json(w / "lora-a/adapter_config.json", lambda c: c.update(r="eight")),
         ("adapter_config.json, field 'r' must be a positive integer", "'eight'")),
    Case("tokenizer-config-a-list", "resolve",
         lambda w, t, m: (w / "base/tokenizer_config.json").write_text('["<eos>"]'),
         ("{w}/base/tokenizer_config.json must hold a JSON object",), starts="base"),
    Case("special-tokens-map-invalid", "resolve",
         lambda w, t, m: (w / "base/special_tokens_map.json").write_text('{"eos_token": '),
         ("{w}/base/special_tokens_map.json is not valid JSON",), starts="base"),
    Case("tokenizer-json-truncated", "resolve", lambda w, t, m: _truncate(w / "base/tokenizer.json"),
         ("{w}/base/tokenizer.json is not valid JSON",), starts="base"),
    Case("full-source-config-not-utf8", "resolve",
         lambda w, t, m: (w / "full/config.json").write_bytes(b'{"model_type": "\xff"}'),
         ("{w}/full/config.json is not UTF-8",)),
    Case("base-config-layers-a-string", "resolve",
         lambda w, t, m: edit_json(w / "base/config.json", lambda c: c.update(num_hidden_layers="8")),
         ("config.json, field 'num_hidden_layers' must be a positive integer", "'8'"), starts="base"),
    Case("base-config-without-model-type", "resolve",
         lambda w, t, m: edit_json(w / "base/config.json", lambda c: c.pop("model_type")),
         ("{w}/base/config.json has no 'model_type'",), starts="base"),
    Case("shard-index-names-a-missing-shard", "resolve", lambda w, t, m: (w / "base" / shard_base(w)[1][1]).unlink(),
         ("shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing",), starts="base"),
    Case("shard-index-puts-a-tensor-in-the-wrong-shard", "resolve", _wrong_shard,
         ("model.safetensors.index.json puts tensor",
          "in model-00002-of-00002.safetensors, but it is in model-00001-of-00002.safetensors"),
         starts="base"),
    Case("shard-index-leaves-a-tensor-out", "resolve", _unlisted,
         ("does not list tensor 'model.norm.weight'",), starts="base"),
    Case("shard-index-lists-a-tensor-no-shard-holds", "resolve", _phantom,
         ("lists tensor 'model.layers.0.extra.weight'", "no shard holds it"), starts="base"),
    Case("shard-index-invalid-json", "resolve", lambda w, t, m: (shard_base(w)[0].write_text('{"weight_map": {')),
         ("{w}/base/model.safetensors.index.json is not valid JSON",), starts="base"),
    Case("shard-index-weight-map-a-list", "resolve", lambda w, t, m: shard_base(w)[0].write_text('{"weight_map": []}'),
         ("model.safetensors.index.json, field 'weight_map' must be an object",), starts="base"),
    Case("pickle-garbage-with-allow-pickle", "read",
         lambda w, t, m: ((w / "full/model.safetensors").unlink(),
                          (w / "full/pytorch_model.bin").write_bytes(b"not a pickle"),
                          {"allow_pickle": True})[-1],
         ("source 'full'", "{w}/full/pytorch_model.bin", "cannot load")),
]

# 5. Task data, row by row, on the rows that will be scored.
def _mc(w, t, edit, split="validation", **over):
    edit_rows(w / f"data/mc/{split}.jsonl", edit)
    return dict(task="mc", split=split, **over)

def _gen(w, t, edit, split="validation", **over):
    edit_rows(w / f"data/gen/{split}.jsonl", edit)
    return dict(task="gen", split=split, **over)

def _parquet(w, t, edit):
    import pandas as pd
    rows = [json.loads(line) for line in (w / "data/mc/validation.jsonl").read_text().splitlines() if line.strip()]
    edit(rows)
    (w / "data/mc/validation.jsonl").unlink()
    pd.DataFrame(rows).to_parquet(w / "data/mc/validation.parquet")
    return dict(task="mc", split="validation")

def _set(i, key, value): return lambda rows: rows[i].__setitem__(key, value)
def _drop(i, key): return lambda rows: rows[i].pop(key)

ROWS = [
    Case("mc-gold-missing", "rows", lambda w, t, m: _mc(w, t, _drop(4, "answer")),
         ("task 'mc', field 'gold_field'", "{w}/data/mc/validation.jsonl, line 5", "'answer' is not among")),
    Case("mc-gold-out-of-range", "rows",
         lambda w, t, m: _mc(w, t, lambda r: r[6].__setitem__("answer", len(r[6]["choices"]))),
         ("field 'gold_field'", "validation.jsonl, line 7", "integer index")),
    Case("mc-gold-negative", "rows", lambda w, t, m: _mc(w, t, _set(2, "answer", -1)),
         ("field 'gold_field'", "line 3", "-1")),
    Case("mc-gold-a-string", "rows", lambda w, t, m: _mc(w, t, _set(3, "answer", "1")),
         ("field 'gold_field'", "line 4", "'1'")),
    Case("mc-gold-a-float", "rows", lambda w, t, m: _mc(w, t, _set(9, "answer", 1.0)),
         ("field 'gold_field'", "line 10", "1.0")),
    Case("mc-gold-a-bool", "rows", lambda w, t, m: _mc(w, t, _set(1, "answer", True)),
         ("field 'gold_field'", "line 2", "True")),
    Case("mc-one-choice", "rows",
         lambda w, t, m: _mc(w, t, lambda r: r[5].update(choices=r[5]["choices"][:1], answer=0)),
         ("field 'choices_field'", "line 6", "at least two strings")),
    Case("mc-choices-a-string", "rows", lambda w, t, m: _mc(w, t, _set(7, "choices", "a b c")),
         ("field 'choices_field'", "line 8")),
    Case("mc-choice-a-number", "rows", lambda w, t, m: _mc(w, t, lambda r: r[8]["choices"].__setitem__(0, 7)),
         ("field 'choices_field'", "line 9")),
    Case("mc-choices-missing", "rows", lambda w, t, m: _mc(w, t, _drop(11, "choices")),
         ("field 'choices_field'", "line 12", "'choices' is not among")),
    Case("prompt-field-missing", "rows", lambda w, t, m: _gen(w, t, _drop(5, "question")),
         ("task 'gen', field 'prompt'", "{w}/data/gen/validation.jsonl, line 6", "['question']")),
    Case("prompt-field-null", "rows", lambda w, t, m: _gen(w, t, _set(2, "question", None)),
         ("field 'prompt'", "line 3", "null")),
    Case("gen-gold-an-int", "rows", lambda w, t, m: _gen(w, t, _set(8, "answer", 3)),
         ("task 'gen', field 'gold_field'", "line 9", "reference string")),
    Case("gen-gold-empty-list", "rows", lambda w, t, m: _gen(w, t, _set(1, "answer", [])),
         ("field 'gold_field'", "line 2")),
    Case("gen-gold-list-with-a-number", "rows", lambda w, t, m: _gen(w, t, _set(4, "answer", ["a", 1])),
         ("field 'gold_field'", "line 5")),
    Case("invalid-json-line", "rows",
         lambda w, t, m: (replace_line(w / "data/mc/validation.jsonl", 9, '{"question": "x", '), dict(task="mc"))[1],
         ("{w}/data/mc/validation.jsonl, line 9", "not valid JSON")),
    Case("line-not-an-object", "rows",
         lambda w, t, m: (replace_line(w / "data/gen/validation.jsonl", 4, '["next a b c", "b c d"]'),
                          dict(task="gen"))[1],
         ("{w}/data/gen/validation.jsonl, line 4", "expected a JSON object")),
    Case("line-not-utf8", "rows",
         lambda w, t, m: ((w / "data/gen/validation.jsonl").write_bytes(
             b"".join((line if i != 2 else b'{"question": "\xff", "answer": "x"}\n') for i, line in
                      enumerate((w / "data/gen/validation.jsonl").read_bytes().splitlines(keepends=True)))),
                          dict(task="gen"))[1],
         ("validation.jsonl, line 3", "not UTF-8")),
    Case("blank-lines-keep-line-numbers", "rows",
         lambda w, t, m: (edit_rows(w / "data/mc/validation.jsonl", _drop(3, "answer")),
                          (w / "data/mc/validation.jsonl").write_text(
                              "\n\n" + (w / "data/mc/validation.jsonl").read_text()),
                          dict(task="mc"))[-1],
         ("validation.jsonl, line 6",)),
    Case("bad-row-deep-in-the-test-split", "rows", lambda w, t, m: _mc(w, t, _drop(20, "choices"), split="test"),
         ("{w}/data/mc/test.jsonl, line 21", "field 'choices_field'")),
    Case("empty-test-split", "rows",
         lambda w, t, m: ((w / "data/gen/test.jsonl").write_text("\n"), dict(task="gen", split="test"))[1],
         ("task 'gen', field 'split'", "split 'test' has no rows", "{w}/data/gen/test.jsonl")),
    Case("parquet-gold-out-of-range", "rows", lambda w, t, m: _parquet(w, t, _set(3, "answer", 99)),
         ("{w}/data/mc/validation.parquet, row 3", "field 'gold_field'", "99")),
    Case("parquet-corrupt", "rows",
         lambda w, t, m: (_parquet(w, t, lambda r: None), _truncate(w / "data/mc/validation.parquet"),
                          dict(task="mc"))[-1],
         ("{w}/data/mc/validation.parquet", "not a readable parquet file")),
]

# 6. Errors about the base say "base".
BASE = [
    Case("base-folder-missing", "resolve", lambda w, t, m: dict(base=str(w / "no-such-base")),
         ("base '{w}/no-such-base'", "no such folder"), starts="base"),
    Case("base-is-an-adapter", "resolve", lambda w, t, m: dict(base=str(w / "lora-a")),
         ("base '{w}/lora-a'", "no config.json"), starts="base"),
    Case("declared-base-missing", "resolve",
         lambda w, t, m: [edit_json(w / f"{a}/adapter_config.json",
                                    lambda c: c.update(base_model_name_or_path="../gone"))
                          for a in ("lora-a", "lora-b")] and None,
         ("base '../gone' (declared by source 'lora-a'", "adapter_config.json", "no such folder"), starts="base"),
    Case("base-only-pickle-weights", "resolve",
         lambda w, t, m: (w / "base/model.safetensors").rename(w / "base/pytorch_model.bin"),
         ("base '", "pytorch_model.bin", "allow_pickle"), starts="base"),
    Case("base-without-weights", "resolve", lambda w, t, m: (w / "base/model.safetensors").unlink(),
         ("base '", "no model.safetensors"), starts="base"),
    Case("base-a-file", "resolve", lambda w, t, m: dict(base=str(w / "base/config.json")),
         ("base '{w}/base/config.json'", "is a file"), starts="base"),
]

CASES = POISON + ADAPTER + DUPLICATES + CORRUPT + ROWS + BASE


def run_stage(case: Case, w: Path, tasks: dict, over: dict):
    if case.stage == "rows":
        d = dict(tasks[over.get("task", "mc")], **{k: over[k] for k in ("limit",) if k in over})
        TaskSpec.from_dict(over.get("task", "mc"), d, root=w).check_rows(over.get("split"))
        return
    args = {**defaults(w), **{k: over[k] for k in ("sources", "base", "allow_pickle") if k in over}}
    sset = resolve_sources(args["sources"], base=args["base"], allow_pickle=args["allow_pickle"])
    if case.stage == "resolve": return
    with compute_deltas(sset) as deltas:
        if "after_resolve" in over: over["after_resolve"]()
        for layer in deltas.layers:
            deltas.base_layer(layer)
            # every tensor read, as a merge reads them: each is checked as it is computed
            for i in range(deltas.n_sources): dict(deltas.source_layer(i, layer))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_and_nothing_is_changed(case, world, monkeypatch):
    w, tasks = world
    over = case.brk(w, tasks, monkeypatch)
    over = over if isinstance(over, dict) else {}
    hook = over.get("after_resolve")
    if hook:  # the file changes between resolution and reading: the fingerprint is taken after the change
        def changed(): hook(); before.update(fingerprint(w))
        over["after_resolve"] = changed
    before = fingerprint(w)
    with pytest.raises(Exception) as caught:
        run_stage(case, w, tasks, over)
    err = caught.value
    assert isinstance(err, InputError), f"{type(err).__name__} is not an InputError: {err}"
    msg = str(err)
    for fragment in case.expect:
        assert fragment.replace("{w}", str(w)) in msg, f"{fragment!r} not in: {msg}"
    if case.starts: assert msg.startswith(case.starts), f"should start with {case.starts!r}: {msg}"
    assert fingerprint(w) == before, "an input file was changed"


def test_every_category_has_several_cases():
    groups = dict(poison=POISON, adapter=ADAPTER, duplicates=DUPLICATES, corrupt=CORRUPT, rows=ROWS, base=BASE)
    counts = {name: len(group) for name, group in groups.items()}
    assert min(counts.values()) >= 5, counts
    assert len({c.id for c in CASES}) == len(CASES)


# --- the valid world passes, and the limits of the checks ------------------------------------------------------------

def test_the_unbroken_world_passes_every_stage(world, monkeypatch):
    "Every case above fails for its own reason: the world it breaks resolves, reads and checks cleanly."
    w, tasks = world
    run_stage(Case("ok", "read", None, ()), w, tasks, {})
    for name in tasks: run_stage(Case("ok", "rows", None, ()), w, tasks, {"task": name})
    for name in tasks: run_stage(Case("ok", "rows", None, ()), w, tasks, {"task": name, "split": "test"})


def test_missing_lora_alpha_takes_peft_default_exactly_as_peft_merges(world):
    "Without lora_alpha the delta is PEFT's: base + δ equals PeftModel.merge_and_unload() of the same folder."
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from himerge.deltas import reconstruct
    w, _ = world
    edit_json(w / "lora-a/adapter_config.json", lambda c: c.pop("lora_alpha"))
    with compute_deltas(resolve_sources([str(w / "lora-a")])) as deltas: ours = reconstruct(deltas, 0)
    base = AutoModelForCausalLM.from_pretrained(w / "base")
    peft = PeftModel.from_pretrained(base, w / "lora-a").merge_and_unload().state_dict()
    worst = max((ours[k] - peft[k]).abs().max().item() for k in ours)
    assert worst < 1e-5, worst


def test_a_bad_row_beyond_limit_is_not_scored_so_not_refused(world):
    w, tasks = world
    n = len((w / "data/mc/validation.jsonl").read_text().splitlines())
    edit_rows(w / "data/mc/validation.jsonl", _drop(n - 1, "answer"))
    spec = TaskSpec.from_dict("mc", dict(tasks["mc"], limit=n - 1), root=w)
    assert spec.check_rows() == n - 1
    with pytest.raises(InputError, match=f"line {n}"):
        TaskSpec.from_dict("mc", dict(tasks["mc"], limit=n), root=w).check_rows()


def test_a_split_shorter_than_limit_warns_and_checks_every_row(world):
    w, tasks = world
    n = len((w / "data/gen/validation.jsonl").read_text().splitlines())
    with pytest.warns(TaskWarning, match=f"has {n} rows, fewer than limit {n + 5}"):
        assert TaskSpec.from_dict("gen", dict(tasks["gen"], limit=n + 5), root=w).check_rows() == n


def test_large_finite_values_are_not_poison(world):
    "The finiteness check sums each tensor; a sum that overflows on finite values is not mistaken for poison."
    w, _ = world
    edit_tensors(w / "full/model.safetensors", lambda t: t["model.norm.weight"].fill_(3e38))
    with compute_deltas(resolve_sources([str(w / "full")], base=str(w / "base"))) as deltas:
        assert deltas.source_layer(0, "norm")["model.norm.weight"].isfinite().all()
