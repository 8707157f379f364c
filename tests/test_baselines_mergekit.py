"""himerge.baselines with MERGEKIT_ARGS against mergekit 0.1.5's own outputs on a tiny random Llama.

The fixtures (tests/fixtures/mergekit/) are made by tests/fixtures/make_mergekit_refs.py, which runs
mergekit-yaml in its own virtualenv. DARE and DELLA draw their masks from torch's global RNG in
mergekit, so only their density-1 runs (no drop: the sign election and normalisation) are compared
here; their random drop is checked statistically and against PEFT in nbs/04_baselines.ipynb.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from himerge import baselines
from himerge.baselines import MERGEKIT_ARGS
from himerge.methods import PER_TENSOR

torch.set_num_threads(1)
FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
INPUTS = load_file(str(FIXTURES / "inputs.safetensors"))
NAMES = sorted(k.split("/", 1)[1] for k in INPUTS if k.startswith("base/"))


def himerge_merge(case: dict) -> dict:
    "Merge the fixture's inputs tensor by tensor as the case says, with mergekit's options."
    method, per_source, params = case["method"], dict(case["per_source"]), case["parameters"]
    n = len(case["weights"])
    args = dict(MERGEKIT_ARGS[method])
    if method == "task_arithmetic": per_source.pop("density", None)   # mergekit's task_arithmetic never prunes
    densities = per_source.pop("density", None)
    args.update(per_source)                                            # gamma, epsilon: one value per source
    if params.get("normalize") is False: args["divide"] = "none"
    out = {}
    for name in NAMES:
        base = INPUTS[f"base/{name}"]
        deltas = [INPUTS[f"s{m}/{name}"] - base for m in range(n)]
        out[name] = base + getattr(baselines, method)(deltas, case["weights"], densities=densities,
                                           generator=torch.Generator().manual_seed(0), **args)
    return out


def test_fixtures_cover_every_per_tensor_method():
    assert {c["method"] for c in CASES.values()} == set(PER_TENSOR) | {"task_arithmetic"}
    assert sum(f.stat().st_size for f in FIXTURES.iterdir()) < 1_000_000


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_as_mergekit(case):
    want = load_file(str(FIXTURES / f"{case}.safetensors"))
    got = himerge_merge(CASES[case])
    assert sorted(want) == NAMES
    for name in NAMES:
        # float32 sums in a different order (linear averages full weights in mergekit): ~1 ulp of 0.05
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=f"{case}: {name}")


def test_pruning_cases_really_prune():
    "The pruned cases differ from plain weighted sums, so the comparison above checks the pruning."
    for case in ("ties", "breadcrumbs"):
        want = load_file(str(FIXTURES / f"{case}.safetensors"))
        plain = himerge_merge({**CASES[case], "per_source": {}})
        assert any(not torch.allclose(plain[n], want[n]) for n in NAMES), case
