"""Prefix reuse for contribution probes: block passes and time with `PrefixForward` against plain full forwards.

(a) Log-likelihood probes. A random Llama of the field notes' realistic shape (24 blocks, hidden 896, MLP 4864,
    14 heads, 2 KV heads; about 0.36B parameters, vocabulary 512), float32. The contribution analysis' schedule for
    two states (a source and a pre-merge, deltas on every block): the base's reference pass, then per state its
    reference pass, an addition probe per block (θ_F + D^l) and a deletion probe per block (θ_F + D − D^l), each
    probe writing one block's weights in place and putting them back. Every forward runs twice, interleaved: plain
    (`model(input_ids).logits`, the peer) and through `PrefixForward`; their logits must be identical (torch.equal).
    Printed: block passes, and forward wall and process CPU time, with the cache as a ratio of those without, for the
    probes, the reference passes and the whole schedule, and seconds per evaluation both ways. Target (issue 15): probe
    compute <= 0.55x.
(b) Generative tasks: would reusing the prompt's prefill pay? For prompts of 20-60 tokens and 8-16 new tokens,
    greedy `generate` with a KV cache; the prefill (one forward over the prompt) is timed alone, in the same run.
    Printed: prefill's share of generation time (wall, and process CPU time), and the share prefix reuse could save at
    most (the prefill of blocks below the probed one: on average (L-1)/(2L) of it, counting no cost for restoring their
    KV cache).

Run: python bench/bench_prefix.py [--blocks 24] [--batches 2] [--batch-size 4] [--tokens 24] [--threads 2] [--part all]
"""
import argparse, time


def build(blocks: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=896, intermediate_size=4864, num_hidden_layers=blocks,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def loglikelihood_part(args):
    import torch
    from himerge.prefix import PrefixForward, find_blocks
    model = build(args.blocks)
    blocks = find_blocks(model)
    L = len(blocks)
    params = {name: p for name, p in model.named_parameters() if blocks.index_of(name) is not None}
    base = {name: p.detach().clone() for name, p in params.items()}
    gen = torch.Generator().manual_seed(1)
    delta = {s: {name: 0.02 * b.std() * torch.randn(b.shape, generator=gen) for name, b in base.items()}
             for s in ("source", "pre_merge")}
    by_block = [[n for n in params if blocks.index_of(n) == block] for block in range(L)]
    held = ["base"] * L

    def hold(units):
        "Write into each block whose state changes the base's or a state's weights (in place, from the kept base)."
        for block, (now, want) in enumerate(zip(held, units)):
            if now == want: continue
            for name in by_block[block]:
                params[name].copy_(base[name] if want == "base" else base[name] + delta[want][name])
            held[block] = want

    def schedule():
        yield "reference", ["base"] * L, "all"
        for s in ("source", "pre_merge"):
            yield "reference", [s] * L, "all"
            for block in range(L): yield "addition", ["base"] * block + [s] + ["base"] * (L - block - 1), ()
            for block in range(L): yield "deletion", [s] * block + ["base"] + [s] * (L - block - 1), ()
            yield "forget", [s] * L, ()

    gen_ids = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 512, (args.batch_size, args.tokens), generator=gen_ids) for _ in range(args.batches)]
    # warm-up: the first forwards of a process are slower, and would be counted for the peer only
    for ids in batches: model(ids)
    pf = PrefixForward(model)
    plain_s, cached_s, passes_plain, passes_cached = {}, {}, {}, {}
    # process CPU time: less sensitive than wall time to other processes on a shared machine
    plain_cpu, cached_cpu = {}, {}
    evaluations, compared, peak = {}, 0, 0
    t_start = time.perf_counter()
    for n, (kind, units, record_at) in enumerate(schedule()):
        if kind == "forget":
            pf.forget(["embed"] + units, keep=[["embed"] + ["base"] * L]); continue
        hold(units)
        pf.set_weights(["embed"] + units, record_at)
        run_before = pf.stats["blocks_run"]
        for ids in batches:
            c0, t0 = time.process_time(), time.perf_counter()
            full = model(ids).logits
            c1, t1 = time.process_time(), time.perf_counter()
            mine = pf(ids); c2, t2 = time.process_time(), time.perf_counter()
            if not torch.equal(full, mine): raise SystemExit(f"logits differ: {kind} probe {n}, units {units}")
            compared += 1
            plain_s[kind] = plain_s.get(kind, 0.0) + t1 - t0
            cached_s[kind] = cached_s.get(kind, 0.0) + t2 - t1
            plain_cpu[kind] = plain_cpu.get(kind, 0.0) + c1 - c0
            cached_cpu[kind] = cached_cpu.get(kind, 0.0) + c2 - c1
        evaluations[kind] = evaluations.get(kind, 0) + 1
        passes_plain[kind] = passes_plain.get(kind, 0) + L * len(batches)
        passes_cached[kind] = passes_cached.get(kind, 0) + pf.stats["blocks_run"] - run_before
        peak = max(peak, pf.stats["bytes"])
        if args.verbose: print(f"{n:4d} {kind:10s} {time.perf_counter() - t_start:7.1f}s", flush=True)
    hold(["base"] * L)
    assert all(torch.equal(params[n], base[n]) for n in params)

    probes = ("addition", "deletion")
    total = lambda d, kinds: sum(d[k] for k in kinds)
    every = ("reference",) + probes
    parameters = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"(a) log-likelihood probes: {L} blocks, {parameters:.2f}B parameters, float32, {args.batches} batches of "
          f"{args.batch_size} x {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(f"    evaluations: {evaluations}; forwards compared: {compared}, all logits identical (torch.equal)")
    print(f"    cache peak {peak / 2**20:.1f} MiB, {pf.stats['entries']} entries at the end; {pf.stats}")
    for label, kinds in (("probes (addition + deletion)", probes), ("reference passes", ("reference",)),
                         ("whole schedule", every)):
        bp, bc = total(passes_plain, kinds), total(passes_cached, kinds)
        tp, tc = total(plain_s, kinds), total(cached_s, kinds)
        cp, cc = total(plain_cpu, kinds), total(cached_cpu, kinds)
        ev = total(evaluations, kinds)
        print(f"    {label:28s} block passes {bc:5d} / {bp:5d} = {bc / bp:.3f}x"
              f"   wall {tc:7.1f} s / {tp:7.1f} s = {tc / tp:.3f}x   CPU {cc:7.1f} s / {cp:7.1f} s = {cc / cp:.3f}x"
              f"   s per evaluation {tc / ev:5.2f} (cache) vs {tp / ev:5.2f} (plain)")


