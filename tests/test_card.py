"""Model cards of merge outputs: metadata that parses back with huggingface_hub and follows the Hub's conventions,
well-formed Markdown, and no local path of the machine that made the merge, on real merges from local folders."""
import json, re, sys
from pathlib import Path
import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load
from markdown_it import MarkdownIt

sys.path.insert(0, str(Path(__file__).parent))
from fake_output import make_fake_output, fake_report, make_merge_output, make_zoo_merge_output
from himerge.card import (build_card, write_card, CardError, CardLeakError, local_paths, hub_metric, template_path,
                          card_data)
from himerge.card_sections import md_table, layer_key, gamma_table
from himerge.errors import InputError
from himerge.zoo import load_zoo

HUB_METRICS = {"accuracy", "rougeL", "rouge1", "rouge2", "bleu", "exact_match"}

def tables_in(markdown: str) -> list:
    "The source lines of each pipe table, checked by markdown-it-py to parse as a table (GFM tables on)."
    md = MarkdownIt("commonmark").enable("table")
    return [markdown.splitlines()[t.map[0]:t.map[1]] for t in md.parse(markdown) if t.type == "table_open"]

def cells(line: str) -> int:
    "Number of cells in a pipe-table row, ignoring escaped pipes."
    return len(line.replace("\\|", "").strip().strip("|").split("|"))

def check_tables(text: str, expected: int):
    "The body holds `expected` tables, each parsed as a table, each row as wide as its header."
    body = text.split("\n---\n", 1)[1]  # after the YAML front matter
    tables = tables_in(body)
    assert len(tables) == expected, [t[0] for t in tables]
    assert body.count("\n|---") == expected  # every table written was parsed as a table
    for t in tables:
        assert len(t) >= 3, t
        assert {cells(line) for line in t} == {cells(t[0])}, t

def folded(text: str) -> list:
    "The tables folded into <details> blocks, by their summary."
    return re.findall(r"<details>\n<summary>(.*?)</summary>\n\n\|", text)

def assert_no_local_path(text: str, *roots):
    "No absolute path of this machine in `text`: none of `roots`, no existing path at all."
    for root in roots: assert str(root) not in text, root
    assert local_paths(text) == []
    assert not re.search(r"(?m)^output:", text)   # the embedded config has no output folder


# ---------------------------------------------------------------- metadata

def test_hi_merging_card_metadata_round_trip(tmp_path):
    out = make_fake_output(tmp_path / "m")
    report = fake_report()
    card = build_card(out)
    path = write_card(out)
    assert path == out / "README.md"
    meta = metadata_load(path)
    sources = [f"himerge-zoo/lora-{n}" for n in ("arith", "capitals", "antonyms")]
    assert meta["base_model"] == ["himerge-zoo/tiny-base"] + sources
    assert (meta["base_model_relation"], meta["library_name"], meta["license"]) == \
        ("merge", "transformers", "apache-2.0")
    assert meta["tags"] == ["merge", "himerge", "hi-merging"] and meta["pipeline_tag"] == "text-generation"
    assert meta["model-index"][0]["name"] == "m"
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    results = {(r.task_name, r.dataset_type, r.dataset_revision, r.dataset_split, r.metric_type): r.metric_value
               for r in loaded.data.eval_results}
    # only tasks on Hub data, named by the dataset id, at the commit read; the local `antonyms` data is not listed
    merged, shas = report["scores"]["test"]["merged"], {t: r["commit_sha"] for t, r in report["tasks"].items()}
    assert results == {
        ("arith", "himerge-zoo/arith-qa", shas["arith"], "test", "accuracy"): merged["arith"],
        ("capitals", "himerge-zoo/capitals", shas["capitals"], "test", "exact_match"): merged["capitals"]}
    # a report written before commits were recorded: the revision asked for
    older = {**report, "tasks": {t: {k: v for k, v in r.items() if k != "commit_sha"}
                                 for t, r in report["tasks"].items()}}
    assert {r.dataset_revision for r in card_data(older, "m").eval_results} == {"v1", None}
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)

