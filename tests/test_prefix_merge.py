"""Prefix reuse in a whole merge: on the zoo's demo pair, Hi-Merging with the prefix cache and with every block run
gives the same scores, γ, classes and decisions, and the report says how many block passes reuse saved."""
import json

from himerge.merge import merge
from himerge.zoo import demo_config


def _run(tmp_path, name, prefix_cache):
    cfg = demo_config(tmp_path / name)
    cfg["options"] = {**cfg["options"], "test_scores": False, "prefix_cache": prefix_cache,
                      "cache_dir": str(tmp_path / f"cache-{name}")}   # separate caches: each run measures every probe
    return merge(cfg, progress=False).report


def test_the_same_merge_with_and_without_prefix_reuse(tmp_path):
    reused, full = _run(tmp_path, "reused", "1GiB"), _run(tmp_path, "full", "off")
    for field in ("gamma", "classes", "decisions", "scores"):
        assert json.dumps(reused[field], sort_keys=True) == json.dumps(full[field], sort_keys=True), field
    passes = reused["evaluations"]["block_passes"]
    assert passes["skipped"] > 0, passes          # the multiple-choice task's probes started above block 0
    assert "block_passes" not in full["evaluations"]
    assert reused["evaluations"]["done"] == full["evaluations"]["done"]