def generation_part(args):
    import torch
    model = build(args.blocks)
    model.generation_config.temperature = None
    L = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(3)
    print(f"(b) generation: {L} blocks, greedy, KV cache on, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} runs")
    print("    batch  prompt  new   prefill s   generate s   prefill share (wall / CPU)   "
          "at most saved by prefix reuse")
    median = lambda xs: sorted(xs)[len(xs) // 2]
    model(torch.randint(3, 512, (1, 8)), use_cache=True)  # warm-up
    for batch in args.gen_batches:
        for prompt in (20, 40, 60):
            for new in (8, 16):
                ids = torch.randint(3, 512, (batch, prompt), generator=gen)
                mask = torch.ones_like(ids)
                pre, full, pre_cpu, full_cpu = [], [], [], []
                for _ in range(args.repeats):  # prefill and generation alternate, so that both see the same load
                    c0, t0 = time.process_time(), time.perf_counter()
                    model(ids, attention_mask=mask, use_cache=True)
                    c1, t1 = time.process_time(), time.perf_counter()
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                         do_sample=False, pad_token_id=0, eos_token_id=None)
                    c2, t2 = time.process_time(), time.perf_counter()
                    assert out.shape[1] == prompt + new
                    pre.append(t1 - t0); full.append(t2 - t1); pre_cpu.append(c1 - c0); full_cpu.append(c2 - c1)
                p, g = median(pre), median(full)
                share, share_cpu = p / g, median(pre_cpu) / median(full_cpu)
                print(f"    {batch:5d}  {prompt:6d}  {new:3d}   {p:9.3f}   {g:10.3f}   "
                      f"{share:12.3f} / {share_cpu:5.3f}   "
                      f"{share_cpu * (L - 1) / (2 * L):13.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=("all", "loglikelihood", "generation"), default="all")
    ap.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    import torch
    from transformers.utils import logging as hf_logging
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    hf_logging.set_verbosity_error()
    if args.part in ("all", "loglikelihood"): loglikelihood_part(args)
    if args.part in ("all", "generation"): generation_part(args)


if __name__ == "__main__":
    main()
