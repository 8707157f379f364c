"Property tests of himerge.prune: counts, identity, linearity in the scale, and every scope against a brute-force sort."
from fractions import Fraction
import math

import torch
from hypothesis import given, settings, strategies as st

from himerge.prune import ProcessedDeltas, kept_count, prune_scale, prune_scale_group

torch.set_num_threads(1)
SETTINGS = settings(max_examples=60, deadline=None)

# Few distinct magnitudes, so ties at the threshold are frequent; zeros and both signs included.
values = st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 0.25, 2.0, -3.0, 1e-3, -7.5])
densities = st.sampled_from([0.05, 0.1, 0.15, 0.25, 1 / 3, 0.5, 0.7, 0.95, 1.0])
scales = st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0])


@st.composite
def tensors(draw, max_n=40):
    n = draw(st.integers(1, max_n))
    return torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32)


def reference_keep(flat: torch.Tensor, k: int) -> torch.Tensor:
    "The k largest |x| of a flat tensor, ties by position: a full stable sort (fine on small inputs)."
    order = sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def reference_count(n: int, p: float) -> int:
    "floor(p·n + 1/2) with p read as the decimal it is written as."
    return math.floor(Fraction(repr(p)) * n + Fraction(1, 2))


@SETTINGS
@given(st.integers(0, 10_000), densities)
def test_kept_count_is_round_half_up(n, p):
    assert kept_count(n, p) == reference_count(n, p)


@SETTINGS
@given(tensors(), densities, scales)
def test_tensor_scope_keeps_the_largest(t, p, lam):
    out = prune_scale(t, p, lam)
    k = reference_count(t.numel(), p)
    mask = reference_keep(t, k)
    assert torch.equal(out, torch.where(mask, t * lam, torch.zeros(())))
    # kept entries are never smaller in magnitude than dropped ones
    if 0 < k < t.numel():
        assert t[mask].abs().min() >= t[~mask].abs().max()


@SETTINGS
@given(tensors())
def test_identity_at_density_and_scale_one(t):
    assert torch.equal(prune_scale(t, 1.0, 1.0), t)


@SETTINGS
@given(tensors(), densities, scales)
def test_linear_in_scale(t, p, lam):
    assert torch.allclose(prune_scale(t, p, lam), lam * prune_scale(t, p, 1.0), rtol=1e-6, atol=0)


@st.composite
def layered(draw):
    "A fake Deltas: 1-3 layers of 1-3 named tensors, 1-2 sources."
    n_layers, n_sources = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    shapes = {layer: {f"layers.{layer}.{c}": draw(st.integers(1, 12)) for c in "qkv"[:draw(st.integers(1, 3))]}
              for layer in range(n_layers)}
    per_source = [{layer: {n: torch.tensor(draw(st.lists(values, min_size=s, max_size=s)))
                       for n, s in shapes[layer].items()} for layer in shapes} for _ in range(n_sources)]
    return FakeDeltas(shapes, per_source)


class FakeDeltas:
    "In-memory stand-in with the interface of himerge.deltas.Deltas."
    def __init__(self, shapes, per_source):
        self.layers, self.per_source = list(shapes), per_source
        self.base = {layer: {n: torch.zeros(s) for n, s in shapes[layer].items()} for layer in shapes}
        self.source_names = [f"s{i}" for i in range(len(per_source))]
    def base_layer(self, layer): return self.base[layer]
    def names(self, layer): return list(self.base[layer])
    def source_layer(self, i, layer): return {n: t.clone() for n, t in self.per_source[i][layer].items()}


def brute_force(deltas, i, p, lam, layers):
    "Prune source i jointly over `layers` (layers in order, tensors by sorted name, flat index) by sorting."
    names = [(layer, n) for layer in layers for n in sorted(deltas.per_source[i][layer])]
    flat = torch.cat([deltas.per_source[i][layer][n].reshape(-1) for layer, n in names])
    mask = reference_keep(flat, reference_count(flat.numel(), p))
    out, at = {}, 0
    for layer, n in names:
        t = deltas.per_source[i][layer][n]
        m = mask[at:at + t.numel()].view(t.shape)
        out[n] = torch.where(m, t * lam, torch.zeros(()))
        at += t.numel()
    return out


@SETTINGS
@given(layered(), st.data())
def test_layer_and_model_scope_equal_brute_force(fake, data):
    ps = [data.draw(densities) for _ in fake.source_names]
    lams = [data.draw(scales) for _ in fake.source_names]
    for scope in ("layer", "model"):
        pdl = ProcessedDeltas(fake, density=ps, scale=lams, scope=scope)
        for i in range(len(fake.source_names)):
            got = {n: t for layer in pdl.layers for n, t in pdl.source_layer(i, layer).items()}
            if scope == "model":
                want = brute_force(fake, i, ps[i], lams[i], fake.layers)
            else:
                want = {}
                for layer in fake.layers: want.update(brute_force(fake, i, ps[i], lams[i], [layer]))
            assert got.keys() == want.keys()
            for n in got: assert torch.equal(got[n], want[n]), (scope, i, n)
            total = sum(int((got[n] != 0).sum()) for n in got)
            assert total <= (reference_count(sum(t.numel() for t in got.values()), ps[i]) if scope == "model"
                             else sum(reference_count(sum(t.numel() for t in fake.per_source[i][layer].values()), ps[i])
                                      for layer in fake.layers))


@SETTINGS
@given(layered(), densities)
def test_group_scope_equals_model_scope_on_one_layer(fake, p):
    one = FakeDeltas({0: {n: t.numel() for n, t in fake.per_source[0][0].items()}}, [{0: fake.per_source[0][0]}])
    got = ProcessedDeltas(one, density=[p], scale=[1.0], scope="model").source_layer(0, 0)
    assert all(torch.equal(got[n], v) for n, v in prune_scale_group(one.per_source[0][0], p).items())
