"""TSV-M, Iso-C and Iso-CTS against references written here from the papers' formulas (numpy, float64), and each
method merging the zoo's full checkpoints from a config."""
import json

import numpy as np
import pytest
import torch

from himerge.svd_merging import iso_c, iso_cts, tsv

torch.set_num_threads(1)


def inv_sqrt(gram):
    "(XᵀX)^(-1/2) by the eigendecomposition of the Gram matrix: no SVD, so independent of the code under test."
    w, q = np.linalg.eigh(gram)
    return q @ np.diag(w ** -0.5) @ q.T

def polar_cols(x):
    "Nearest matrix with orthonormal columns: X (XᵀX)^(-1/2)."
    return x @ inv_sqrt(x.T @ x)

def polar_rows(x):
    "Nearest matrix with orthonormal rows: (XXᵀ)^(-1/2) X."
    return inv_sqrt(x @ x.T) @ x

def ref_tsv(ds, weights, lamb):
    "TSV-M (Gargiulo et al. 2025, Eq. for TSV-Merge): top ⌊min(m,n)/T⌋ triplets per task, U⊥ diag(σ) V⊥ᵀ."
    ds = [w * d for d, w in zip(ds, weights)]
    k = min(ds[0].shape) // len(ds)
    us, ss, vs = zip(*(np.linalg.svd(d, full_matrices=False) for d in ds))
    u = np.concatenate([x[:, :k] for x in us], axis=1)
    s = np.concatenate([x[:k] for x in ss])
    vt = np.concatenate([x[:k] for x in vs], axis=0)
    return lamb * polar_cols(u) @ np.diag(s) @ polar_rows(vt)

def ref_iso_c(ds, weights, lamb):
    "Iso-C (Marczak et al. 2025): U (mean σ) Vᵀ of the sum, i.e. (‖Δ‖_* / min(m,n)) · polar(Δ) for full rank."
    total = sum(w * d for d, w in zip(ds, weights))
    nuclear = np.linalg.svd(total, compute_uv=False).sum()
    polar = polar_cols if total.shape[0] >= total.shape[1] else polar_rows
    return lamb * nuclear / min(total.shape) * polar(total)

def ref_iso_cts(ds, weights, lamb, fraction):
    "Iso-CTS (Marczak et al. 2025, Alg. 1): common top-k of the sum, each task's top directions off it, iso."
    ds = [w * d for d, w in zip(ds, weights)]
    T, r = len(ds), min(ds[0].shape)
    k = int(r * fraction)
    k = r - round((r - k) / T) * T
    per = (r - k) // T
    u, s, vt = np.linalg.svd(sum(ds), full_matrices=False)
    uc = u[:, :k]
    blocks = [np.linalg.svd(d - uc @ uc.T @ d, full_matrices=False) for d in ds]
    U = np.concatenate([b[0][:, :per] for b in blocks] + [uc], axis=1)
    S = np.concatenate([b[1][:per] for b in blocks] + [s[:k]])
    Vt = np.concatenate([b[2][:per] for b in blocks] + [vt[:k]], axis=0)
    return lamb * S.mean() * polar_cols(U) @ polar_rows(Vt)


FIXTURES = [((24, 16), 2), ((16, 24), 3), ((40, 40), 2), ((30, 20), 4)]

def full_rank(shape, n, seed):
    g = np.random.default_rng(seed)
    return [g.standard_normal(shape) * (1 + i) for i in range(n)]

def rel(a, b): return np.linalg.norm(a - b) / np.linalg.norm(b)

@pytest.mark.parametrize("shape,n", FIXTURES)
@pytest.mark.parametrize("spectrum", ["numerical_rank", "full"])
def test_tsv_matches_the_formula(shape, n, spectrum):
    ds, ws = full_rank(shape, n, 1), [1.0, 0.7, 1.3, 0.5][:n]
    got = tsv([torch.tensor(d, dtype=torch.float32) for d in ds], ws, spectrum=spectrum, lamb=1.2).double().numpy()
    assert rel(got, ref_tsv(ds, ws, 1.2)) <= 1e-5

@pytest.mark.parametrize("shape,n", FIXTURES)
@pytest.mark.parametrize("spectrum", ["numerical_rank", "full"])
def test_iso_c_matches_the_formula(shape, n, spectrum):
    ds, ws = full_rank(shape, n, 2), [1.0, 0.7, 1.3, 0.5][:n]
    got = iso_c([torch.tensor(d, dtype=torch.float32) for d in ds], ws, spectrum=spectrum, lamb=0.8).double().numpy()
    assert rel(got, ref_iso_c(ds, ws, 0.8)) <= 1e-5

@pytest.mark.parametrize("shape,n", FIXTURES)
@pytest.mark.parametrize("spectrum", ["numerical_rank", "full"])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_iso_cts_matches_the_formula(shape, n, spectrum, fraction):
    ds, ws = full_rank(shape, n, 3), [1.0, 0.7, 1.3, 0.5][:n]
    got = iso_cts([torch.tensor(d, dtype=torch.float32) for d in ds], ws, common_fraction=fraction, spectrum=spectrum,
                  lamb=1.5).double().numpy()
    assert rel(got, ref_iso_cts(ds, ws, 1.5, fraction)) <= 1e-5

@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_vectors_take_the_weighted_mean(fn):
    a, b = torch.randn(7), torch.randn(7)
    torch.testing.assert_close(fn([a, b], [1.0, 0.5], lamb=2.0), (a + 0.5 * b))

@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_lora_deltas_stay_in_the_sources_span_with_the_numerical_rank(fn):
    g = torch.Generator().manual_seed(4)
    ds = [torch.randn(48, 4, generator=g) @ torch.randn(4, 32, generator=g) for _ in range(2)]
    basis = torch.linalg.svd(torch.cat(ds, dim=1), full_matrices=False)[0][:, :8]   # the joint column space
    def outside(m): return ((m - basis @ (basis.T @ m)).norm() / m.norm()).item()
    assert outside(fn(ds, [1.0, 1.0])) < 1e-4
    if fn is not tsv: assert outside(fn(ds, [1.0, 1.0], spectrum="full")) > 0.5   # the full mean fills every direction


@pytest.mark.parametrize("method,options", [("tsv", {}), ("iso_c", {"lamb": 1.5}),
                                            ("iso_cts", {"common_fraction": 0.5})])
def test_each_method_merges_the_zoo_full_checkpoints_from_a_config(tmp_path, method, options):
    from safetensors.torch import load_file
    from himerge.merge import merge
    from himerge.mergers import per_tensor_methods
    from himerge.methods import get_method, parse_options
    from himerge.zoo import load_zoo
    zoo = load_zoo()
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps(dict(base=str(zoo.base), sources=[dict(path=str(p)) for p in zoo.full.values()],
                                      method=method, options=options, dtype="float32")))   # JSON is YAML
    result = merge(str(config), out=tmp_path / "out", progress=False)
    merged, base = load_file(result.output / "model.safetensors"), load_file(zoo.base / "model.safetensors")
    fulls = [load_file(p / "model.safetensors") for p in zoo.full.values()]
    name = "model.layers.1.self_attn.q_proj.weight"
    fn = {"tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts}[method]
    assert per_tensor_methods()[method].function is fn
    opts = parse_options(get_method(method).options, options)
    expected = fn([f[name] - base[name] for f in fulls], [1.0] * len(fulls), **vars(opts))
    torch.testing.assert_close(merged[name] - base[name], expected, rtol=1e-4, atol=1e-6)
    assert json.loads((result.output / "himerge_report.json").read_text())["method"] == method
