"""Bad input at the merge and command-line level, as a new user meets it: YAML files on disk and `himerge merge ...`.

Each case breaks a copy of a small valid world (a random 2-block Llama base with the zoo's tokenizer, two random LoRA
adapters, three rows of a multiple-choice and a generative task, a Hi-Merging config, and some files of the user's),
runs `himerge.cli.main([...])` in-process, and checks: the exit code, one line on stderr naming the culprit (file,
field, line, folder), no traceback, no weight loaded, and every file of the world (inputs, the user's files, old
outputs) byte for byte as it was, with no staging folder left. A few cases run the installed `himerge` script.

The categories are issue 17's: 1 never destroy an input or a user's file (NEVER_DESTROY); 4 everything checkable
before weights load is checked before they load (BEFORE_WEIGHTS, each case in the dry run and in a real run, and a
source without gain stopped at its own score); 6 Ctrl-C (in-process, and a real SIGINT to the script), the dry run on
an existing output, planned evaluations = evaluations run (PLANS: every registered method); 7 no traceback for an
input error (CONFIG_FILE, and every refusal above; a programming error keeps its traceback). A case whose fix belongs
to a notebook this file's author does not own is a strict xfail whose reason names the function and the fix.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import himerge.merge as merge_module
import himerge.plan as plan_module
from himerge.cli import main
from himerge.methods import METHODS
from himerge.zoo import load_zoo

torch.set_num_threads(1)

HIMERGE = str(Path(sys.executable).parent / "himerge")   # the console script of this environment
ROWS = 3                                                  # rows per split of each task: enough to score, fast
STAGING = re.compile(r"^\..*\.(tmp|old)-\d+$|^\.himerge-write-test-")


# --- the valid world ---------------------------------------------------------------------------------------------

def _tiny_models(root: Path):
    "base/ (random 2-block Llama, the zoo's tokenizer), lora-a/ and lora-b/ (random LoRA, non-zero B)."
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    for f in ("tokenizer.json", "tokenizer_config.json"): shutil.copy(load_zoo().base / f, root / "base" / f)
    for seed, name in enumerate(("lora-a", "lora-b"), start=1):
        torch.manual_seed(seed)
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])
        model = get_peft_model(copy.deepcopy(base), lora)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n: p.normal_(0, 0.5)
        model.save_pretrained(root / name)
        meta = root / name / "adapter_config.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_model_name_or_path": "../base"}))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    "The valid world: a config, its inputs, and files of the user's (notes.txt, mine/, an old merge output)."
    zoo = load_zoo()
    w = tmp_path_factory.mktemp("template") / "w"
    _tiny_models(w)
    mc, gen = zoo.demo_tasks                                # a multiple-choice and a generative task
    for task in (mc, gen):
        (w / "data" / task).mkdir(parents=True)
        for split in ("validation", "test"):
            lines = (zoo.data[task] / f"{split}.jsonl").read_text().splitlines()[:ROWS]
            (w / "data" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    tasks = {t: {**zoo.tasks[t].to_dict(), "data": f"data/{t}", "limit": ROWS} for t in (mc, gen)}
    config = dict(base="base", sources=[dict(path="lora-a", task=mc), dict(path="lora-b", task=gen)], tasks=tasks,
                  method="hi-merging", options=dict(normalize="none", batch_size=8), output="merged")
    (w / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (w / "notes.txt").write_text("a file of the user's\n")
    (w / "mine").mkdir(); (w / "mine" / "thesis.tex").write_text("years of work\n")
    (w / "old-merge").mkdir()                                # an earlier merge's output (what --force may replace)
    (w / "old-merge" / "himerge_report.json").write_text(json.dumps({"method": "ties"}))
    (w / "old-merge" / "model.safetensors").write_bytes(b"an earlier merge")
    return w, config


@dataclass
class World:
    root: Path            # the user's folder: config, base, sources, data, notes.txt, mine/, old-merge/
    config: dict          # the valid config, as merge.yaml holds it
    cache: Path           # $HIMERGE_CACHE, outside the world

    @property
    def cfg(self) -> Path: return self.root / "merge.yaml"

    def write(self, config: dict | None = None, path: Path | None = None) -> Path:
        path = path or self.cfg
        path.write_text(yaml.safe_dump(config if config is not None else self.config, sort_keys=False))
        return path

    def edit(self, change: Callable) -> Path:
        "Write merge.yaml with `change(config)` applied to a copy of the valid config."
        config = copy.deepcopy(self.config)
        change(config)
        return self.write(config)


@pytest.fixture
def world(template, tmp_path, monkeypatch):
    w, config = template
    root = Path(shutil.copytree(w, tmp_path / "w", symlinks=True)).resolve()
    cache = (tmp_path / "cache").resolve()
    monkeypatch.setenv("HIMERGE_CACHE", str(cache))
    monkeypatch.chdir(root)                                  # a user runs himerge from the folder of their config
    return World(root, copy.deepcopy(config), cache)


def fingerprint(root: Path) -> dict:
    "relative path -> sha256 of every file, 'dir' for every folder, the target of every symlink (hidden ones too)."
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink(): out[rel] = "->" + os.readlink(p)
        elif p.is_dir(): out[rel] = "dir"
        elif p.is_file(): out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def staging_left(*folders: Path) -> list:
    "Staging, backup or write-test folders a merge left behind in or beside `folders`."
    seen = set()
    for folder in folders:
        for parent in (folder, folder.parent):
            if parent.is_dir(): seen.update(p for p in parent.rglob(".*") if STAGING.match(p.name))
    return sorted(map(str, seen))


def cache_records(cache: Path) -> int:
    return sum(1 for _ in cache.glob("*/*.json")) if cache.is_dir() else 0


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list: return [line for line in self.err.splitlines() if line.strip()]


def run_cli(capsys, *argv) -> Result:
    "`himerge ARGV` in-process, as the console script runs it (argparse's usage errors exit through SystemExit)."
    capsys.readouterr()
    try: code = main([str(a) for a in argv])
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return Result(code, out, err)


@pytest.fixture
def no_weights(monkeypatch):
    "Fail loudly if a merge gets as far as opening its run (loading the model, reading whole tensors)."
    calls = []
    def refuse(p, *args, **kwargs):
        calls.append(p.output)
        raise AssertionError(f"a merge to {p.output} opened its run: a bad input was not caught before weights load")
    monkeypatch.setattr(merge_module, "open_run", refuse)
    return calls


# --- the refusals -------------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    category: int                   # issue 17's: 1 never destroy an input, 4 checked before weights load, 7 config file
    argv: str                       # after `himerge`, split as a shell would; "{w}" is the world, "{cfg}" merge.yaml
    expect: tuple                   # fragments of the one-line message; "{w}" is the world, "{zoo}" the shipped zoo
    setup: Callable | None = None   # (World, monkeypatch) -> None: break the world before the run
    modes: tuple = ("run",)         # "run": the real command; "dry-run": the same with --dry-run
    xfail: str | None = None        # the reason, when the fix belongs to a notebook this file's author does not own
    usage: bool = False             # argparse refuses the command line itself: its usage, then one error line


def edit(change):
    return lambda w, m: w.edit(change)

def drop(path):
    def setup(w, m):
        target = w.root / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return setup

def put_line(path, lineno, row):
    "Replace line `lineno` (1-based) of a jsonl file with `row`."
    def setup(w, m):
        file = w.root / path
        lines = file.read_text().splitlines()
        lines[lineno - 1] = json.dumps(row)
        file.write_text("\n".join(lines) + "\n")
    return setup

def write_text(path, text: str | bytes):
    def setup(w, m):
        (w.root / path).write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup

def options(**values):
    return edit(lambda c: c["options"].update(values))

def both(*setups):
    def setup(w, m):
        for s in setups: s(w, m)
    return setup

def symlink(name, target):
    return lambda w, m: (w.root / name).symlink_to(w.root / target, target_is_directory=(w.root / target).is_dir())

def unwritable(name):
    "A folder its owner cannot write in; skipped where the user is root, whom chmod does not stop."
    def setup(w, m):
        folder = w.root / name
        folder.mkdir(); folder.chmod(0o500)
        try: (folder / ".probe").write_text("x")
        except PermissionError: return
        (folder / ".probe").unlink(); folder.chmod(0o700)
        pytest.skip("running as root: chmod 0o500 does not stop root from writing (the /proc cases cover an "
                    "unwritable folder for root)")
    return setup

def tokenizer_copy(name):
    def setup(w, m):
        (w.root / name).mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"): shutil.copy(w.root / "base" / f, w.root / name / f)
    return setup

def no_tasks(c):
    "A merge without tasks (no evaluations): task arithmetic of the two adapters."
    c.update(method="task_arithmetic", options={}, tasks={})
    for s in c["sources"]: s.pop("task")

def config_in_old_output(w, m):
    "The user keeps a config (absolute paths, no tasks) inside an earlier merge's output folder."
    c = copy.deepcopy(w.config); no_tasks(c)
    c.update(base=str(w.root / "base"), output=str(w.root / "old-merge"))
    for s in c["sources"]: s["path"] = str(w.root / s["path"])
    w.write(c, w.root / "old-merge" / "merge.yaml")


MC, GEN = load_zoo().demo_tasks
BOTH = ("run", "dry-run")
M = "merge {cfg}"   # the command most cases start with: `himerge merge merge.yaml`, from the config's folder

# 1. Never destroy an input or a user's file: refused before any work, --force or not.
NEVER_DESTROY = [
    Case("out-is-the-base", 1, f"{M} --out base --force", ("--out {w}/base is the base",), modes=BOTH),
    Case("out-is-the-base-without-force", 1, f"{M} --out base", ("is the base ({w}/base)",)),
    Case("out-is-a-source", 1, f"{M} --out lora-b --force", ("is source 'lora-b'", "{w}/lora-b"), modes=BOTH),
    Case("out-inside-the-base", 1, f"{M} --out base/merged --force", ("lies inside the base",)),
    Case("out-inside-a-source-two-deep", 1, f"{M} --out lora-a/x/merged",
         ("--out {w}/lora-a/x/merged lies inside source 'lora-a'",)),
    Case("out-is-a-weights-file-of-the-base", 1, f"{M} --out base/model.safetensors --force",
         ("lies inside the base",)),
    Case("out-holds-every-input", 1, f"{M} --out . --force", ("--out {w} holds",), modes=BOTH),
    Case("out-is-a-parent-of-the-inputs", 1, f"{M} --out .. --force", ("holds", "{w}")),
    Case("out-is-the-config-file", 1, f"{M} --out merge.yaml --force", ("is the config file ({w}/merge.yaml)",)),
    Case("out-is-a-tasks-data", 1, f"{M} --out data/{GEN} --force",
         (f"is the data of task '{GEN}'", f"{{w}}/data/{GEN}"), modes=BOTH),
    Case("out-holds-the-tasks-data", 1, f"{M} --out data --force", ("holds the data of task",)),
    Case("out-is-the-evaluation-cache", 1, f"{M} --out {{cache}} --force", ("is the evaluation cache",)),
    Case("out-is-the-tokenizer-folder", 1, f"{M} --out tok --force", ("is the tokenizer", "{w}/tok"),
         setup=both(tokenizer_copy("tok"), options(tokenizer="tok"))),
    Case("output-field-is-the-base", 1, f"{M} --force", ("{w}/base is the base",),
         setup=edit(lambda c: c.update(output="base")), modes=BOTH),
    Case("output-field-is-named-as-the-field", 1, f"{M} --force", ("merge.yaml: output {w}/base is the base",),
         setup=edit(lambda c: c.update(output="base"))),
    Case("out-is-a-symlink-to-the-base", 1, f"{M} --out link --force", ("is the base ({w}/base)",),
         setup=symlink("link", "base"), modes=BOTH),
    Case("out-through-a-symlinked-folder-into-a-source", 1, f"{M} --out link/merged --force",
         ("lies inside source 'lora-a'",), setup=symlink("link", "lora-a")),
    Case("out-is-an-existing-file", 1, f"{M} --out notes.txt --force", ("--out {w}/notes.txt: an existing file",),
         modes=BOTH),
    Case("out-is-an-existing-file-without-force", 1, f"{M} --out notes.txt", ("{w}/notes.txt",)),
    Case("out-is-a-symlink-to-a-file", 1, f"{M} --out link --force", ("{w}/notes.txt: an existing file",),
         setup=symlink("link", "notes.txt")),
    Case("out-under-a-file", 1, f"{M} --out notes.txt/merged", ("{w}/notes.txt is a file",), modes=BOTH),
    Case("out-is-a-users-folder-with-force", 1, f"{M} --out mine --force", ("--out {w}/mine", "not a himerge output"),
         modes=BOTH),
    Case("out-is-a-users-folder-without-force", 1, f"{M} --out mine", ("{w}/mine", "not a himerge output")),
    Case("out-is-an-old-output-without-force", 1, f"{M} --out old-merge",
         ("--out {w}/old-merge: output exists", "--force")),
    Case("out-holds-the-config-in-an-old-output", 1, "merge old-merge/merge.yaml --out old-merge --force",
         ("holds the config file ({w}/old-merge/merge.yaml)",), setup=config_in_old_output),
    Case("method-flag-keeps-the-config-file-protected", 1,
         "merge old-merge/merge.yaml --method ties --out old-merge --force",
         ("holds the config file ({w}/old-merge/merge.yaml)",), setup=config_in_old_output),
    Case("out-in-a-folder-that-cannot-be-written", 1, f"{M} --out ro/merged", ("cannot write in {w}/ro",),
         setup=unwritable("ro"), modes=BOTH),
    Case("out-in-proc", 1, f"{M} --out /proc/himerge-merged", ("--out /proc/himerge-merged", "cannot write in /proc"),
         modes=BOTH),
    Case("out-is-empty-text", 1, f"{M} --out ''", ("--out",), modes=BOTH),
    Case("demo-out-is-the-zoo-base", 1, "demo --out {zoo}/base --force", ("is the base ({zoo}/base)",)),
    Case("demo-out-inside-a-zoo-adapter", 1, f"demo --out {{zoo}}/lora-{MC}/merged", (f"lies inside source '{MC}'",)),
    Case("demo-out-is-an-existing-file", 1, "demo --out notes.txt --force", ("{w}/notes.txt: an existing file",)),
    Case("demo-out-is-a-users-folder-with-force", 1, "demo --out mine --force", ("not a himerge output",)),
]

# 4. Everything that can be checked before weights load is, in the dry run and at the start of a real run.
BEFORE_WEIGHTS = [
    Case("batch-size-zero", 4, M, ("merge.yaml: options.batch_size: 0 is not ≥ 1",), options(batch_size=0), BOTH),
    Case("batch-size-a-string", 4, M, ("options.batch_size: expected an integer", "'8'"), options(batch_size="8"),
         BOTH),
    Case("seed-x", 4, M, ("options.seed: expected an integer", "'x'"), options(seed="x"), BOTH),
    Case("seed-negative", 4, M, ("options.seed: -1",), options(seed=-1), BOTH),
    Case("test-scores-yes-as-text", 4, M, ("options.test_scores: expected true or false",),
         options(test_scores="yes"), BOTH),
    Case("max-shard-size-unreadable", 4, M, ("options.max_shard_size", "'5 gigs'"), options(max_shard_size="5 gigs"),
         BOTH),
    Case("max-shard-size-zero", 4, M, ("options.max_shard_size", "'0GB'"), options(max_shard_size="0GB"), BOTH),
    Case("option-of-another-method", 4, M, ("options.lamb: not an option of hi-merging",), options(lamb=0.5), BOTH),
    Case("misspelt-option", 4, M, ("options.batchsize: unknown option", "batch_size"), options(batchsize=8), BOTH),
    Case("method-option-out-of-range", 4, M, ("options.density_factor: 0",), options(density_factor=0), BOTH),
    Case("method-option-unknown-choice", 4, M, ("options.remeasure: 'always'",), options(remeasure="always"), BOTH),
    Case("unknown-method", 4, M, ("method: 'hi_merging' is not one of", "hi-merging"),
         edit(lambda c: c.update(method="hi_merging")), BOTH),
    Case("unknown-method-on-the-command-line", 4, f"{M} --method slurp", ("--method", "'slurp'"), usage=True),
    Case("one-source-for-hi-merging", 4, M, ("sources: hi-merging needs at least 2 sources, got 1",),
         edit(lambda c: c.update(sources=c["sources"][:1])), BOTH),
    Case("three-sources-for-slerp", 4, M, ("sources: slerp takes at most 2 sources, got 3",),
         edit(lambda c: c.update(method="slerp", options={}, sources=c["sources"] + [dict(path="lora-a", task=MC)])),
         BOTH),
    Case("a-source-without-its-task", 4, M, ("sources[1].task: hi-merging needs each source's task",),
         edit(lambda c: c["sources"][1].pop("task")), BOTH),
    Case("a-source-with-an-unknown-task", 4, M, ("sources[0].task: 'lats' is not a key of tasks",),
         edit(lambda c: c["sources"][0].update(task="lats")), BOTH),
    Case("density-as-text", 4, M, ("sources[0].density", "'half'"),
         edit(lambda c: c["sources"][0].update(density="half")), BOTH),
    Case("a-source-that-does-not-exist", 4, M, ("{w}/lora-c",), edit(lambda c: c["sources"][1].update(path="./lora-c")),
         BOTH),
    Case("dtype-unknown", 4, M, ("dtype: 'fp16' is not one of",), edit(lambda c: c.update(dtype="fp16")), BOTH),
    Case("cache-dir-is-a-file", 4, M, ("options.cache_dir: {w}/notes.txt is a file",),
         options(cache_dir="{w}/notes.txt"), BOTH),
    Case("cache-dir-relative-is-next-to-the-config", 4, "merge {w}/merge.yaml",
         ("options.cache_dir", "{w}/notes.txt is a file"),
         both(options(cache_dir="notes.txt"), lambda w, m: m.chdir(w.root / "mine")), BOTH),
    Case("cache-dir-cannot-be-written", 4, M, ("options.cache_dir: cannot write to /proc/himerge-cache",),
         options(cache_dir="/proc/himerge-cache"), BOTH),
    Case("cache-dir-from-the-environment-is-a-file", 4, M, ("{w}/notes.txt is a file",),
         lambda w, m: m.setenv("HIMERGE_CACHE", str(w.root / "notes.txt")), BOTH),
    Case("device-cuda-7", 4, f"{M} --device cuda:7", ("--device cuda:7",), modes=BOTH),
    Case("device-tpu", 4, f"{M} --device tpu", ("--device 'tpu'",), modes=BOTH),
    Case("device-meta", 4, f"{M} --device meta", ("--device meta", "not meta"), modes=BOTH),
    Case("device-tpu-for-a-merge-without-tasks", 4, f"{M} --device tpu", ("--device 'tpu'",), edit(no_tasks), BOTH),
    Case("base-without-a-tokenizer", 4, M, ("the base", "has no tokenizer", "options.tokenizer"),
         both(drop("base/tokenizer.json"), drop("base/tokenizer_config.json")), BOTH),
    Case("tokenizer-path-does-not-exist", 4, M, ("options.tokenizer", "no-such-tokenizer"),
         options(tokenizer="./no-such-tokenizer"), BOTH),
    Case("tokenizer-folder-holds-no-tokenizer", 4, M, ("options.tokenizer", "{w}/mine", "no tokenizer loads"),
         options(tokenizer="{w}/mine"), BOTH),
    Case("test-scores-on-without-a-test-split", 4, M, (f"'{GEN}'", "test"), drop(f"data/{GEN}/test.jsonl"), BOTH),
    Case("a-row-bad-only-in-the-test-split", 4, M, (f"{{w}}/data/{MC}/test.jsonl", "line 2"),
         put_line(f"data/{MC}/test.jsonl", 2, {"question": "last a b", "choices": [" a", " b"], "answer": 7}), BOTH),
    Case("a-row-without-its-gold-in-validation", 4, M, (f"{{w}}/data/{GEN}/validation.jsonl", "line 3", "answer"),
         put_line(f"data/{GEN}/validation.jsonl", 3, {"question": "next a b"}), BOTH),
    Case("a-row-missing-a-prompt-field", 4, M, (f"{{w}}/data/{MC}/validation.jsonl", "line 1", "question"),
         put_line(f"data/{MC}/validation.jsonl", 1, {"choices": [" a", " b"], "answer": 0}), BOTH),
    Case("task-data-folder-missing", 4, M, (f"data/{MC}",), drop(f"data/{MC}"), BOTH),
]

# 7. The config file itself: whatever is on disk, one line naming the file (and the line), never a traceback.
CONFIG_FILE = [
    Case("yaml-syntax-error", 7, M, ("merge.yaml, line 3: not valid YAML",),
         write_text("merge.yaml", "base: base\nsources: [lora-a, lora-b\nmethod: ties\n"), BOTH),
    Case("yaml-tab-indent", 7, M, ("merge.yaml, line 3",),
         write_text("merge.yaml", "base: base\nsources:\n\t- lora-a\n")),
    Case("duplicate-top-level-key", 7, M, ("merge.yaml, line 3", "'method' is given twice (first on line 2)"),
         write_text("merge.yaml", "sources: [lora-a, lora-b]\nmethod: ties\nmethod: linear\n"), BOTH),
    Case("duplicate-key-in-a-task", 7, M, ("'metric' is given twice",),
         lambda w, m: w.cfg.write_text(w.cfg.read_text().replace("  metric:", "  metric: rougeL\n    metric:", 1))),
    Case("config-is-a-list", 7, M, ("merge.yaml: config: expected a mapping", "got list"),
         write_text("merge.yaml", "- base\n- lora-a\n"), BOTH),
    Case("config-is-empty", 7, M, ("merge.yaml: empty",), write_text("merge.yaml", ""), BOTH),
    Case("config-only-comments", 7, M, ("merge.yaml: empty",), write_text("merge.yaml", "# todo\n")),
    Case("config-is-a-word", 7, M, ("merge.yaml: config: expected a mapping", "got str"),
         write_text("merge.yaml", "merge everything\n")),
    Case("config-is-binary", 7, M, ("merge.yaml: not a text file",), write_text("merge.yaml", bytes(range(256)) * 4),
         BOTH),
    Case("config-is-a-safetensors-file", 7, "merge base/model.safetensors",
         ("base/model.safetensors: not a text file",)),
    Case("config-holds-nul-bytes", 7, M, ("merge.yaml, line 2: not valid YAML", "not allowed"),
         write_text("merge.yaml", "base: base\nsources: [lora-a,\x00 lora-b]\n")),
    Case("config-with-a-list-as-a-key", 7, M, ("merge.yaml, line 2: not valid YAML", "a key cannot be a list"),
         write_text("merge.yaml", "base: base\n[lora-a, lora-b]: sources\n")),
    Case("config-with-a-number-as-a-key", 7, M, ("merge.yaml: ", "unknown field"),
         write_text("merge.yaml", "sources: [lora-a, lora-b]\n1: x\nbsae: base\n")),
    Case("source-with-a-number-as-a-key", 7, M, ("sources[0].", "unknown field"),
         write_text("merge.yaml", "sources:\n  - {path: lora-a, 1: x, tsak: y}\n  - lora-b\nmethod: ties\n")),
    Case("config-is-a-folder", 7, "merge data", ("data: a folder, not a config file",)),
    Case("config-does-not-exist", 7, "merge mrege.yaml", ("mrege.yaml: no such config file",)),
    Case("config-argument-missing", 7, "merge", ("the following arguments are required: config",), usage=True),
    Case("unknown-top-level-field", 7, M, ("merge.yaml: outptu: unknown field",), edit(lambda c: c.update(outptu="x"))),
]

CASES = NEVER_DESTROY + BEFORE_WEIGHTS + CONFIG_FILE


def _params():
    for case in CASES:
        for mode in case.modes:
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.xfail)] if case.xfail else []
            yield pytest.param(case, mode, id=f"{case.category}-{case.id}-{mode}", marks=marks)


def fill(text: str, w: World) -> str:
    return (text.replace("{w}", str(w.root)).replace("{cfg}", str(w.cfg.relative_to(w.root)))
            .replace("{cache}", str(w.cache)).replace("{zoo}", str(load_zoo().root.resolve())))


@pytest.mark.parametrize("case,mode", list(_params()))
def test_bad_input_is_refused_by_name_and_nothing_changes(case, mode, world, monkeypatch, capsys, no_weights):
    zoo = load_zoo().root.resolve() if case.argv.startswith("demo") else None   # the demo's inputs are the zoo's
    if case.setup: case.setup(world, monkeypatch)
    if world.cfg.is_file() and b"{w}" in world.cfg.read_bytes():   # a config that names a path of the world
        world.cfg.write_text(fill(world.cfg.read_text(), world))
    before, zoo_before = fingerprint(world.root), zoo and fingerprint(zoo)
    argv = [fill(a, world) for a in shlex.split(case.argv)] + (["--dry-run"] if mode == "dry-run" else [])
    res = run_cli(capsys, *argv)
    message = res.lines[-1] if res.lines else ""
    assert res.code == 2, f"exit {res.code}, stderr: {res.err!r}, stdout: {res.out[-400:]!r}"
    if case.usage: assert res.lines[0].startswith("usage: himerge") and "error: " in message, res.err
    else: assert len(res.lines) == 1 and message.startswith("himerge: error: "), res.err
    for fragment in map(lambda f: fill(f, world), case.expect):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in res.err and not no_weights
    assert fingerprint(world.root) == before, "a file of the world was created, changed or deleted"
    assert zoo is None or fingerprint(zoo) == zoo_before, "the shipped zoo was changed"
    assert staging_left(world.root) == []
    assert cache_records(world.cache) == 0


def test_the_valid_world_passes_the_dry_run(world, capsys, monkeypatch):
    "Every refusal above is for its own reason: the unbroken world passes the dry run from any folder."
    monkeypatch.chdir(world.root / "mine")
    res = run_cli(capsys, "merge", world.cfg, "--dry-run")
    assert res.code == 0, res.err
    assert f"-> {world.root}/merged" in res.out and f"rows: validation {ROWS}, test {ROWS}" in res.out


def _home(w, m):
    m.setenv("HOME", str(w.root.parent / "home"))
    w.edit(lambda c: c.update(output="~/merged"))

VALID = {   # what a careless user writes that is still right -> (its setup, where the output goes)
    "relative-cache-dir": (options(cache_dir="my-cache"), "{w}/merged"),
    "relative-tokenizer": (both(tokenizer_copy("tok"), options(tokenizer="tok")), "{w}/merged"),
    "no-test-split-with-test-scores-off": (both(options(test_scores=False), drop(f"data/{GEN}/test.jsonl")),
                                           "{w}/merged"),
    "windows-line-ends": (lambda w, m: w.cfg.write_bytes(w.cfg.read_bytes().replace(b"\n", b"\r\n")), "{w}/merged"),
    "utf8-byte-order-mark": (lambda w, m: w.cfg.write_bytes(b"\xef\xbb\xbf" + w.cfg.read_bytes()), "{w}/merged"),
    "an-empty-existing-output-folder": (lambda w, m: (w.root / "merged").mkdir(), "{w}/merged"),
    "output-in-the-home-folder": (_home, "{w}/../home/merged"),
}


@pytest.mark.parametrize("name", list(VALID))
def test_careless_but_valid_configs_are_accepted(name, world, capsys, monkeypatch):
    "Run from another folder than the config's: paths in the config are the config's folder's."
    setup, out = VALID[name]
    setup(world, monkeypatch)
    monkeypatch.chdir(world.root / "mine")
    res = run_cli(capsys, "merge", world.cfg, "--dry-run")
    assert res.code == 0, res.err
    assert res.out.splitlines()[0].endswith(f"-> {Path(fill(out, world)).resolve()}"), res.out.splitlines()[0]
    if name == "relative-cache-dir":
        assert (world.root / "my-cache").is_dir() and not (world.root / "mine" / "my-cache").exists()


def test_every_category_has_cases():
    counts = {k: sum(1 for c in CASES if c.category == k) for k in (1, 4, 7)}
    assert min(counts.values()) >= 10, counts
    assert len({c.id for c in CASES}) == len(CASES)


# --- 6. the dry run on an existing output, planned = run for every method, Ctrl-C -----------------------------------

def test_dry_run_says_the_output_exists(world, capsys, no_weights):
    before = fingerprint(world.root)
    res = run_cli(capsys, "merge", world.cfg, "--dry-run", "--out", "old-merge")
    assert res.code == 0, res.err
    first = res.out.splitlines()[0]
    assert f"-> {world.root}/old-merge" in first and "exists" in first and "--force" in first, first
    res = run_cli(capsys, "merge", world.cfg, "--dry-run")
    assert "exists" not in res.out.splitlines()[0]
    assert fingerprint(world.root) == before


def _total(plan_text: str) -> int:
    return int(re.search(r"\(total (?:at most )?(\d+)\)", plan_text).group(1))

def _done(summary: str) -> tuple:
    m = re.search(r"evaluations: (\d+) run, (\d+) reused from cache", summary)
    return int(m.group(1)), int(m.group(2))


def _pruned(c):
    for s in c["sources"]: s["density"] = 0.5

def _one_task(c):
    c["sources"][1]["task"] = c["sources"][0]["task"]

PLANS = {   # name -> (method, change of the config): every method as configured by default, then the cases the count
            # treats apart (scores the analysis already measured, the plain sum, one source, one task for two sources)
    **{name: (name, None) for name in METHODS},
    "hi-merging-without-decision-scores": ("hi-merging", lambda c: c["options"].update(score_decisions=False)),
    "hi-merging-of-pruned-sources": ("hi-merging", _pruned),
    "hi-merging-two-sources-one-task": ("hi-merging", _one_task),
    "task-arithmetic-scaled": ("task_arithmetic", lambda c: c["options"].update(lamb=0.5)),
    "linear-of-one-source": ("linear", lambda c: c.update(sources=c["sources"][:1])),
}


def _stage(plan_text: str, stage: str) -> int:
    m = re.search(rf"{re.escape(stage)}: (\d+)", plan_text)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("name", list(PLANS))
def test_planned_evaluations_are_the_evaluations_run(name, world, capsys):
    "On a fresh cache, the evaluations the dry run announces are those the merge runs (Hi-Merging: minus unused steps)."
    method, change = PLANS[name]
    def configure(c):
        c["method"] = method
        c["options"] = dict(batch_size=8, **({"normalize": "none"} if method == "hi-merging" else {}))
        if change: change(c)
    world.edit(configure)
    inputs = {k: v for k, v in fingerprint(world.root).items() if not k.startswith("merged")}
    dry = run_cli(capsys, "merge", world.cfg, "--dry-run")
    assert dry.code == 0, dry.err
    planned = _total(dry.out)
    res = run_cli(capsys, "merge", world.cfg, "--quiet")
    assert res.code == 0, res.err
    done, _ = _done(res.out)
    report = json.loads((world.root / "merged" / "himerge_report.json").read_text())
    assert report["evaluations"]["planned"] == planned and report["evaluations"]["done"] == done
    # resolution is planned at its most (every layer resolved, each with its most candidates; the plan says so):
    # what it spent replaces that bound
    bound = sum(_stage(dry.out, stage) for stage in ("resolution scores (at most)", "resolution candidates (at most)",
                                                    "the whole merge's scale", "refinement (at most)"))
    spent = (report.get("resolution") or {}).get("evaluations", 0)
    if "comparison, validation (at most)" in dry.out:    # auto: points that share a merge are scored once
        assert done <= planned, (done, planned)
    else:
        assert spent <= bound and done == planned - bound + spent, (done, planned, bound, spent)
    assert done == cache_records(world.cache), "every evaluation run is stored once"
    assert {k: v for k, v in fingerprint(world.root).items() if not k.startswith("merged")} == inputs
    assert staging_left(world.root) == []


def test_a_budget_of_one_decision_makes_one_decision(world, capsys):
    n_tasks = len(world.config["tasks"])
    # the paper's rule: a decision costs one score of the merge per task
    world.edit(lambda c: c["options"].update(budget=n_tasks, resolution="paper"))
    res = run_cli(capsys, "merge", world.cfg, "--quiet")
    assert res.code == 0, res.err
    report = json.loads((world.root / "merged" / "himerge_report.json").read_text())
    assert len(report["decisions"]) == 1, report["resolution"]
    assert report["resolution"]["evaluations"] <= n_tasks, report["resolution"]


def test_verified_resolution_stays_within_its_budget(world, capsys):
    n_tasks, n_sources = len(world.config["tasks"]), len(world.config["sources"])
    budget = max(n_sources + 1, 3) * n_tasks        # the most one layer's candidates can cost
    world.edit(lambda c: c["options"].update(budget=budget))
    res = run_cli(capsys, "merge", world.cfg, "--quiet")
    assert res.code == 0, res.err
    report = json.loads((world.root / "merged" / "himerge_report.json").read_text())
    assert report["resolution"]["mode"] == "verified"
    assert len(report["decisions"]) >= 1 and report["resolution"]["evaluations"] <= budget, report["resolution"]
    world.edit(lambda c: c["options"].update(budget=0))
    res = run_cli(capsys, "merge", world.cfg, "--quiet", "--force")
    assert res.code == 0, res.err
    report = json.loads((world.root / "merged" / "himerge_report.json").read_text())
    assert report["decisions"] == [] and report["resolution"]["stopped"].startswith("evaluation budget spent")


def _interrupt_after(monkeypatch, n: int):
    "Make the evaluator raise KeyboardInterrupt (as Ctrl-C would) on its (n + 1)-th score."
    from himerge.evaluate import Evaluator
    real, calls = Evaluator.score, []
    def score(self, task):
        calls.append(task)
        if len(calls) > n: raise KeyboardInterrupt
        return real(self, task)
    monkeypatch.setattr(Evaluator, "score", score)
    return calls


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def test_ctrl_c_says_what_is_saved_and_the_same_command_resumes(world, capsys, monkeypatch):
    before = fingerprint(world.root)
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)
        res = run_cli(capsys, "merge", world.cfg, "--quiet")
    assert res.code == 130, res.err
    assert len(res.lines) == 1, res.err
    assert re.fullmatch(rf"himerge: interrupted\. 5 evaluations of this run are saved in {re.escape(str(world.cache))};"
                        r" run the same command again to resume from them\.", res.lines[0]), res.lines[0]
    assert cache_records(world.cache) == 5
    assert fingerprint(world.root) == before and staging_left(world.root) == []
    resumed = run_cli(capsys, "merge", world.cfg, "--quiet")
    assert resumed.code == 0, resumed.err
    done, reused = _done(resumed.out)
    # the same merge on a fresh cache, for comparison
    world.edit(lambda c: c["options"].update(cache_dir=str(world.cache.parent / "fresh")))
    fresh = run_cli(capsys, "merge", world.cfg, "--quiet", "--out", world.root / "fresh")
    assert fresh.code == 0, fresh.err
    assert done == _done(fresh.out)[0] - 5, (done, fresh.out)
    a, b = _tensors(world.root / "merged"), _tensors(world.root / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scores = lambda d: json.loads((d / "himerge_report.json").read_text())["scores"]
    assert scores(world.root / "merged") == scores(world.root / "fresh")


def _interrupt_in(target: str):
    def setup(monkeypatch):
        import importlib
        module, name = target.rsplit(".", 1)
        def interrupt(*a, **k): raise KeyboardInterrupt
        monkeypatch.setattr(importlib.import_module(module), name, interrupt)
    return setup


@pytest.mark.parametrize("where,setup,expect", [
    ("while planning", _interrupt_in("himerge.plan.resolve_tokenizer"), r"himerge: interrupted\."),
    ("while writing over an old output", _interrupt_in("himerge.report.write_model"),
                 r"himerge: interrupted\. \d+ evaluations of this run are saved in .*; run the same command again.*"),
], ids=["planning", "writing"])
def test_ctrl_c_anywhere_prints_one_line_and_keeps_the_old_output(where, setup, expect, world, capsys, monkeypatch):
    world.edit(lambda c: c.update(output="old-merge"))
    before = fingerprint(world.root)
    setup(monkeypatch)
    res = run_cli(capsys, "merge", world.cfg, "--quiet", "--force")
    assert res.code == 130, res.err
    assert len(res.lines) == 1 and re.fullmatch(expect, res.lines[0]), res.err
    assert fingerprint(world.root) == before, f"interrupted {where}: the old output or an input changed"
    assert staging_left(world.root) == []


def test_a_source_that_does_not_improve_its_task_stops_the_run_at_its_own_score(world, capsys):
    "Hi-Merging with normalisation by gain: a source equal to the base is refused after the reference scores only."
    from safetensors.torch import load_file, save_file
    weights = world.root / "lora-a" / "adapter_model.safetensors"
    save_file({k: (v * 0 if "lora_B" in k else v) for k, v in load_file(weights).items()}, str(weights))
    world.edit(lambda c: c["options"].pop("normalize"))
    before = fingerprint(world.root)
    res = run_cli(capsys, "merge", world.cfg, "--quiet")
    assert res.code == 2, res.err
    assert len(res.lines) == 1 and "source 'lora-a'" in res.lines[0] and f"task '{MC}'" in res.lines[0], res.err
    n_tasks, n_sources = len(world.config["tasks"]), len(world.config["sources"])
    assert cache_records(world.cache) <= n_tasks + n_sources, "probes ran before the gains were checked"
    assert fingerprint(world.root) == before and staging_left(world.root) == []


# --- 7. a programming error is not dressed up as an input error -------------------------------------------------------

def test_a_programming_error_keeps_its_traceback(world, capsys, monkeypatch):
    def broken(*a, **k): raise ZeroDivisionError("a bug in himerge")
    monkeypatch.setattr(plan_module, "count_evaluations", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in himerge"):
        main(["merge", str(world.cfg), "--dry-run"])


# --- the console script, as installed -----------------------------------------------------------------------------
# These runs pay for importing torch (and LightEval) in a new process, so they start together in the background as
# soon as the world exists, and run on the second core while the in-process cases run on the first.

CONSOLE = {   # name -> (argv after `himerge`, setup, regex of stderr's one line); every one exits 2
    "yaml-syntax-error": (("merge", "merge.yaml"),
                          write_text("merge.yaml", "base: base\nsources: [lora-a\nmethod: ties\n"),
                          r"himerge: error: merge\.yaml, line 3: not valid YAML .*"),
    "out-is-the-base-with-force": (("merge", "merge.yaml", "--out", "base", "--force"), None,
                                   r"himerge: error: --out {w}/base is the base \({w}/base\): .*even with --force.*"),
    "out-is-an-existing-file-with-force": (("merge", "merge.yaml", "--out", "notes.txt", "--force"), None,
                                           r"himerge: error: --out {w}/notes\.txt: an existing file.*"),
}


@dataclass
class ConsoleRun:
    world: World
    before: dict                     # the world's fingerprint before the run
    proc: subprocess.Popen
    interrupted: list                # for the Ctrl-C run: True once SIGINT was sent

    def result(self) -> tuple:
        out, err = self.proc.communicate(timeout=600)
        return self.proc.returncode, out, err


def _interrupt_at_first_record(run: ConsoleRun):
    "Send SIGINT (what Ctrl-C sends) as soon as the first evaluation is stored: the merge is then mid-analysis."
    deadline = time.monotonic() + 600
    while cache_records(run.world.cache) < 1 and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT); run.interrupted.append(True)


@pytest.fixture(scope="module")
def console_runs(template, tmp_path_factory):
    "Start every console run: the CONSOLE cases and a merge that receives Ctrl-C, each in its own copy of the world."
    import threading
    w, config = template
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    commands = {**{k: v[:2] for k, v in CONSOLE.items()}, "ctrl-c": (("merge", "merge.yaml", "--quiet"), None)}
    for name, (argv, setup) in commands.items():
        root = Path(shutil.copytree(w, tmp_path_factory.mktemp(name) / "w")).resolve()
        world = World(root, copy.deepcopy(config), root.parent / "cache")
        if setup: setup(world, None)
        # A terminal's foreground process takes Ctrl-C; a shell's background job ignores SIGINT, and its children
        # inherit that (Python then installs no KeyboardInterrupt handler): so the tests may run in either.
        proc = subprocess.Popen([HIMERGE, *argv], cwd=root, env={**env, "HIMERGE_CACHE": str(world.cache)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        runs[name] = ConsoleRun(world, fingerprint(root), proc, [])
    threading.Thread(target=_interrupt_at_first_record, args=(runs["ctrl-c"],), daemon=True).start()
    yield runs
    for run in runs.values():
        if run.proc.poll() is None: run.proc.kill()


@pytest.fixture(scope="module", autouse=True)
def _start_console_runs_early(request):
    "Start the console runs with the module's first test (only when a console test is selected)."
    if any(item.name.startswith(("test_the_console_script", "test_ctrl_c_reaches")) for item in request.session.items):
        request.getfixturevalue("console_runs")


@pytest.mark.parametrize("name", list(CONSOLE))
def test_the_console_script(name, console_runs):
    run = console_runs[name]
    code, out, err = run.result()
    pattern = CONSOLE[name][2].replace("{w}", re.escape(str(run.world.root)))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), err
    assert out == ""
    assert fingerprint(run.world.root) == run.before and staging_left(run.world.root) == []


def test_ctrl_c_reaches_the_console_script_as_one_line_and_exit_130(console_runs):
    "A real SIGINT in the middle of the evaluations: one line saying what is saved, exit 130, nothing written."
    run = console_runs["ctrl-c"]
    code, out, err = run.result()
    assert run.interrupted, f"the merge ended before it could be interrupted: {err[-500:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130, err
    assert "Traceback" not in err and len(lines) == 1, err
    cache = re.escape(str(run.world.cache))
    m = re.fullmatch(rf"himerge: interrupted\. (\d+) evaluations of this run are saved in {cache}; "
                     r"run the same command again to resume from them\.", lines[0])
    assert m, lines[0]
    # the signal may land between storing a record and counting it: the line never claims more than is on disk
    assert int(m.group(1)) <= cache_records(run.world.cache) <= int(m.group(1)) + 1
    assert fingerprint(run.world.root) == run.before and staging_left(run.world.root) == []
