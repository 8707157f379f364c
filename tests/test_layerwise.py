"""`method: layerwise_search` on the zoo's demo pair with a small budget: the dry run counts it, the search spends it,
and the merge written is the chosen per-layer scales applied to the sources' deltas."""
import torch
from safetensors.torch import load_file

from himerge.merge import merge
from himerge.zoo import demo_config

torch.set_num_threads(1)


def test_layerwise_search_spends_its_budget_and_writes_its_best_scales(tmp_path):
    config = demo_config(tmp_path / "out")
    config.update(method="layerwise_search", options={**config["options"], "cache_dir": str(tmp_path / "cache"),
                                                      "budget": 9, "test_scores": False})
    plan = merge(config, dry_run=True)
    assert plan.evaluations["layerwise search (validation)"] == 8          # 4 whole candidates of 2 tasks
    result = merge(config, progress=False)
    search = result.report["layerwise_search"]
    assert search["candidates"] == 4 and len(search["history"]) == 4
    assert search["best_gain_kept"] == max(search["history"]) >= search["start_gain_kept"]
    names = [s["name"] for s in result.report["sources"]]
    scales = search["scales"]["1"]
    assert set(scales) == set(names) and all(0 <= s <= 2 for s in scales.values())
    from himerge.zoo import load_zoo
    from himerge.sources import resolve_sources
    from himerge.deltas import compute_deltas
    zoo = load_zoo()
    name = "model.layers.1.mlp.up_proj.weight"
    with compute_deltas(resolve_sources([str(zoo.adapters[t]) for t in names], base=str(zoo.base))) as d:
        expected = sum(scales[n] * d.source_layer(i, 1)[name] for i, n in enumerate(names))
    written, base = load_file(result.output / "model.safetensors"), load_file(zoo.base / "model.safetensors")
    torch.testing.assert_close(written[name] - base[name], expected, rtol=1e-4, atol=1e-6)
    assert result.report["scores"]["validation"]["merged"]   # scored like any merge
