"""Every deltas class keeps the declared interface, `himerge.deltas.LayerDeltas`, on the embedded zoo: `isinstance`
holds, each declared method has the Protocol's parameters, a wrapper answers what it passes on as the deltas it wraps
would, and nothing else is forwarded."""
import inspect

import pytest
import torch

from himerge.contributions import LayerMemo, MemoDeltas
from himerge.deltas import Deltas, LayerDeltas, UnitDeltas, compute_deltas
from himerge.prune import ProcessedDeltas
from himerge.layer_edits import LayerEdit, ResolvedDeltas
from himerge.sources import resolve_sources
from himerge.zoo import demo_sources, load_zoo

try: from himerge.run import LoadedBase          # where the merge's run keeps it once merge.py is split
except ImportError: from himerge.merge import LoadedBase

METHODS = [name for name, member in vars(LayerDeltas).items()
           if inspect.isfunction(member) and not name.startswith("_")]


@pytest.fixture(scope="module")
def zoo_deltas():
    zoo = load_zoo()
    with compute_deltas(resolve_sources(demo_sources(zoo), base=str(zoo.base))) as deltas:
        yield deltas


@pytest.fixture(scope="module")
def implementations(zoo_deltas):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(load_zoo().base), dtype=torch.float32)
    processed = ProcessedDeltas(zoo_deltas, density=0.5, scale=0.8)
    return {"Deltas": zoo_deltas, "UnitDeltas": UnitDeltas(zoo_deltas), "ProcessedDeltas": processed,
            "MemoDeltas": MemoDeltas(processed, LayerMemo(2**20)), "ResolvedDeltas": ResolvedDeltas(processed),
            "LoadedBase": LoadedBase(model, zoo_deltas)}


def test_methods_declared():
    assert {"names", "base_layer", "source_layer", "costly", "unassigned_tensors", "close"} <= set(METHODS)


@pytest.mark.parametrize("name", ["Deltas", "UnitDeltas", "ProcessedDeltas", "MemoDeltas", "ResolvedDeltas",
                                  "LoadedBase"])
def test_keeps_the_interface(implementations, name):
    deltas = implementations[name]
    assert isinstance(deltas, LayerDeltas), name
    for method in METHODS:
        declared = list(inspect.signature(getattr(LayerDeltas, method)).parameters)[1:]   # without self
        got = list(inspect.signature(getattr(deltas, method)).parameters)
        assert len(got) == len(declared), (name, method, got, declared)
    layer = deltas.layers[1]
    assert deltas.names(layer) and set(deltas.source_layer(0, layer)) <= set(deltas.base_layer(layer))
    assert len(deltas.source_names) == 2 and isinstance(deltas.costly(0, layer), bool)


def test_wrappers_pass_on_what_they_declare(zoo_deltas, implementations):
    layer = zoo_deltas.layers[1]
    for name in ("UnitDeltas", "ProcessedDeltas", "MemoDeltas", "ResolvedDeltas"):
        wrapper = implementations[name]
        assert "__getattr__" not in vars(type(wrapper)), name
        assert wrapper.source_names == zoo_deltas.source_names, name
        with pytest.raises(AttributeError): wrapper.no_such_member
    units = implementations["UnitDeltas"]
    assert (units.base_store, units.unassigned, units.config) == (zoo_deltas.base_store, zoo_deltas.unassigned,
                                                                 zoo_deltas.config)
    assert units.unassigned_tensors().keys() == zoo_deltas.unassigned_tensors().keys()
    # costly: a raw read is worth a memo (the default), a pruned one too, an unpruned one not; a wrapper asks what it
    # wraps
    processed, memo = implementations["ProcessedDeltas"], implementations["MemoDeltas"]
    assert all(d.costly(0, layer) for d in (zoo_deltas, units, processed, memo))
    plain = ProcessedDeltas(zoo_deltas, density=1.0, scale=0.8)
    assert not plain.costly(0, layer) and not MemoDeltas(plain, LayerMemo(0)).costly(0, layer)
    resolved = ResolvedDeltas(plain)
    assert not resolved.costly(0, layer)
    assert resolved.with_edit(0, layer, LayerEdit("reprune", 0.5, 1.0)).costly(0, layer)


def test_defaults_for_a_minimal_implementation():
    class InMemory(LayerDeltas):
        layers, source_names = [0], ["a"]
        def names(self, layer): return ["w"]
        def base_layer(self, layer): return {"w": torch.zeros(2)}
        def source_layer(self, i, layer): return {"w": torch.ones(2)}
    d = InMemory()
    assert isinstance(d, LayerDeltas) and d.costly(0, 0) is True and d.unassigned_tensors() == {} and d.close() is None
    assert not isinstance(object(), LayerDeltas)
    assert LayerDeltas in Deltas.__mro__       # the defaults are inherited, not copied
