"""`method: auto` on the zoo's demo pair: the dry run counts the comparison, the merge written is the chosen method's at
its chosen point, and the report and the card carry every method's validation and test scores."""
import pytest
import torch
from safetensors.torch import load_file

from himerge.compare import point_config
from himerge.config import MergeConfig, load_config
from himerge.merge import merge
from himerge.zoo import demo_config

torch.set_num_threads(1)
CANDIDATES = "task_arithmetic, ties, iso_c"


def auto_config(tmp_path, **options):
    config = demo_config(tmp_path / "out")
    config.update(method="auto", options={**config["options"], "cache_dir": str(tmp_path / "cache"), **options})
    return config


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    config = auto_config(tmp, methods=CANDIDATES)
    return tmp, config, merge(config, dry_run=True), merge(config, progress=False)


def test_the_dry_run_counts_the_comparison(auto_run):
    _, _, plan, _ = auto_run
    # 4 + 6 + 4 grid points, one validation score per task (2 tasks); each method's best on test
    assert plan.evaluations["method comparison, validation (at most)"] == (4 + 6 + 4) * 2
    assert plan.evaluations["method comparison, test"] == 3 * 2


def test_auto_writes_the_best_methods_merge(auto_run):
    tmp, config, _, result = auto_run
    auto = result.report["auto"]
    rows = {r["method"]: r for r in auto["methods"]}
    assert set(rows) == {"task_arithmetic", "ties", "iso_c"}
    assert auto["chosen"] == max(rows, key=lambda m: rows[m]["validation_gain_kept"])
    for r in rows.values():   # every method's scores on both splits, and what its search cost
        assert set(r["validation"]) == set(r["test"]) == {"last", "swap"} and r["evaluations"] > 0
        assert len(r["searched"]) == {"task_arithmetic": 4, "ties": 6, "iso_c": 4}[r["method"]]
        assert r["validation_gain_kept"] == max(s["validation_gain_kept"] for s in r["searched"])
    chosen = rows[auto["chosen"]]
    assert result.report["scores"]["validation"]["merged"] == chosen["validation"]
    assert result.report["scores"]["test"]["merged"] == chosen["test"]
    # the same method and point merged on their own give the same weights
    cfg = load_config(config)
    alone = merge(MergeConfig.from_dict(point_config(cfg, auto["chosen"], chosen["point"], False), root=cfg.root),
                  out=tmp / "alone", progress=False)
    written, expected = load_file(result.output / "model.safetensors"), load_file(alone.output / "model.safetensors")
    assert set(written) == set(expected)
    for name in expected: torch.testing.assert_close(written[name], expected[name], rtol=0, atol=0)


def test_the_card_says_which_method_and_why(auto_run):
    _, _, _, result = auto_run
    card = (result.output / "README.md").read_text()
    auto = result.report["auto"]
    assert "### Methods compared" in card and auto["why"] in card
    assert f"wrote the best one, **{auto['chosen']}**" in card
    for r in auto["methods"]: assert f"| {r['method']} |" in card or f"| **{r['method']}** |" in card


def test_the_budget_skips_points(tmp_path):
    result = merge(auto_config(tmp_path, methods="task_arithmetic, iso_c", budget=6, test_scores=False),
                   progress=False)
    auto = result.report["auto"]
    spent = sum(r["evaluations"] for r in auto["methods"])
    assert spent <= 6 and len(auto["skipped"]) == 8 - 3     # three points of two evaluations each fit
    assert [s["method"] for s in auto["skipped"]][-1] == "iso_c"
