"""What a new user meets first: no file a merge, an adapter export or a push writes names a path of the machine that
made it; the progress bar's total is the plan's, set once; `himerge zoo config` writes a config that runs as is.

Real merges of tiny local models (the world of test_bad_inputs_merge: a 2-block Llama, two LoRA adapters, two tasks
of 3 rows), every input under tmp_path."""
from __future__ import annotations

import io, json, struct, subprocess, sys
from pathlib import Path

import pytest
import tqdm.auto
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_inputs_merge import HIMERGE, run_cli, template, world   # noqa: F401  (fixtures)
from hub_standin import HubStandIn
import himerge
from himerge.card import local_paths
from himerge.merge import merge
from himerge.plan import units_of
from himerge.push import VOCABULARY_FILES, push_to_hub
from himerge.sources import resolve_sources

FORMATS = {"full": {}, "adapter": {"output_format": "adapter"}}


class RecordingBar(tqdm.auto.tqdm):
    "A progress bar that writes to a buffer and records every total it is given."
    bars: list = []
    def __init__(self, *args, **kwargs):
        self.totals = []
        super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False})
        RecordingBar.bars.append(self)
    def __setattr__(self, name, value):
        if name == "total" and "totals" in self.__dict__: self.totals.append(value)
        super().__setattr__(name, value)


def planned_steps(world) -> int:   # noqa: F811 (the fixture's value)
    "The plan's steps: its evaluations, then one per layer written."
    from himerge.deltas import compute_deltas
    p = merge(str(world.cfg), dry_run=True)
    with units_of(compute_deltas(p.sources), p.config) as d: return p.total_evaluations + len(d.layers)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_progress_total_is_set_once_from_the_plan(fmt, world, monkeypatch):   # noqa: F811 (the fixture)
    "The bar's total is the plan's from the first step to the last (steps a method did not need are skipped over)."
    world.edit(lambda c: c["options"].update(FORMATS[fmt]))
    steps = planned_steps(world)
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    RecordingBar.bars = []
    merge(str(world.cfg), progress=True)
    bar = next(b for b in RecordingBar.bars if str(b.desc).startswith("himerge"))
    assert bar.totals == [steps], f"{fmt}: the total went {bar.totals}"
    assert bar.n == steps, f"{fmt}: the bar ended at {bar.n} of {steps}"


def texts_of(folder: Path) -> dict:
    "file -> its text (a .safetensors file: its header), for every file of `folder` that is text."
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.suffix == ".safetensors": data = data[8:8 + struct.unpack("<Q", data[:8])[0]]
        try: out[f.relative_to(folder).as_posix()] = data.decode("utf-8")
        except UnicodeDecodeError: pass   # a figure
    return out


def assert_no_machine_path(folder: Path, *roots):
    "No file of `folder` holds `roots`, the package's folder, or any absolute path that exists here."
    texts = texts_of(folder)
    assert "himerge_report.json" in texts and "README.md" in texts
    for name, text in texts.items():
        for root in (*roots, Path(himerge.__file__).parent):
            assert str(root) not in text, f"{name} holds {root}"
        if Path(name).name not in VOCABULARY_FILES:   # tokens, not paths (tested apart: they are the base's copy)
            assert local_paths(text) == [], f"{name}: {local_paths(text)}"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_no_file_a_merge_writes_names_a_machine_path(fmt, world, tmp_path):   # noqa: F811 (the fixture)
    "Every input is an absolute local path (the adapters name their base by one): none reaches the output."
    for name in ("lora-a", "lora-b"):
        meta = world.root / name / "adapter_config.json"
        config = {**json.loads(meta.read_text()), "base_model_name_or_path": str(world.root / "base")}
        meta.write_text(json.dumps(config))
    world.edit(lambda c: (c.update(base=str(world.root / "base"), output=str(world.root / "merged")),
                          c["options"].update(FORMATS[fmt], tokenizer=str(world.root / "base"))))
    out = merge(str(world.cfg), progress=False).output
    assert_no_machine_path(out, world.root, tmp_path)
    for name in ("tokenizer.json",):   # the base's vocabulary, copied byte for byte
        if (out / name).exists(): assert (out / name).read_bytes() == (world.root / "base" / name).read_bytes()
    report = json.loads((out / "himerge_report.json").read_text())
    assert report["options"]["tokenizer"] == "base"
    if fmt == "adapter":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "base"   # the local base by its folder's name
        card = (out / "README.md").read_text()
        assert "The base was a local folder, `base`" in card and "`base_model_name_or_path`" in card
        # read back as a source of another merge: the base named by the user, no override_base needed
        again = resolve_sources([str(out)], base=str(world.root / "base"))
        assert again.sources[0].declared_base == "base" and again.base.path == world.root / "base"


