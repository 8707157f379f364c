"""Sources given as Hub ids, resolved offline through huggingface_hub's real cache code.

A tiny Qwen2 base and a LoRA adapter are laid out as a Hugging Face cache under a made-up org
(models--<org>--<name>/refs/<branch>, snapshots/<sha>/<file> -> blobs/<sha256>), HF_HUB_OFFLINE=1 and HF_HUB_CACHE
point there. huggingface_hub reads both settings into `huggingface_hub.constants` at import time, so the test
patches those constants as well as the environment."""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from himerge.deltas import compute_deltas, reconstruct
from himerge.source_files import SourceError
from himerge.sources import resolve_sources

torch.set_num_threads(1)

ORG = "himerge-offline-test-org"
BASE_ID, LORA_ID, OTHER_ID = f"{ORG}/tiny-qwen2", f"{ORG}/tiny-qwen2-lora", f"{ORG}/tiny-qwen2-copy"


def put_in_cache(cache: Path, repo_id: str, folder: Path, refs: list) -> str:
    "Store `folder` as one commit of `repo_id` in an HF cache, pointed to by each branch in `refs`; return its SHA."
    files = sorted(p for p in folder.iterdir() if p.is_file())
    sha = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()  # a 40-hex commit id
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True, exist_ok=True); snap.mkdir(parents=True); (repo / "refs").mkdir(exist_ok=True)
    for p in files:
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        if not blob.exists(): shutil.copy(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs: (repo / "refs" / ref).write_text(sha)
    return sha


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    "The cache, the two commits of the adapter (main and branch 'v2') and PEFT's merges of each."
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    work = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))
    base.save_pretrained(work / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    merged, shas = {}, {}
    for branch, seed in (("main", 1), ("v2", 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n: p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(work / f"lora-{branch}")
        cfg_path = work / f"lora-{branch}" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text()); cfg["base_model_name_or_path"] = BASE_ID
        cfg_path.write_text(json.dumps(cfg))
    for branch in ("main", "v2"):
        reloaded = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(work / "base"), work / f"lora-{branch}")
        merged[branch] = {k: v.detach().clone() for k, v in reloaded.merge_and_unload().state_dict().items()}
    cache = work / "cache"
    shas["base"] = put_in_cache(cache, BASE_ID, work / "base", ["main"])
    shas["other"] = put_in_cache(cache, OTHER_ID, work / "base", ["main"])  # the same weights under another name
    shas["main"] = put_in_cache(cache, LORA_ID, work / "lora-main", ["main"])
    shas["v2"] = put_in_cache(cache, LORA_ID, work / "lora-v2", ["v2"])
    for p in work.iterdir():  # only the cache is left: a local path could not be found by accident
        if p != cache: shutil.rmtree(p)
    return cache, shas, merged


@pytest.fixture
def offline(hub, monkeypatch):
    import huggingface_hub.constants as C
    cache = hub[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True); monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(cache.parent)
    return hub


def assert_equals_peft(sset, merged):
    with compute_deltas(sset) as deltas:
        rebuilt = reconstruct(deltas, 0)
    assert rebuilt and set(rebuilt) <= set(merged)
    for n, w in rebuilt.items():
        assert torch.allclose(w, merged[n], atol=1e-6, rtol=0), \
            f"{n} differs from merge_and_unload by {(w - merged[n]).abs().max():.3g}"


def test_hub_id_resolves_with_declared_base_and_commit_shas(offline):
    cache, shas, merged = offline
    sset = resolve_sources([LORA_ID])  # the base comes from the adapter's base_model_name_or_path, a Hub id
    b, s = sset.base, sset.sources[0]
    assert (b.repo_id, b.revision, b.commit_sha, b.kind) == (BASE_ID, None, shas["base"], "base")
    assert (s.repo_id, s.revision, s.commit_sha, s.kind) == (LORA_ID, None, shas["main"], "lora")
    assert s.declared_base == BASE_ID and s.name == "tiny-qwen2-lora"
    assert Path(b.path) == cache / f"models--{ORG}--tiny-qwen2" / "snapshots" / shas["base"]
    assert_equals_peft(sset, merged["main"])


def test_branch_and_commit_revisions(offline):
    cache, shas, merged = offline
    sset = resolve_sources([f"{LORA_ID}@v2"], base=BASE_ID)
    s = sset.sources[0]
    assert (s.revision, s.commit_sha, s.name) == ("v2", shas["v2"], "tiny-qwen2-lora@v2")
    assert sset.base.commit_sha == shas["base"]
    assert_equals_peft(sset, merged["v2"])
    by_sha = resolve_sources([f"{LORA_ID}@{shas['main']}"], base=f"{BASE_ID}@main")
    assert by_sha.sources[0].commit_sha == shas["main"] and by_sha.base.revision == "main"
    assert_equals_peft(by_sha, merged["main"])
    both = resolve_sources([LORA_ID, f"{LORA_ID}@v2"])
    assert [s.commit_sha for s in both.sources] == [shas["main"], shas["v2"]]


def test_missing_revision_named(offline):
    with pytest.raises(SourceError, match=re.escape(f"{LORA_ID}@no-such-branch")):
        resolve_sources([f"{LORA_ID}@no-such-branch"], base=BASE_ID)
    with pytest.raises(SourceError, match=re.escape(f"{ORG}/not-cached")):
        resolve_sources([f"{ORG}/not-cached"], base=BASE_ID)


def test_declared_hub_base_mismatch_named_and_override(offline):
    cache, shas, merged = offline
    with pytest.raises(SourceError, match=re.escape(f"declares base '{BASE_ID}', but the base is '{OTHER_ID}'")):
        resolve_sources([f"{LORA_ID}@v2"], base=OTHER_ID)
    sset = resolve_sources([f"{LORA_ID}@v2"], base=OTHER_ID, override_base=True)
    assert sset.base.commit_sha == shas["other"]
    assert_equals_peft(sset, merged["v2"])
