"himerge.baselines against peft.utils.merge_utils on random tensors: the same tensors, bit for bit."
import warnings

import torch
from hypothesis import given, settings, strategies as st
from peft.utils import merge_utils as pm

from himerge.baselines import MergeSettings, dare_linear, dare_ties, task_arithmetic, ties

torch.set_num_threads(1)
SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def problems(draw):
    "2-4 source deltas of one random shape, weights (any sign) and a density < 1."
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    m = draw(st.integers(2, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    deltas = [torch.randn(shape, generator=g) for _ in range(m)]
    weights = draw(st.lists(st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=m, max_size=m))
    return deltas, weights, draw(st.floats(0.05, 0.95)), draw(st.integers(0, 2**31))


@SETTINGS
@given(problems())
def test_task_arithmetic_and_magnitude_prune(problem):
    deltas, w, p, _ = problem
    assert torch.equal(task_arithmetic(deltas, w), pm.task_arithmetic(deltas, torch.tensor(w)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pm.magnitude_prune(deltas, torch.tensor(w), p)
    floor = MergeSettings(rounding="floor")   # PEFT's rounding
    assert torch.equal(task_arithmetic(deltas, w, densities=[p] * len(w), settings=floor), ref)


@SETTINGS
@given(problems(), st.sampled_from(["total", "frequency"]))
def test_ties(problem, majority):
    deltas, w, p, _ = problem
    ours = ties(deltas, w, densities=[p] * len(w), settings=MergeSettings(rounding="floor", majority=majority))
    assert torch.equal(ours, pm.ties(deltas, torch.tensor(w), p, majority_sign_method=majority))


@SETTINGS
@given(problems())
def test_dare_same_seed_same_masks(problem):
    deltas, w, p, seed = problem
    for ours_fn, ref_fn in ((dare_linear, pm.dare_linear), (dare_ties, pm.dare_ties)):
        ours = ours_fn(deltas, w, densities=[p] * len(w), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        assert torch.equal(ours, ref_fn(deltas, torch.tensor(w), p)), ours_fn.__name__
