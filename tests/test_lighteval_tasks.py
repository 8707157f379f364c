"""A task named as LightEval names it (`lighteval|arc:easy|0`) runs offline: its data laid out as a Hub cache
(`datasets--allenai--ai2_arc`, the subset ARC-Easy as split shards), LightEval's own config, prompt function and
metric, scored by himerge's Evaluator on the zoo's base. The same rows written out as a himerge task (the prompt
and choices arc's prompt function makes) give the same per-sample scores: the registry task is what is scored.
huggingface_hub reads HF_HUB_CACHE into its `constants` at import, so the test patches it too."""
import json

import numpy as np
import pytest
import torch

from himerge.evaluate import Evaluator, build_docs
from himerge.loading import load_model
from himerge.task_data import TaskError, _fake_hub_cache
from himerge.tasks import load_tasks
from himerge.zoo import load_zoo

torch.set_num_threads(1)
QUESTIONS = [("What is 2 + 2?", ["3", "4", "5"], "B"), ("The capital of France is?", ["Paris", "Rome", "Oslo"], "A"),
             ("Ice is?", ["hot", "gas", "cold"], "C"), ("Which is an animal?", ["stone", "cat", "cloud"], "B"),
             ("Water boils at?", ["100 C", "10 C", "0 C"], "A"), ("The sky is?", ["green", "red", "blue"], "C")]
ROWS = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
        for i, (q, c, k) in enumerate(QUESTIONS)]
SHA = "a1" * 20


@pytest.fixture
def arc_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as C
    cache = tmp_path / "hub"
    files = {f"ARC-Easy/{split}-00000-of-00001.jsonl": "".join(json.dumps(r) + "\n" for r in rows)
             for split, rows in (("train", ROWS[:2]), ("validation", ROWS[:4]), ("test", ROWS[2:]))}
    _fake_hub_cache(cache, "allenai/ai2_arc", files, sha=SHA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True); monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    return cache


def test_registry_task_scores_offline_as_the_same_task_written_out(arc_cache, tmp_path):
    zoo = load_zoo()
    named = load_tasks({"science": {"lighteval": "lighteval|arc:easy|0", "limit": 3, "test_limit": 3}})["science"]
    assert (named.data, named.data_sha, named.split, named.limit) == ("allenai/ai2_arc", SHA, "validation", 3)
    written = tmp_path / "science"
    written.mkdir()
    for split, rows in (("validation", ROWS[:4]), ("test", ROWS[2:])):
        (written / f"{split}.jsonl").write_text("".join(json.dumps(
            {"question": r["question"], "options": [f" {t}" for t in r["choices"]["text"]],
             "label": "ABC".index(r["answerKey"])}) + "\n" for r in rows))
    own = load_tasks({"science": {"data": str(written), "type": "multiple_choice", "prompt": "Question: {question}\n"
                                  "Answer:", "choices_field": "options", "gold_field": "label", "limit": 3,
                                  "test_limit": 3}})["science"]
    # the documents LightEval's arc prompt makes of the first `limit` rows, in row order: the written-out task's
    for spec in (named, named.with_split("test")):
        twin = own if spec.split == "validation" else own.with_split("test")
        view = lambda docs: [(d.query, list(d.choices), d.gold_index) for d in docs]
        assert view(build_docs(spec)) == view(build_docs(twin)) and len(build_docs(spec)) == 3
    model = load_model(zoo.base)
    scores = {}
    for label, spec in (("registry", named), ("written", own)):
        with Evaluator(model, zoo.base, {"science": spec}, batch_size=8) as ev:
            scores[label] = (ev.score("science"), ev.tasks["science"].with_split("test"))
        with Evaluator(model, zoo.base, {"science": scores[label][1]}, batch_size=8) as ev:
            scores[label] = scores[label][0], ev.score("science")
    for split in (0, 1):
        a, b = scores["registry"][split], scores["written"][split]
        assert a.n == b.n == 3                                  # the first `limit` rows of each split
        np.testing.assert_array_equal(a.per_sample, b.per_sample)
    print({k: (v[0].score, v[1].score) for k, v in scores.items()})


def test_unknown_name_lists_close_names(arc_cache):
    with pytest.raises(TaskError, match=r"task 'science', field 'lighteval': 'arc:easyy' is not a task of LightEval's "
                                        r"registry; close names: arc:easy"):
        load_tasks({"science": {"lighteval": "lighteval|arc:easyy|0"}})


def test_missing_split_in_the_cache_is_named(arc_cache):
    with pytest.raises(TaskError, match="task 'science', field 'split'.*no 'dev' split"):
        load_tasks({"science": {"lighteval": "arc:easy|0", "split": "dev"}})