@pytest.mark.parametrize("metric", ["loglikelihood_acc", "rougeL", "rouge1", "rouge2", "bleu", "exact_match"])
def test_model_index_metric_names_follow_the_hub(tmp_path, metric):
    from himerge.tasks import METRICS
    assert metric in {m for ms in METRICS.values() for m in ms}   # every metric himerge scores is covered here
    out = make_fake_output(tmp_path / "m")
    report = json.loads((out / "himerge_report.json").read_text())
    report["tasks"]["arith"]["metric"] = metric
    (out / "himerge_report.json").write_text(json.dumps(report))
    types = {r.task_name: r.metric_type for r in ModelCard.load(write_card(out)).data.eval_results}
    assert types["arith"] == hub_metric(metric) and types["arith"] in HUB_METRICS
    assert types["arith"] == ("accuracy" if metric == "loglikelihood_acc" else metric)

def test_every_himerge_metric_has_a_hub_name():
    from himerge.tasks import METRICS
    assert {hub_metric(m) for ms in METRICS.values() for m in ms} <= HUB_METRICS

def test_validation_scores_name_the_analysis_split(tmp_path):
    out = make_fake_output(tmp_path / "m")
    report = json.loads((out / "himerge_report.json").read_text())
    report["scores"]["test"] = {}
    report["tasks"]["arith"]["split"] = "dev"
    (out / "himerge_report.json").write_text(json.dumps(report))
    card = build_card(out)
    assert {r.task_name: r.dataset_split for r in card.data.eval_results} == {"arith": "dev", "capitals": "validation"}
    assert "### Test" not in card.text


# ---------------------------------------------------------------- body

