"""KnOTS against a reference built from the zoo adapters' LoRA factors (thin QRs, no SVD of dense deltas) with PEFT's
own `ties` as the inner merge, and KnOTS merging the zoo's LoRA adapters from a config."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from himerge.baselines import MergeSettings, settings_arguments
from himerge.knots import knots
from himerge.zoo import load_zoo

torch.set_num_threads(1)
LAYER_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj"]


def lora_factors(adapter, module: str):
    "(B·scaling, A) of one module of a PEFT adapter folder, in float64."
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    prefix = f"base_model.model.model.layers.1.{module}"
    a, b = tensors[f"{prefix}.lora_A.weight"].double(), tensors[f"{prefix}.lora_B.weight"].double()
    return b * (cfg["lora_alpha"] / cfg["r"]), a

def reference_knots(factors, density):
    """KnOTS (Stoica et al. 2025): [ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ], from the factors: [B_1 … B_T] = Q_b R_b and
    blockdiag(A_1 … A_T)ᵀ = Q_a R_a, so the SVD is that of the small R_b R_aᵀ; PEFT's ties merges the V_tᵀ."""
    from peft.utils.merge_utils import ties
    bs, as_ = zip(*factors)
    n = as_[0].shape[1]
    qb, rb = np.linalg.qr(torch.cat(bs, dim=1).numpy())
    block = torch.block_diag(*as_).numpy()                    # (Σr) × (T·n)
    qa, ra = np.linalg.qr(block.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    basis, vh = qb @ u * s, vt @ qa.T
    coords = [torch.tensor(vh[:, t * n:(t + 1) * n]) for t in range(len(factors))]
    merged = ties(coords, torch.ones(len(coords), dtype=torch.float64), density)
    return basis @ merged.numpy()

@pytest.mark.parametrize("module", LAYER_MODULES)
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_knots_matches_the_reference_from_the_lora_factors(module, density):
    zoo = load_zoo()
    factors = [lora_factors(zoo.adapters[t], module) for t in zoo.demo_tasks]
    deltas = [(b @ a).float() for b, a in factors]
    got = knots(deltas, [1.0] * len(deltas), densities=[density] * len(deltas),
                settings=MergeSettings(rounding="floor")).double().numpy()
    want = reference_knots(factors, density)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5

@pytest.mark.parametrize("inner", ["ties", "dare_ties"])
def test_knots_merges_the_zoo_lora_adapters_from_a_config(tmp_path, inner):
    from himerge.merge import merge
    from himerge.methods import get_method, parse_options
    zoo = load_zoo()
    config = tmp_path / "merge.yaml"
    options = {"inner": inner}
    config.write_text(json.dumps(dict(base=str(zoo.base), sources=[dict(path=str(zoo.adapters[t]), density=0.7)
                                                                    for t in zoo.demo_tasks],
                                      method="knots", options=options, dtype="float32")))
    result = merge(str(config), out=tmp_path / "out", progress=False)
    merged, base = load_file(result.output / "model.safetensors"), load_file(zoo.base / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert (merged[name] != base[name]).any()
    if inner == "ties":   # deterministic: the written tensor is knots of the adapters' deltas
        factors = [lora_factors(zoo.adapters[t], "self_attn.q_proj") for t in zoo.demo_tasks]
        deltas = [(b @ a).float() for b, a in factors]
        opts = vars(parse_options(get_method("knots").options, options))
        torch.testing.assert_close(merged[name] - base[name], knots(deltas, [1.0, 1.0], densities=[0.7, 0.7],
                                                                   **settings_arguments(opts)),
                                   rtol=1e-4, atol=1e-6)
    assert json.loads((result.output / "himerge_report.json").read_text())["method"] == "knots"
