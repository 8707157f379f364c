"""The evaluator's fast paths give exactly LightEval's responses.

`himerge.evaluate`'s evaluator replaces two methods of LightEval's transformers wrapper (`_loglikelihood_tokens`
and `_padded_greedy_until`) with those of `himerge.lighteval_fast_paths`, which prepare each batch once and read the
choices' scores with one gather. Here their responses are compared, field by field, with LightEval's own methods
called on the same wrapper and documents: continuations of several lengths in one batch, several batches, inputs cut
to the model's length, the zoo's three tasks, and weights changed between calls.

Multiple choice is also scored from one pass per document (the default, `one_pass=True`): the same responses, the
log-likelihoods within float tolerance (the sums reduce in another order), every other field exactly."""
import json

import numpy as np
import pytest
import torch
from lighteval.models.transformers.transformers_model import TransformersModel
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from himerge.evaluate import Evaluator
from himerge.loading import load_model
from himerge.tasks import load_tasks
from himerge.zoo import load_zoo

WORDS = ["<eos>", "<unk>", "Question", ":", "Answer", " ", "\n", "+", "="] + [str(i) for i in range(40)]


def same_responses(ours, theirs, logprob_tol=0.0):
    """Field-by-field equality of two lists of ModelResponses, tensors compared exactly and log-likelihoods within
    `logprob_tol`; the first difference if any."""
    def eq(a, b):
        if torch.is_tensor(a) or torch.is_tensor(b): return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        if isinstance(a, list) and isinstance(b, list): return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))
        return a == b
    if len(ours) != len(theirs): return f"{len(ours)} responses against {len(theirs)}"
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for f in vars(b):
            if f == "logprobs" and logprob_tol:
                if not np.allclose(a.logprobs, b.logprobs, rtol=logprob_tol, atol=logprob_tol):
                    return f"response {k}, logprobs: {a.logprobs} != {b.logprobs} within {logprob_tol}"
            elif not eq(getattr(a, f), getattr(b, f)):
                return f"response {k}, field {f}: {getattr(a, f)!r} != {getattr(b, f)!r}"
    return None


