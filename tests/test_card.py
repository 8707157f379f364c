"Model cards of merge outputs: metadata that parses back with huggingface_hub, and well-formed Markdown."
import json, sys
from pathlib import Path
import pytest
from huggingface_hub import ModelCard, metadata_load
from markdown_it import MarkdownIt

sys.path.insert(0, str(Path(__file__).parent))
from fake_output import make_fake_output, fake_report
from himerge.card import build_card, write_card, CardError, md_table

def tables_in(markdown: str) -> list:
    "The source lines of each pipe table, checked by markdown-it-py to parse as a table (GFM tables on)."
    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(markdown)
    tables = []
    for i, t in enumerate(tokens):
        if t.type == "table_open":
            start, end = t.map
            tables.append(markdown.splitlines()[start:end])
    return tables

def cells(line: str) -> int:
    "Number of cells in a pipe-table row, ignoring escaped pipes."
    return len(line.replace("\\|", "").strip().strip("|").split("|"))

def check_tables(text: str, expected: int):
    body = text.split("\n---\n", 1)[1]  # after the YAML front matter
    tables = tables_in(body)
    assert len(tables) == expected, [t[0] for t in tables]
    assert body.count("\n|---") == expected  # every table written was parsed as a table
    for t in tables:
        assert len(t) >= 3, t
        assert {cells(l) for l in t} == {cells(t[0])}, t

def test_hi_merging_card_metadata_round_trip(tmp_path):
    out = make_fake_output(tmp_path / "m")
    report = fake_report()
    card = build_card(out)
    path = write_card(out)
    assert path == out / "README.md"
    meta = metadata_load(path)
    assert meta["base_model"] == ["himerge-zoo/tiny-base"] + [f"himerge-zoo/lora-{n}" for n in ("arith", "capitals", "antonyms")]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["merge", "himerge", "hi-merging"]
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    results = {(r.task_name, r.dataset_name, r.dataset_type, r.dataset_revision, r.dataset_split, r.metric_type): r.metric_value
               for r in loaded.data.eval_results}
    hub_data = {"arith": ("himerge-zoo/arith-qa", "v1"), "capitals": ("himerge-zoo/capitals", None),
                "antonyms": ("antonyms", None)}  # a local folder is named by its task, never by its path
    assert results == {(t, t, *hub_data[t], "test", report["tasks"][t]["metric"]): v
                       for t, v in report["scores"]["test"]["merged"].items()}
    assert "/srv/data" not in str(card.data.to_yaml())
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)

def test_hi_merging_card_body(tmp_path):
    out = make_fake_output(tmp_path / "m")
    text = ModelCard.load(write_card(out)).content
    check_tables(text, expected=5)  # sources, validation, test, γ per layer, contributions
    for sha in ["a" * 40] + [str(i) * 40 for i in (1, 2, 3)]:
        assert f"`{sha}`" in text and f"/tree/{sha})" in text
    assert "| 1 | -0.050 ± 0.020 | 0.050 ± 0.020 | 0.150 ± 0.020 | severe | 1. kept only capitals |" in text
    assert "| 0 | 0.100 ± 0.020 | 0.200 ± 0.020 | 0.300 ± 0.020 | mutual | kept |" in text
    assert "| **merged** | 0.650 | 0.700 | 0.750 |" in text
    assert "![γ per layer and source](gamma_heatmap.png)" in text
    assert (out / "himerge_config.yaml").read_text().strip() in text
    assert "himerge 0.1.0" in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

def test_baseline_card_has_no_analysis(tmp_path):
    out = make_fake_output(tmp_path / "b", hi_merging=False, license=None)
    card = ModelCard.load(write_card(out))
    assert card.data.license is None and card.data.tags == ["merge", "himerge", "ties"]
    assert "Layer conflicts" not in card.content and "gamma_heatmap" not in card.content and "α" not in card.content
    check_tables(card.content, expected=3)

def test_local_sources_are_not_hub_references(tmp_path):
    out = make_fake_output(tmp_path / "l")
    report = json.loads((out / "himerge_report.json").read_text())
    for s in report["sources"]: s["repo_id"] = None; s["commit_sha"] = None; s["spec"] = f"/data/{s['name']}"
    report["scores"]["test"] = {}
    (out / "himerge_report.json").write_text(json.dumps(report))
    card = build_card(out, model_name="local-merge")
    assert card.data.base_model == ["himerge-zoo/tiny-base"]
    assert "`/data/arith`" in card.content
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}
    check_tables(str(card), expected=4)

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

def test_md_table_escapes_and_checks():
    t = md_table(["a", "b"], [["x|y", 1.0]])
    assert t.splitlines()[2] == "| x\\|y | 1.000 |" and len(tables_in(t)) == 1
    with pytest.raises(CardError): md_table(["a", "b"], [["only one"]])
