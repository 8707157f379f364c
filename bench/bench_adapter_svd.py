"""Rank-k truncation of a merged delta for adapter output: full float32 SVD against truncated_factors(method='lowrank').

For a 4096x4096 and a 4096x14336 delta (a TIES-like pruned sum of low-rank products, and a Gaussian one), printed in
one run: the full SVD's time, the optimal relative Frobenius error at k = 16 and 64 (from its singular values), and
lowrank's median time and error, as a ratio to the full SVD's time and to the optimal error. The machine may be shared:
the load average is printed.

Run: python bench/bench_adapter_svd.py [--threads 2]
"""
import argparse, os, statistics, time


def pruned(out, inp, r=16, n=2, density=0.2):
    "TIES-like: the sum of n rank-r products, magnitude-pruned to `density`."
    import torch
    d = sum(torch.randn(out, r) @ torch.randn(r, inp) * 0.01 for _ in range(n))
    threshold = d.abs().flatten().kthvalue(d.numel() - int(d.numel() * density)).values
    return d * (d.abs() > threshold)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from himerge.adapter import truncated_factors
    torch.manual_seed(0); torch.set_num_threads(args.threads)
    print("load at start", os.getloadavg(), flush=True)
    for shape in [(4096, 4096), (4096, 14336)]:
        for kind in ("pruned", "gaussian"):
            d = pruned(*shape) if kind == "pruned" else torch.randn(*shape)
            t = time.perf_counter(); S = torch.linalg.svd(d, full_matrices=False).S; full = time.perf_counter() - t
            total = S.double().square().sum()
            best = {k: (S[k:].double().square().sum() / total).sqrt().item() for k in (16, 64)}
            print(f"{shape} {kind}: full SVD {full:.1f} s; optimal error {best}", flush=True)
            for k in (16, 64):
                times, err = [], None
                for _ in range(3):
                    t = time.perf_counter(); _, _, err = truncated_factors(d, k, method="lowrank")
                    times.append(time.perf_counter() - t)
                med = statistics.median(times)
                print(f"   lowrank k={k}: {med:.2f} s (full SVD / lowrank {full / med:.0f}x), error {err:.5f} "
                      f"({err / best[k] - 1:+.3%} above the optimum)", flush=True)
    print("load at end", os.getloadavg(), flush=True)


if __name__ == "__main__":
    main()