def test_hi_merging_card_body(tmp_path):
    out = make_fake_output(tmp_path / "m")
    text = ModelCard.load(write_card(out)).content
    check_tables(text, expected=7)  # sources, options, validation, test, γ, resolution steps, contributions
    assert "\n# m\n" in text and "https://arxiv.org/abs/2506.12379" in text
    assert 'AutoModelForCausalLM.from_pretrained("m")' in text
    for sha in ["a" * 40] + [str(i) * 40 for i in (1, 2, 3)]:
        assert f"`{sha}`" in text and f"/tree/{sha})" in text
    # long per-layer tables fold; the γ table marks significant conflicts in bold and says what that means
    assert folded(text) == ["γ per layer and source, conflict class and action (2 layers)",
                            "Resolution steps: the merge's validation scores before → after each step",
                            "Layer contributions: α (deletion), β (addition) and c = α + β, ± standard error"]
    assert "| 1 | -0.050 ± 0.030 | 0.050 ± 0.030 | **0.150 ± 0.030** | severe | 1. kept only capitals |" in text
    assert "| 0 | **0.100 ± 0.030** | **0.200 ± 0.030** | **0.300 ± 0.030** | mutual | kept |" in text
    assert "**Bold** γ marks a significant conflict" in text and "Significant conflicts: 4" in text
    # a task below the base is flagged, and the legend says so; the share of each source's gain kept is shown
    assert "| **merged** | 0.450 | 0.500 | 0.300 ▼ | 70% | 70% | -55% |" in text
    assert "| task arithmetic (plain sum) | 0.420 | 0.470 | 0.520 | 55% | 55% | 55% |" in text
    assert "▼ marks a task where a merge scores below the base" in text
    assert "Below the base: antonyms (merged, test)." in text
    assert '"gain kept: X" is (merge − base) ÷ (X − base)' in text
    assert "Tasks on local data (antonyms) are not in this card's `model-index`" in text
    assert "![γ per layer and source](gamma_heatmap.png)" in text
    embedded = yaml.safe_load(text.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    written = yaml.safe_load((out / "himerge_config.yaml").read_text())
    written["options"].pop("cache_dir")   # null in the file; the card leaves the cache folder out altogether
    # Hub inputs pinned to the commits read (the file names the branches and tags it was given)
    written["base"] = "himerge-zoo/tiny-base@" + "a" * 40
    for s, digit in zip(written["sources"], "123"): s["path"] = s["path"].split("@")[0] + "@" + digit * 40
    written["tasks"]["arith"].update(data="himerge-zoo/arith-qa", revision="7" * 40)
    written["tasks"]["capitals"].update(revision="8" * 40)
    assert embedded == written
    assert "himerge 0.1.0" in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

def test_only_the_options_that_apply(tmp_path):
    out = make_fake_output(tmp_path / "b", hi_merging=False, license=None)
    text = build_card(out).text
    options = text.split("| option | value | meaning |", 1)[1].split("\n\n", 1)[0]
    shown = re.findall(r"^\| `(\w+)` \|", options, re.M)
    # TIES' own options, then the one run option changed from its default (batch_size 16); not seed, shard size, ...
    assert shown == ["arithmetic", "divide", "lamb", "majority", "rounding", "sign_on", "batch_size"]
    assert "| `batch_size` | `16` | evaluation batch size |" in options

def test_baseline_card_has_no_analysis(tmp_path):
    out = make_fake_output(tmp_path / "b", hi_merging=False, license=None)
    card = ModelCard.load(write_card(out))
    assert card.data.license is None and card.data.tags == ["merge", "himerge", "ties"]
    assert "Layer conflicts" not in card.content and "gamma_heatmap" not in card.content and "α" not in card.content
    assert "<details>" not in card.content and "baseline method" in card.content
    assert "https://arxiv.org/abs/2506.12379" in card.content
    check_tables(card.content, expected=4)   # sources, options, validation, test

def test_adapter_card(tmp_path):
    out = make_fake_output(tmp_path / "a", adapter=True, grids=True)
    path = write_card(out, model_name="some-user/merged-lora")
    meta, card = metadata_load(path), ModelCard.load(path)
    assert (meta["library_name"], meta["base_model"], meta["base_model_relation"]) == \
        ("peft", "himerge-zoo/tiny-base", "adapter")
    assert "lora" in meta["tags"] and card.data.model_name == "some-user/merged-lora"
    text = card.content
    assert 'base = AutoModelForCausalLM.from_pretrained("himerge-zoo/tiny-base", revision="main")' in text
    assert 'model = PeftModel.from_pretrained(base, "some-user/merged-lora")' in text
    assert "largest relative error (Frobenius norm) is 1.23e-02" in text
    summaries = folded(text)
    assert summaries[:3] == [f"{n} on {n}: best p = 0.5, λ = 1" for n in ("arith", "capitals", "antonyms")]
    assert summaries[-1] == "Rank and relative error of each tensor (2 tensors)"
    assert "| 0.5 | 0.450 | **0.600** |" in text
    check_tables(text, expected=1 + 1 + 3 + 2 + 3 + 1)   # sources, options, grids, scores, analysis, adapter tensors

def test_adapter_of_a_local_base_names_no_hub_base(tmp_path):
    out = make_fake_output(tmp_path / "a", adapter=True)
    report = json.loads((out / "himerge_report.json").read_text())
    report["base"].update(repo_id=None, commit_sha=None, revision=None, spec="tiny-base")
    (out / "himerge_report.json").write_text(json.dumps(report))
    card = build_card(out)
    meta = card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta and meta["library_name"] == "peft"
    assert 'AutoModelForCausalLM.from_pretrained("tiny-base")' in card.text
    assert "The base was a local folder" in card.text

def test_layer_units_sort_in_model_order(tmp_path):
    report = fake_report()
    units = ["lm_head", "10.mlp", "2.attn", "norm", "10.attn", "embed", "2.mlp"]
    report["gamma"] = [dict(layer=u, source=s["name"], gamma=0.1, gamma_se=0.01, significant=True)
                       for u in units for s in report["sources"]]
    rows = [line.split(" | ")[0].strip("| ") for line in gamma_table(report).splitlines()[2:]]
    assert rows == ["embed", "2.attn", "2.mlp", "10.attn", "10.mlp", "norm", "lm_head"]
    assert sorted([3, 1, "0"], key=layer_key) == ["0", 1, 3]

def test_template_is_shipped_with_the_package():
    "The template is package data (pyproject's package-data), found beside the module, not in the repository root."
    import himerge
    path = template_path()
    assert path.is_file() and Path(himerge.__file__).parent in path.parents
    assert "{{ card_data }}" in path.read_text()


# ---------------------------------------------------------------- no local path

def test_real_merge_of_local_folders_card_has_no_local_path(tmp_path):
    "A real task-arithmetic merge of two tiny LoRA adapters, every input a local folder under tmp_path."
    out = make_merge_output(tmp_path)
    assert json.loads((tmp_path / "adapter-a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "tiny-base")   # the inputs do hold absolute paths
    text = (out / "README.md").read_text()
    assert_no_local_path(text, tmp_path)
    meta = metadata_load(out / "README.md")
    assert "base_model" not in meta and "model-index" not in meta and meta["model_name"] == "merged"
    assert "\n# merged\n" in text and 'AutoModelForCausalLM.from_pretrained("merged")' in text
    assert "| adapter-a | `adapter-a` (local) | lora |" in text and "`tiny-base` (local)" in text
    assert "No task was given" in text
    embedded = yaml.safe_load(text.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    assert embedded["base"] == "tiny-base" and [s["path"] for s in embedded["sources"]] == ["adapter-a", "adapter-b"]
    assert "output" not in embedded and "cache_dir" not in embedded["options"]
    check_tables(text, expected=2)

    # the same output with a Hi-Merging-like report, written as an older himerge did: absolute paths in the report's
    # specs and task data, and in the config (with its output folder)
    report = json.loads((out / "himerge_report.json").read_text())
    report["base"]["spec"] = str(tmp_path / "tiny-base")
    for s, name in zip(report["sources"], ("adapter-a", "adapter-b")): s.update(spec=str(tmp_path / name), task=name)
    names = ("adapter-a", "adapter-b")
    report.update(method="hi-merging",
                  tasks={n: dict(metric="rougeL", data=str(tmp_path / "data" / n), split="validation") for n in names})
    fake = fake_report()
    scores = lambda v: {"adapter-a": v, "adapter-b": v + 0.1}
    report["scores"] = dict(validation=dict(base=scores(0.1), merged=scores(0.3), pre_merge=scores(0.2),
                                            sources={"adapter-a": scores(0.5), "adapter-b": scores(0.4)}))
    report["gamma"] = [dict(g, source={"arith": "adapter-a", "capitals": "adapter-b"}[g["source"]])
                       for g in fake["gamma"] if g["source"] != "antonyms"]
    report.update(classes=fake["classes"], decisions=fake["decisions"], resolution=fake["resolution"],
                  contributions=[dict(c, state="pre_merge", task="adapter-a") for c in fake["contributions"]])
    (out / "himerge_report.json").write_text(json.dumps(report))
    config = yaml.safe_load((out / "himerge_config.yaml").read_text())
    config.update(base=str(tmp_path / "tiny-base"), output=str(tmp_path / "merged"),
                  tasks={n: dict(data=str(tmp_path / "data" / n), type="generative") for n in names})
    config["options"]["cache_dir"] = str(tmp_path / "cache")
    for s, name in zip(config["sources"], ("adapter-a", "adapter-b")): s["path"] = str(tmp_path / name)
    (out / "himerge_config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "data" / "adapter-a").mkdir(parents=True); (tmp_path / "cache").mkdir()   # paths that exist here
    text = str(build_card(out))
    assert_no_local_path(text, tmp_path)
    assert "Layer conflicts and resolution" in text and len(folded(text)) == 3
    assert "Tasks on local data (adapter-a, adapter-b)" in text

@pytest.fixture(scope="module")
def zoo_output(tmp_path_factory):
    "A real, scored task-arithmetic merge of two zoo LoRA sources, with their task data, copied to local folders."
    root = tmp_path_factory.mktemp("zoo-merge")
    return root, make_zoo_merge_output(root)

def test_real_scored_merge_of_local_folders(zoo_output):
    import himerge
    root, out = zoo_output
    text = (out / "README.md").read_text()
    assert_no_local_path(text, root, Path(himerge.__file__).parent)
    report = json.loads((out / "himerge_report.json").read_text())
    check_tables(text, expected=4)   # sources, options, validation, test
    merged, base = report["scores"]["test"]["merged"], report["scores"]["test"]["base"]
    mc, gen = load_zoo().demo_tasks                                  # the pair the merge output holds
    assert f"| **merged** | {merged[mc]:.3f}" in text
    assert f"| base | {base[mc]:.3f} | {base[gen]:.3f} |" in text
    assert f"- Metrics: {mc}: accuracy (LightEval `loglikelihood_acc`); {gen}: rougeL." in text
    assert f"Tasks on local data ({mc}, {gen})" in text
    assert "model-index" not in metadata_load(out / "README.md")   # local data: no dataset the Hub can name
    # the below-base flag follows the real scores, both ways
    below = [t for t in merged if merged[t] < base[t]]
    assert ("No merge scores below the base." in text) == (not below and all(
        report["scores"]["test"]["task_arithmetic"][t] >= base[t] for t in base))

def test_below_base_flag_on_real_scores(zoo_output, tmp_path):
    """The real scores, with the merge's generative task's test score set below the base's: flagged in the table and
    the legend."""
    import shutil
    root, out = zoo_output
    copy = tmp_path / "merged"; shutil.copytree(out, copy)
    report = json.loads((copy / "himerge_report.json").read_text())
    test = report["scores"]["test"]
    gen = load_zoo().demo_tasks[1]
    test["merged"][gen] = test["base"][gen] / 2
    (copy / "himerge_report.json").write_text(json.dumps(report))
    text = build_card(copy).text
    row = [line for line in text.splitlines() if line.startswith("| **merged** |")][-1]   # the test table's
    assert f"| {test['merged'][gen]:.3f} ▼ |" in row and row.count("▼") == 1
    assert f"Below the base: {gen} (merged, test)." in text

def test_card_with_a_local_path_is_refused(tmp_path):
    "A path of this machine that reaches the card (here through a decision's text) is a bug: nothing is written."
    out = make_fake_output(tmp_path / "m")
    report = json.loads((out / "himerge_report.json").read_text())
    report["decisions"][0]["action"] = f"kept only {tmp_path / 'm'}"
    (out / "himerge_report.json").write_text(json.dumps(report))
    with pytest.raises(CardLeakError, match=re.escape(str(tmp_path / "m"))): write_card(out)
    assert not (out / "README.md").exists() and not issubclass(CardLeakError, InputError)

def test_a_prompt_may_quote_a_path(tmp_path):
    "The tasks' prompts are the user's own text: a path quoted there is published as written, and refuses nothing."
    out = make_fake_output(tmp_path / "m")
    config = yaml.safe_load((out / "himerge_config.yaml").read_text())
    config["tasks"]["arith"]["prompt"] = f"List the files of {tmp_path}: {{question}}"
    (out / "himerge_config.yaml").write_text(yaml.safe_dump(config))
    text = str(build_card(out))
    assert f"List the files of {tmp_path}" in text and local_paths(text) == [str(tmp_path)]

def test_local_path_detection():
    home = Path.home()
    assert local_paths(f"`{home}` and https://huggingface.co{home} and a{home}") == [str(home)]
    assert local_paths("/no/such/place, (x − y) / (z), λ/p, ~/no-such-file-here") == []


# ---------------------------------------------------------------- errors and tables

def test_write_card_refuses_foreign_readme_and_missing_report(tmp_path):
    out = make_fake_output(tmp_path / "m")
    (out / "README.md").write_text("# notes of mine\n")
    with pytest.raises(CardError, match="force=True"): write_card(out)
    assert (out / "README.md").read_text() == "# notes of mine\n"
    write_card(out, force=True)
    write_card(out)  # our own card is simply replaced
    with pytest.raises(CardError, match="himerge_report.json"): build_card(tmp_path)
    (out / "himerge_report.json").write_text("{")
    with pytest.raises(CardError, match="not valid JSON"): build_card(out)
    (out / "himerge_report.json").write_text(json.dumps({"method": "ties", "base": {}, "sources": "x", "scores": {}}))
    with pytest.raises(CardError, match="'sources' is not a list"): build_card(out)
    assert issubclass(CardError, InputError)

def test_md_table_escapes_and_checks():
    t = md_table(["a", "b"], [["x|y", 1.0]])
    assert t.splitlines()[2] == "| x\\|y | 1.000 |" and len(tables_in(t)) == 1
    with pytest.raises(ValueError): md_table(["a", "b"], [["only one"]])
