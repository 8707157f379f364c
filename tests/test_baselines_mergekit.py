"""himerge.baselines with MERGEKIT_ARGS against mergekit 0.1.5's own outputs on a tiny random Llama.

The fixtures (tests/fixtures/mergekit/) are made by tests/fixtures/make_mergekit_refs.py, which runs
mergekit-yaml in its own virtualenv. DARE and DELLA draw their masks from torch's global RNG in
mergekit, so only their density-1 runs (no drop: the sign election and normalisation) are compared
here; their random drop is checked statistically and against PEFT in nbs/04_baselines.ipynb.
"""
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from himerge import baselines
from himerge.baselines import MERGEKIT_ARGS, settings_arguments
from himerge.mergers import per_tensor_methods

torch.set_num_threads(1)
FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
ALL_CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
# the cases marked config_only are compared through himerge's reading of mergekit's YAML (test_mergekit_config.py)
CASES = {name: case for name, case in ALL_CASES.items() if not case.get("config_only")}
PER_TENSOR = per_tensor_methods()   # name -> PerTensorMethod: its function and what it needs
INPUTS = load_file(str(FIXTURES / "inputs.safetensors"))
NAMES = sorted(k.split("/", 1)[1] for k in INPUTS if k.startswith("base/"))


def himerge_merge(case: dict) -> dict:
    "Merge the fixture's inputs tensor by tensor as the case says, with mergekit's options."
    method, per_source, params = case["method"], dict(case["per_source"]), case["parameters"]
    n = len(case["weights"])
    args = dict(MERGEKIT_ARGS.get(method, {}))   # methods without a peft/mergekit difference need none
    if method == "task_arithmetic": per_source.pop("density", None)   # mergekit's task_arithmetic never prunes
    densities = per_source.pop("density", None)
    args.update(per_source)                                            # gamma, epsilon: one value per source
    if params.get("normalize") is False: args["divide"] = "none"
    args.update(params.get("t") is not None and {"t": params["t"]} or {})   # slerp's interpolation factor
    function = getattr(baselines, method)
    if "settings" in inspect.signature(function).parameters: args = settings_arguments(args)   # one MergeSettings
    out = {}
    for name in NAMES:
        base = INPUTS[f"base/{name}"]
        deltas = [INPUTS[f"s{m}/{name}"] - base for m in range(n)]
        extra = {"base": base} if method in PER_TENSOR and PER_TENSOR[method].needs_base else {}
        out[name] = base + function(deltas, case["weights"], densities=densities,
                                    generator=torch.Generator().manual_seed(0), **extra, **args)
    return out


# Per-tensor methods that mergekit does not have (the 2025 SVD-based ones): tested against their papers' formulas in
# tests/test_svd_merging.py and tests/test_knots.py instead.
NOT_IN_MERGEKIT = {"tsv", "iso_c", "iso_cts", "knots"}


def test_fixtures_cover_every_per_tensor_method():
    assert {c["method"] for c in ALL_CASES.values()} == (set(PER_TENSOR) - NOT_IN_MERGEKIT) | {"task_arithmetic"}
    assert NOT_IN_MERGEKIT <= set(PER_TENSOR) and not NOT_IN_MERGEKIT & set(MERGEKIT_ARGS)
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


def test_slerp_is_not_a_linear_interpolation():
    "The SLERP case is far from the straight line between the models, so the comparison checks the arc."
    want = load_file(str(FIXTURES / "slerp.safetensors"))
    t = CASES["slerp"]["parameters"]["t"]
    lerp = {n: (1 - t) * INPUTS[f"s0/{n}"] + t * INPUTS[f"s1/{n}"] for n in NAMES}
    assert max((lerp[n] - want[n]).abs().max().item() for n in NAMES) > 1e-4


def test_slerp_through_merge_matches_mergekit(tmp_path):
    "The registry entry end to end: `merge(method='slerp')` over checkpoint folders gives mergekit's tensors."
    import json, sys
    from safetensors.torch import save_file
    from himerge.merge import merge
    sys.path.insert(0, str(FIXTURES.parent))
    from make_mergekit_refs import CONFIG
    for who in ("base", "s0", "s1"):
        (tmp_path / who).mkdir()
        save_file({n: INPUTS[f"{who}/{n}"].contiguous() for n in NAMES}, str(tmp_path / who / "model.safetensors"))
        (tmp_path / who / "config.json").write_text(json.dumps(CONFIG))
    config = dict(base=str(tmp_path / "base"), sources=[str(tmp_path / "s0"), str(tmp_path / "s1")], method="slerp",
                  options={"t": CASES["slerp"]["parameters"]["t"]}, dtype="float32")
    result = merge(config, out=tmp_path / "out", progress=False)
    got, want = load_file(str(result.output / "model.safetensors")), load_file(str(FIXTURES / "slerp.safetensors"))
    for name in NAMES: torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
