"""Integration tests of the shipped zoo (himerge/zoo_data): it loads offline, its parts load with the libraries, it
stays small, and its evidence shows the interference band the zoo promises."""
import json, os, tempfile, time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from himerge.gains import gain_kept
from himerge.zoo import MODEL, PROMPT, SPLITS, TASKS, build_zoo, demo_sources, load_zoo, path, size_bytes


@pytest.fixture(scope="module")
def zoo():
    return load_zoo()


def test_layout_and_specs(zoo):
    assert zoo.root == path() and zoo.base == path() / "base"
    assert sorted(zoo.tasks) == sorted(TASKS) == sorted(zoo.adapters)
    assert len(zoo.full) >= 2 and set(zoo.full) <= set(zoo.adapters)
    for name, spec in zoo.tasks.items():
        assert spec.name == name and spec.split == "validation" and spec.limit
        for split in ("train", "validation", "test"): assert (zoo.data[name] / f"{split}.jsonl").is_file()
    assert {s.type for s in zoo.tasks.values()} == {"multiple_choice", "generative"}
    assert demo_sources(zoo) == [str(zoo.adapters[t]) for t in zoo.tasks]
    mc, gen = zoo.demo_tasks
    assert (zoo.tasks[mc].type, zoo.tasks[gen].type) == ("multiple_choice", "generative")


def test_splits_share_no_input(zoo):
    for name, d in zoo.data.items():
        seen = {}
        for split in ("train", "validation", "test"):
            qs = {json.loads(line)["question"] for line in (d / f"{split}.jsonl").read_text().splitlines()}
            assert len(qs) == SPLITS[split], (name, split)
            for other, prev in seen.items(): assert not qs & prev, (name, split, other)
            seen[split] = qs
    assert SPLITS["validation"] >= 64 and SPLITS["test"] >= 128


def test_tokenizer_and_adapters_load_offline(zoo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(zoo.base)
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    for task, d in zoo.data.items():   # a real prompt of each task: whole words, no unknown token, decodes back
        row = json.loads((d / "validation.jsonl").read_text().splitlines()[0])
        text = PROMPT.format(**row)
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids, task
        assert len(ids) == len(text.split()) + text.count("\n"), task   # a token per word, and the newline
    base = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
    n = sum(p.numel() for p in base.parameters())
    c = base.config
    assert 300_000 <= n <= 1_000_000, n
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (MODEL["hidden"], MODEL["layers"],
                                                                         MODEL["intermediate"])
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    for task, adapter in zoo.adapters.items():
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert (cfg["base_model_name_or_path"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == ("../base", 8, 16,
                                                                                                      0.01)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32), adapter)
        merged = model.merge_and_unload().state_dict()
        assert any(not torch.equal(merged[k], base_sd[k]) for k in base_sd), task
        if task in zoo.full:  # the full checkpoint is this adapter merged
            full = AutoModelForCausalLM.from_pretrained(zoo.full[task], dtype=torch.float32).state_dict()
            for k in base_sd: torch.testing.assert_close(full[k], merged[k], rtol=0, atol=1e-6)


def test_sizes(zoo):
    assert size_bytes() <= 30e6
    assert not list(path().rglob("*.bin")) and not list(path().rglob("*.pt"))


def test_evidence_gains_and_interference_band(zoo):
    """The shipped evidence states the zoo's promises: each adapter gains >= 0.25 on its own task, and plain task
    arithmetic (λ = 1) of every shipped pair keeps between 30% and 90% of each adapter's gain on test."""
    for split in ("validation", "test"):
        ev = zoo.evidence["scores"][split]
        for t in zoo.tasks: assert ev[f"lora-{t}"][t] - ev["base"][t] >= 0.25, (split, t)
    ev = zoo.evidence["scores"]["test"]
    pairs = [name for name in ev if name.startswith("ta:")]
    assert pairs
    for name in pairs:
        for t in name[3:].split("+"):
            kept = gain_kept(ev[name][t], ev["base"][t], ev[f"lora-{t}"][t])
            assert 0.3 <= kept <= 0.9, (name, t, kept)


@pytest.mark.slow
def test_rebuild_matches_shipped_evidence(zoo):
    "A rebuild reproduces every shipped score within 0.05 absolute (summation order may differ across machines)."
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rebuilt = build_zoo(Path(d) / "zoo")
        assert time.perf_counter() - t0 < 900
    for split in ("validation", "test"):
        for model_name, s in zoo.evidence["scores"][split].items():
            for t, v in s.items():
                assert abs(rebuilt["scores"][split][model_name][t] - v) <= 0.05, (split, model_name, t)