def test_push_names_the_adapters_base_by_its_hub_id(world, tmp_path, monkeypatch):   # noqa: F811 (the fixture)
    """A pushed adapter names its base by the Hub id its report knows (here set as if the base had come from the
    Hub); no uploaded file names a path of this machine."""
    import huggingface_hub.constants as hf_constants
    world.edit(lambda c: c["options"].update(output_format="adapter"))
    out = merge(str(world.cfg), progress=False).output
    report = json.loads((out / "himerge_report.json").read_text())
    report["base"].update(repo_id="some-user/tiny-base", revision="main", commit_sha="b" * 40)
    (out / "himerge_report.json").write_text(json.dumps(report))
    before = (out / "adapter_config.json").read_bytes()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)   # only the local stand-in is contacted
    with HubStandIn(tokens={"hf_test_token": ("some-user", True)}) as hub:
        push_to_hub(out, "some-user/merged", token="hf_test_token", endpoint=hub.endpoint)
        files = hub.files("some-user/merged")
    pushed = json.loads(files["adapter_config.json"])
    assert (pushed["base_model_name_or_path"], pushed["revision"]) == ("some-user/tiny-base", "b" * 40)
    assert (out / "adapter_config.json").read_bytes() == before   # the local folder is not changed
    for name, data in files.items():
        for root in (world.root, tmp_path): assert str(root).encode() not in data, name


def test_zoo_config_runs_as_is(tmp_path, monkeypatch):
    "`himerge zoo config > merge.yaml`, then `himerge merge merge.yaml`, from another folder, with nothing edited."
    monkeypatch.setenv("HIMERGE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "elsewhere"; work.mkdir()
    written = subprocess.run(f"{HIMERGE} zoo config --method task_arithmetic --limit 8 > merge.yaml", shell=True,
                             cwd=work, capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    config = yaml.safe_load((work / "merge.yaml").read_text())
    assert Path(config["base"]).is_absolute() and config["output"] == "himerge-zoo-merge"
    assert {(t["limit"], t["test_limit"]) for t in config["tasks"].values()} == {(8, 8)}   # 8 rows a split: quick
    ran = subprocess.run([HIMERGE, "merge", "merge.yaml", "--quiet"], cwd=work, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    report = json.loads((work / "himerge-zoo-merge" / "himerge_report.json").read_text())
    assert report["method"] == "task_arithmetic" and set(report["scores"]) == {"validation", "test"}
    assert "merged model written to" in ran.stdout
    plan = subprocess.run(f"{HIMERGE} zoo config > hi.yaml && {HIMERGE} merge hi.yaml --dry-run", shell=True,
                          cwd=work, capture_output=True, text=True)
    assert plan.returncode == 0 and "hi-merging of 2 sources" in plan.stdout, plan.stderr


def test_an_adapter_run_says_what_it_wrote(world, capsys):   # noqa: F811 (the fixture)
    res = run_cli(capsys, "merge", world.cfg, "--as-adapter")
    assert res.code == 0, res.err
    assert "LoRA adapter written to" in res.out and "merged model written" not in res.out
    assert "loading the base model 'base' on cpu" in res.err and "base base" not in res.err


def test_a_missing_input_is_named_once_by_its_field(world, capsys):   # noqa: F811 (the fixture)
    world.edit(lambda c: c["sources"][1].update(path="lora-gone"))
    res = run_cli(capsys, "merge", world.cfg, "--dry-run")
    assert res.code == 2 and res.err.startswith(
        f"himerge: error: sources[1].path: 'lora-gone': no such folder (looked in {world.root / 'lora-gone'})"), res.err
    gone = world.root / "gone"
    world.edit(lambda c: next(iter(c["tasks"].values())).update(data=str(gone)))
    res = run_cli(capsys, "merge", world.cfg, "--dry-run")
    assert res.code == 2 and f"directory '{gone}' not found" in res.err and res.err.count(str(gone)) == 1, res.err


def test_a_file_naming_a_machine_path_is_not_written(world, monkeypatch):   # noqa: F811 (the fixture)
    "A path of this machine that reaches a written file (here the saved config) is a bug: the output is not written."
    import himerge.report as report_module
    from himerge.push import LocalPathLeak
    from test_bad_inputs_merge import staging_left
    monkeypatch.setattr(report_module, "portable_config", lambda p: {"base": str(world.root / "base")})
    with pytest.raises(LocalPathLeak, match=f"himerge_config.yaml would publish local path.*{world.root / 'base'}"):
        merge(str(world.cfg), progress=False)
    assert not (world.root / "merged").exists() and staging_left(world.root) == []