def compare(ev, task):
    "Responses of the fast path and of LightEval's own method on the evaluator's documents for `task`."
    docs = ev.docs[task]
    with torch.no_grad():
        if ev.tasks[task].type == "multiple_choice":
            return ev.wrapper._loglikelihood_tokens(docs), TransformersModel._loglikelihood_tokens(ev.wrapper, docs)
        return ev.wrapper._padded_greedy_until(docs), TransformersModel._padded_greedy_until(ev.wrapper, docs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A random Llama over a word-level tokenizer, and tasks whose choices and prompts differ in length."
    tmp = tmp_path_factory.mktemp("fast")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d+|[A-Za-z]+|\S"), behavior="isolated")  # gaps are tokens too
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                            pad_token="<eos>").save_pretrained(tmp / "tok")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(37):  # not a multiple of the batch size: the last batch is short
        terms = [str(int(x)) for x in rng.integers(0, 10, 1 + k % 4)]  # prompts of 1 to 4 numbers
        total = sum(int(t) for t in terms)
        choices = [str(total), f"{total} + 1", f"{total % 7} = {total % 5} + 2", "3"]  # 1, 3 and 5 tokens
        rows.append({"question": " + ".join(terms) + " =", "choices": choices, "label": k % 4,
                     "answer": f"{total} + 1"})
    (tmp / "sums").mkdir()
    (tmp / "sums" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = load_tasks({
        "sums_mc": {"data": str(tmp / "sums"), "type": "multiple_choice", "prompt": "Question: {question}\nAnswer:",
                    "choices_field": "choices", "gold_field": "label"},
        "sums_gen": {"data": str(tmp / "sums"), "type": "generative", "prompt": "Question: {question}\nAnswer:",
                     "gold_field": "answer", "metric": "rougeL", "generation_size": 6,
                     "stop_sequences": ["\n", "= ="]}})
    return model, tmp / "tok", tasks


# One pass per document: log-likelihoods within this tolerance of one row per choice (float32, sums of a few terms).
TOL = {False: 0.0, True: 1e-5}


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("task", ["sums_mc", "sums_gen"])
def test_mixed_lengths_several_batches(tiny, task, one_pass):
    model, tok, tasks = tiny
    with Evaluator(model, tok, tasks, batch_size=32, one_pass=one_pass) as ev:
        ours, theirs = compare(ev, task)
        assert same_responses(ours, theirs, TOL[one_pass]) is None, same_responses(ours, theirs, TOL[one_pass])
        if task == "sums_mc":
            assert {int((c >= 0).sum()) for r in ours for c in r.output_tokens} == {1, 5, 9}
            assert ev.wrapper.__dict__["one_pass"] == one_pass   # the check on the first batch passed


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("task", ["sums_mc", "sums_gen"])
def test_inputs_cut_to_the_model_length(tiny, task, one_pass):
    model, tok, tasks = tiny
    # prompts have 9 to 21 tokens: most are cut
    with Evaluator(model, tok, tasks, batch_size=32, max_length=12, one_pass=one_pass) as ev:
        ours, theirs = compare(ev, task)
        assert same_responses(ours, theirs, TOL[one_pass]) is None, same_responses(ours, theirs, TOL[one_pass])
        if task == "sums_mc":  # batches holding a cut input are handed to LightEval's own code, and remembered as such
            assert any(prepared is None for _, prepared in ev.wrapper.__dict__["_ll_memo"].values())
            if one_pass: assert any(p is None for _, p in ev.wrapper.__dict__["_one_pass_memo"].values())


@pytest.mark.parametrize("one_pass", [False, True])
def test_weights_change_between_calls(tiny, one_pass):
    "Prepared batches are reused; the model's answers are not: after an edit both paths agree on the new weights."
    model, tok, tasks = tiny
    tol = TOL[one_pass]
    with Evaluator(model, tok, tasks, batch_size=32, one_pass=one_pass) as ev:
        before = {t: compare(ev, t)[0] for t in tasks}
        w = model.model.layers[1].mlp.down_proj.weight
        saved = w.detach().clone()
        with torch.no_grad(): w.add_(torch.randn_like(w) * 3)
        try:
            for t in tasks:
                ours, theirs = compare(ev, t)
                assert same_responses(ours, theirs, tol) is None, same_responses(ours, theirs, tol)
                assert same_responses(ours, before[t]) is not None, f"{t}: answers did not follow the weights"
        finally:
            with torch.no_grad(): w.copy_(saved)
        for t in tasks: assert same_responses(compare(ev, t)[0], before[t]) is None


@pytest.mark.parametrize("checkpoint", ["base", *(f"full-{t}" for t in load_zoo().full)])
def test_zoo_tasks(checkpoint):
    "On the zoo (single-token choices: one pass is the context alone) both paths give LightEval's numbers exactly."
    zoo = load_zoo()
    path = zoo.base if checkpoint == "base" else zoo.full[checkpoint.removeprefix("full-")]
    model = load_model(path)
    for one_pass in (False, True):
        with Evaluator(model, zoo.base, zoo.tasks, one_pass=one_pass) as ev:
            for t in zoo.tasks:
                ours, theirs = compare(ev, t)
                assert same_responses(ours, theirs) is None, f"{checkpoint}, {t}: {same_responses(ours, theirs)}"


def test_fast_paths_off_is_lighteval_unchanged(tiny):
    model, tok, tasks = tiny
    with Evaluator(model, tok, tasks, fast_paths=False) as stock, Evaluator(model, tok, tasks) as fast:
        for t in tasks:
            assert stock.wrapper._loglikelihood_tokens.__func__ is TransformersModel._loglikelihood_tokens
            assert stock.wrapper._padded_greedy_until.__func__ is TransformersModel._padded_greedy_until
            np.testing.assert_array_equal(stock.score(t).per_sample, fast.score(t).per_sample)
        assert "_ll_memo" not in stock.wrapper.__dict__ and "_gen_memo" not in stock.wrapper.__dict__


def test_one_pass_eager_attention(tiny):
    "Eager attention adds the mask as floats: one pass gives the per-choice log-likelihoods there too."
    model, tok, tasks = tiny
    eager = LlamaForCausalLM(LlamaConfig(**model.config.to_dict())).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    with Evaluator(eager, tok, tasks, batch_size=32) as ev:
        ours, theirs = compare(ev, "sums_mc")
        assert ev.wrapper.__dict__["one_pass"]
        assert same_responses(ours, theirs, TOL[True]) is None, same_responses(ours, theirs, TOL[True])


def test_one_pass_falls_back_when_the_mask_is_ignored(tiny, caplog):
    "A model that drops the packed input's mask and positions fails the first batch's check: one row per choice."
    model, tok, tasks = tiny
    forward = model.forward
    model.forward = lambda input_ids, attention_mask=None, position_ids=None, **kw: forward(input_ids, **kw)
    try:
        with Evaluator(model, tok, tasks, batch_size=32) as ev:
            ours, theirs = compare(ev, "sums_mc")
            assert not ev.wrapper.__dict__["one_pass"]
            assert same_responses(ours, theirs) is None, same_responses(ours, theirs)   # exactly LightEval's
        assert "scoring one row per choice" in caplog.text
    finally:
        del model.forward


def test_one_pass_through_prefix_reuse(tiny):
    """The packed batches (mask, positions, kept logits) go through `PrefixForward`: a second pass under the same
    weights starts at a stored block and gives the same responses (verify=True checks every logit against a full
    forward)."""
    from himerge.prefix import PrefixForward
    model, tok, tasks = tiny
    forward = PrefixForward(model, verify=True)
    units = ["embed", *("base" for _ in model.model.layers)]
    with Evaluator(model, tok, tasks, batch_size=32) as ev:
        plain = compare(ev, "sums_mc")[0]
        ev.use_prefix(forward)
        forward.set_weights(units, record_at="all")
        first = compare(ev, "sums_mc")[0]
        forward.set_weights(units)
        again = compare(ev, "sums_mc")[0]
    assert forward.stats["hits"] > 0 and forward.stats["blocks_skipped"] > 0, forward.stats
    for got in (first, again): assert same_responses(got, plain) is None, same_responses(got, plain)
