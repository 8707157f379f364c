"""Multiple choice from one pass per document against one row per choice, on the zoo's `last` task (4 choices).

Both evaluators score the same model on the same documents in the same process: `Evaluator(..., one_pass=False)`
(one row per choice, as LightEval builds them: a 4-choice row runs its context 4 times; today's path before issue 31)
and the default `Evaluator(...)` (one pass per document: the context once, the choices after it under a mask; with
single-token choices, the context alone). Calls alternate old/new so that load on the shared machine hits both alike;
printed: the median and the best seconds per evaluation of each, their ratio (new / old), and the largest difference
between the two paths' log-likelihoods and whether every per-sample score is the same.

Models: `zoo` (the zoo's base, as shipped: 4 blocks, hidden 128) or `realistic` (the field notes' realistic shape, 24
blocks, hidden 896, random weights, over the zoo's tokenizer: the forward dominates). Target (issue 31): <= 0.35x.

Run: python bench/bench_choices.py [--model zoo|realistic] [--reps 15] [--threads 1]
"""
import argparse, statistics, time


def build_model(kind: str):
    import torch
    from himerge.loading import load_model
    from himerge.zoo import load_zoo
    zoo = load_zoo()
    if kind == "zoo": return load_model(zoo.base), zoo
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(str(zoo.base)))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), zoo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("zoo", "realistic"), default="zoo")
    ap.add_argument("--task", default="last", help="a multiple-choice task of the zoo")
    ap.add_argument("--reps", type=int, default=15, help="evaluations per path (alternated)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import numpy as np, torch
    from himerge.evaluate import Evaluator
    torch.set_num_threads(args.threads)
    model, zoo = build_model(args.model)
    old = Evaluator(model, zoo.base, zoo.tasks, one_pass=False)
    new = Evaluator(model, zoo.base, zoo.tasks)
    task, docs = args.task, old.docs[args.task]
    choices = {len(d.choices) for d in docs}
    # Warm-up (and the documents' batches prepared) on both; then the same numbers?
    a, b = old.score(task), new.score(task)
    with torch.no_grad():
        lo = np.array([r.logprobs for r in old.wrapper._loglikelihood_tokens(docs)])
        ln = np.array([r.logprobs for r in new.wrapper._loglikelihood_tokens(docs)])
    seconds = {"old": [], "new": []}
    for _ in range(args.reps):
        for name, ev in (("old", old), ("new", new)):
            t0 = time.perf_counter(); ev.score(task); seconds[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    best = {k: min(v) for k, v in seconds.items()}
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), task {task}: "
          f"{len(docs)} rows, {sorted(choices)} choices, {args.threads} thread(s), {args.reps} alternated calls each")
    print(f"one pass used: {new.wrapper.__dict__.get('one_pass')}")
    print(f"log-likelihoods: largest |new - old| = {np.abs(ln - lo).max():.3g}; per-sample scores the same: "
          f"{bool(np.array_equal(a.per_sample, b.per_sample))} (score {a.score:.4f} / {b.score:.4f})")
    print(f"{'':24}{'old (row per choice)':>22}{'new (one pass)':>18}{'new / old':>12}")
    for label, v in (("median s/evaluation", med), ("best s/evaluation", best)):
        print(f"{label:24}{v['old']:>22.4f}{v['new']:>18.4f}{v['new'] / v['old']:>12.2f}")
    old.close(); new.close()


if __name__ == "__main__":
    main()
