"""The contribution engine against exact expectations.

The evaluator here is deliberately not LightEval: each per-sample score is a fixed LINEAR function
of the model's weights, so every α, β, c and γ has a closed form to compare with. (The notebooks
and the merge tests run the engine through LightEval on the zoo.)"""
import numpy as np
import pytest
import torch
from dataclasses import dataclass
from transformers import Qwen2Config, Qwen2ForCausalLM

from himerge.cache import EvalCache
from himerge.contributions import ContributionAnalysis, NoGainError
from himerge.deltas import LayerDeltas
from himerge.scoring import Scorer

torch.set_grad_enabled(False)
N_LAYERS = 3


def layer_of(name):
    return int(name.split(".")[2]) if name.startswith("model.layers.") else "outside"


class InMemoryDeltas(LayerDeltas):
    def __init__(self, model, per_source):
        sd = {k: v.detach().clone().float() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        self.layers = list(range(N_LAYERS))
        self.base = {layer: {k: v for k, v in sd.items() if layer_of(k) == layer} for layer in self.layers}
        self.per_source = per_source

    def base_layer(self, layer): return self.base[layer]
    def source_layer(self, i, layer): return self.per_source[i].get(layer, {})


@dataclass
class Score:
    score: float
    per_sample: np.ndarray


class LinearEvaluator:
    """Per-sample score k of task t = Σ_l w[t][k, l] · mean(q_proj weight of layer l) + offset."""
    def __init__(self, model, weights, fail_after=None):
        self.model, self.w, self.calls, self.fail_after = model, weights, 0, fail_after

    def feature(self):
        return np.array([self.model.model.layers[layer].self_attn.q_proj.weight.double().mean().item()
                         for layer in range(N_LAYERS)])

    def score(self, task):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after: raise KeyboardInterrupt("killed")
        per = self.w[task] @ self.feature() + 1.0
        return Score(float(per.mean()), per)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=N_LAYERS, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    q = "model.layers.{}.self_attn.q_proj.weight"
    shape = model.model.layers[0].self_attn.q_proj.weight.shape
    # Source a moves layer means by +0.1·(layer+1), source b by -0.05 + 0.02·layer: known per-layer effects.
    per_source = [{layer: {q.format(layer): torch.full(shape, 0.1 * (layer + 1))} for layer in range(N_LAYERS)},
                  {layer: {q.format(layer): torch.full(shape, -0.05 + 0.02 * layer)} for layer in range(N_LAYERS)}]
    rng = np.random.default_rng(0)
    weights = {"ta": np.abs(rng.normal(size=(5, N_LAYERS))), "tb": -np.abs(rng.normal(size=(5, N_LAYERS)))}
    return model, InMemoryDeltas(model, per_source), weights


def analysis(model, deltas, evaluator, cache=None):
    "The analysis of sources a and b (tasks ta, tb) on `model`, scored by `evaluator`."
    scorer = Scorer(model, deltas, lambda split: evaluator, cache=cache)
    return ContributionAnalysis(scorer, deltas, ["a", "b"], ["ta", "tb"])


def shifts(source):
    layers = np.arange(N_LAYERS)
    return 0.1 * (layers + 1) if source == 0 else -0.05 + 0.02 * layers


def test_alpha_beta_gamma_match_closed_form(setup, tmp_path):
    model, deltas, w = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = LinearEvaluator(model, w)
    engine = analysis(model, deltas, ev, EvalCache(tmp_path))
    res = engine.run()
    # The model is bit-identical after hundreds of in-place edits.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    gain = {"ta": (w["ta"] @ shifts(0)).mean(), "tb": (w["tb"] @ shifts(1)).mean()}
    assert gain["ta"] > 0 and gain["tb"] > 0
    for layer in range(N_LAYERS):
        for state, task, shift in [("source:a", "ta", shifts(0)), ("source:b", "tb", shifts(1)),
                                   ("pre_merge", "ta", shifts(0) + shifts(1)),
                                   ("pre_merge", "tb", shifts(0) + shifts(1))]:
            row = res.table[(res.table.state == state) & (res.table.layer == layer) & (res.table.task == task)].iloc[0]
            expected = (w[task][:, layer] * shift[layer]).mean() / gain[task]   # linear: α = β = the layer's own effect
            assert row.alpha == pytest.approx(expected, rel=1e-4, abs=1e-7)
            assert row.beta == pytest.approx(expected, rel=1e-4, abs=1e-7)
            assert row.c == pytest.approx(2 * expected, rel=1e-4, abs=1e-7)
        for src, task, other in [("a", "ta", 1), ("b", "tb", 0)]:
            g = res.gamma[(res.gamma.source == src) & (res.gamma.layer == layer)].iloc[0].gamma
            # γ_m = c(m) − c(G) = −(the other source's layer effect on m's task), doubled (α + β).
            assert g == pytest.approx(-2 * (w[task][:, layer] * shifts(other)[layer]).mean() / gain[task], rel=1e-4,
                                      abs=1e-7)
    assert res.evaluations["done"] == engine.n_evaluations() == 4 * 2 * N_LAYERS + 3 * 2


def test_interrupted_analysis_resumes_from_cache(setup, tmp_path):
    model, deltas, w = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    killed = LinearEvaluator(model, w, fail_after=11)
    with pytest.raises(KeyboardInterrupt):
        analysis(model, deltas, killed, EvalCache(tmp_path)).run()
    # The interrupted probe's edit was undone: the model is the base again.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fresh = LinearEvaluator(model, w)
    res = analysis(model, deltas, fresh, EvalCache(tmp_path)).run()
    assert res.evaluations["reused"] == 11
    assert res.evaluations["done"] == 4 * 2 * N_LAYERS + 6 - 11 == fresh.calls
    again = analysis(model, deltas, LinearEvaluator(model, w), EvalCache(tmp_path)).run()
    assert again.evaluations["done"] == 0
    assert again.gamma.gamma.tolist() == res.gamma.gamma.tolist()


def test_source_without_gain_is_an_error(setup):
    model, deltas, w = setup
    w = {**w, "tb": -w["tb"]}   # source b now lowers its own task's score
    with pytest.raises(NoGainError, match="source 'b'.*'tb'"):
        analysis(model, deltas, LinearEvaluator(model, w)).run()
