"""A real merge whose base, sources and task data all come from the Hub, resolved offline from a cache laid out as
the Hub's (the zoo's tiny base, two of its LoRA adapters and their task data, each stored as one commit under a
made-up org). Its card records every commit read, the datasets' beside the models', in the sources table and in
`model-index`, and holds no local path. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into its
`constants` at import, so the test patches those as well as the environment."""
import hashlib, json, os, shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

from himerge.card import build_card, local_paths
from himerge.zoo import load_zoo

ORG = "himerge-offline-card-org"


def put_in_cache(cache: Path, repo_id: str, folder: Path, repo_type: str = "model") -> str:
    "Store the files of `folder` as one commit of `repo_id` (branch main) in an HF cache; return the commit's SHA."
    files = sorted(p for p in folder.iterdir() if p.is_file())
    sha = hashlib.sha1(repo_id.encode() + b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    repo = cache / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True); snap.mkdir(parents=True); (repo / "refs").mkdir()
    for p in files:
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        if not blob.exists(): shutil.copy(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs" / "main").write_text(sha)
    return sha


@contextmanager
def offline_hub(cache: Path):
    "huggingface_hub offline, reading `cache` (its constants too, read at import), restored after."
    import huggingface_hub.constants as C
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    constants = (C.HF_HUB_OFFLINE, C.HF_HUB_CACHE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    C.HF_HUB_OFFLINE, C.HF_HUB_CACHE = True, str(cache)
    try: yield
    finally:
        C.HF_HUB_OFFLINE, C.HF_HUB_CACHE = constants
        for k, v in saved.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v


@pytest.fixture(scope="module")
def hub_merge(tmp_path_factory):
    "(output folder, {repo id: commit}, work folder) of a scored task-arithmetic merge of Hub inputs only."
    zoo, work = load_zoo(), tmp_path_factory.mktemp("hub-card")
    cache, shas = work / "hub-cache", {}
    shas[f"{ORG}/zoo-base"] = put_in_cache(cache, f"{ORG}/zoo-base", zoo.base)
    tasks, sources = {}, []
    for t in zoo.demo_tasks:
        adapter = work / f"lora-{t}"
        shutil.copytree(zoo.adapters[t], adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = f"{ORG}/zoo-base"
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        shas[f"{ORG}/lora-{t}"] = put_in_cache(cache, f"{ORG}/lora-{t}", adapter)
        shas[f"{ORG}/data-{t}"] = put_in_cache(cache, f"{ORG}/data-{t}", zoo.tasks[t].data_dir, "dataset")
        shutil.rmtree(adapter)        # only the cache holds the inputs: nothing local can be found by accident
        tasks[t] = {**zoo.tasks[t].to_dict(), "data": f"{ORG}/data-{t}", "limit": 16, "test_limit": 16}   # quick
        sources.append(dict(path=f"{ORG}/lora-{t}", task=t, name=t))
    config = dict(base=f"{ORG}/zoo-base", sources=sources, tasks=tasks, method="task_arithmetic", dtype="float32",
                  options=dict(test_scores=True, cache_dir=str(work / "evaluations")))
    with offline_hub(cache):
        from himerge.merge import merge
        out = merge(config, out=work / "merged", progress=False).output
    return out, shas, work


def embedded_config(text: str) -> str:
    "The YAML of the card's Reproduce section."
    return text.split("## Reproduce", 1)[1].split("```yaml\n", 1)[1].split("\n```", 1)[0]


def test_report_records_the_datasets_commits(hub_merge):
    out, shas, _ = hub_merge
    report = json.loads((out / "himerge_report.json").read_text())
    for t, record in report["tasks"].items():
        assert record["hub"] and record["data"] == f"{ORG}/data-{t}", record
        assert record["commit_sha"] == shas[f"{ORG}/data-{t}"], record
    assert report["base"]["commit_sha"] == shas[f"{ORG}/zoo-base"]


def test_card_names_every_commit_and_no_local_path(hub_merge):
    out, shas, work = hub_merge
    text = (out / "README.md").read_text()
    assert str(work) not in text and local_paths(text) == []
    for repo_id, sha in shas.items():   # models and datasets, each linked at the commit read, its SHA shown
        kind = "datasets/" if "/data-" in repo_id else ""
        assert f"[{repo_id}](https://huggingface.co/{kind}{repo_id}/tree/{sha})" in text, repo_id
        assert f"`{sha}`" in text, repo_id
    assert "(local)" not in text and "Tasks on local data" not in text
    meta = metadata_load(out / "README.md")
    results = meta["model-index"][0]["results"]
    got = {r["dataset"]["name"]: (r["dataset"]["revision"], r["dataset"]["split"]) for r in results}
    assert got == {f"{ORG}/data-{t}": (shas[f"{ORG}/data-{t}"], "test") for t in load_zoo().demo_tasks}
    assert meta["base_model"][0] == f"{ORG}/zoo-base" and meta["base_model_relation"] == "merge"


def test_reproduce_config_pins_every_hub_input(hub_merge, tmp_path):
    """The card's config names each Hub repo at the commit read (a model as `org/name@sha`, a dataset by `revision`),
    says no input was local, holds no machine path, and himerge reads it back: planning it (every source and
    task resolved, no weight loaded) finds the same commits in the offline cache, and the same source names."""
    out, shas, work = hub_merge
    text = (out / "README.md").read_text()
    config_yaml = embedded_config(text)
    assert str(work) not in config_yaml and local_paths(config_yaml) == []
    assert "Every input from the Hub is pinned to the commit this merge read." in text
    assert "local inputs" not in text.split("## Reproduce", 1)[1]
    embedded, demo = yaml.safe_load(config_yaml), load_zoo().demo_tasks
    assert embedded["base"] == f"{ORG}/zoo-base@{shas[f'{ORG}/zoo-base']}"
    assert [(s["path"], s["name"]) for s in embedded["sources"]] == [
        (f"{ORG}/lora-{t}@{shas[f'{ORG}/lora-{t}']}", t) for t in demo]
    assert {t: (s["data"], s["revision"]) for t, s in embedded["tasks"].items()} == {
        t: (f"{ORG}/data-{t}", shas[f"{ORG}/data-{t}"]) for t in demo}
    (tmp_path / "reproduce.yml").write_text(config_yaml)
    from himerge.merge import plan
    with offline_hub(work / "hub-cache"):
        p = plan(tmp_path / "reproduce.yml", out=tmp_path / "again", writer=False)
    assert p.sources.base.commit_sha == shas[f"{ORG}/zoo-base"]
    assert [(s.name, s.commit_sha) for s in p.sources.sources] == [(t, shas[f"{ORG}/lora-{t}"]) for t in demo]
    assert {t: s.data_sha for t, s in p.tasks.items()} == {t: shas[f"{ORG}/data-{t}"] for t in demo}


def test_card_for_the_hub_names_the_repo(hub_merge):
    "The card pushed as `some-user/zoo-merge`: title, model_name and the usage snippet name the repo id."
    out, _, _ = hub_merge
    card = build_card(out, model_name="some-user/zoo-merge")
    assert card.data.model_name == "some-user/zoo-merge" and "\n# some-user/zoo-merge\n" in card.content
    assert 'AutoModelForCausalLM.from_pretrained("some-user/zoo-merge")' in card.content
    assert ModelCard(str(card)).data.eval_results[0].dataset_revision in card.content
