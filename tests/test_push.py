"""Publishing a merge output, tested against tests/hub_standin.py: a local HTTP server on 127.0.0.1 that
STANDS IN FOR THE HUGGING FACE HUB (the real Hub is never reachable from the tests)."""
import json, logging, os, subprocess, sys
from pathlib import Path
import pytest
import yaml
import huggingface_hub.constants as hf_constants
from huggingface_hub import ModelCard

sys.path.insert(0, str(Path(__file__).parent))
from fake_output import make_fake_output, tiny_local_sources
from hub_standin import HubStandIn
from himerge.card import build_card, local_paths, write_card
from himerge.errors import InputError
from himerge.push import push_to_hub, PushError, PushInputError

TOKEN = "hf_standin_TOKEN_must_not_leak_42"
HIMERGE = str(Path(sys.executable).parent / "himerge")
EXPECTED = ["README.md", "config.json", "gamma_heatmap.png", "generation_config.json", "himerge_config.yaml",
            "himerge_report.json", "model.safetensors", "tokenizer_config.json"]

@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # only the local stand-in is ever contacted
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))     # no stored login of the machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStandIn(tokens={TOKEN: ("some-user", True), "hf_readonly": ("some-user", False)}) as h:
        monkeypatch.setattr(hf_constants, "ENDPOINT", h.endpoint)   # a request made by mistake lands here, counted
        yield h

@pytest.fixture
def out(tmp_path):
    o = make_fake_output(tmp_path / "merged"); write_card(o); return o

def snapshot(folder): return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}

def cli_env(hub, tmp_path, token=TOKEN) -> dict:
    "The environment of a user who pushes with `himerge`: endpoint and token from the environment, no stored login."
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


# ---------------------------------------------------------------- pushing

def test_push_uploads_model_card_report_heatmap(hub, out, caplog, capfd):
    from huggingface_hub.utils import logging as hf_logging
    before = snapshot(out)
    hf_logging.set_verbosity_debug()
    try:
        with caplog.at_level(logging.DEBUG):
            url = push_to_hub(out, "some-user/tiny-merge", token=TOKEN, private=True, endpoint=hub.endpoint)
    finally: hf_logging.set_verbosity_warning()
    assert url == f"{hub.endpoint}/some-user/tiny-merge"
    files = hub.files("some-user/tiny-merge")
    assert sorted(files) == EXPECTED
    assert all(files[f] == (out / f).read_bytes() for f in EXPECTED if f != "README.md")
    # the Hub's card is rendered again for the repository; the local one still names the folder and is untouched
    assert files["README.md"].decode() == str(build_card(out, model_name="some-user/tiny-merge"))
    card = ModelCard(files["README.md"].decode())
    assert card.data.model_name == "some-user/tiny-merge" and "\n# some-user/tiny-merge\n" in card.content
    assert card.data.base_model_relation == "merge" and "| severe | 1. kept only capitals |" in card.content
    assert snapshot(out) == before and "\n# merged\n" in (out / "README.md").read_text()
    assert hub.validated == [files["README.md"].decode()]   # the stand-in checked its metadata as the Hub does
    assert hub.repos["some-user/tiny-merge"]["private"] and len(hub.commits) == 1
    # the token was used for every request (but huggingface_hub's own daily, anonymous fetch of its registry of AI
    # agent harnesses, which goes to the endpoint too)...
    assert {r[2] for r in hub.requests if r[1] != "/api/agent-harnesses"} == {f"Bearer {TOKEN}"}, hub.requests
    captured = capfd.readouterr()
    for text in [caplog.text, captured.out, captured.err, url]: assert TOKEN not in text  # ...and shown nowhere
    for data in list(snapshot(out).values()) + list(files.values()): assert TOKEN.encode() not in data

def test_merge_of_local_folders_pushed_with_cli_carries_the_repo_name(hub, tmp_path):
    "`himerge merge CONFIG --push-to-hub REPO_ID` on a real merge of local folders: the Hub's card names the repo."
    paths = tiny_local_sources(tmp_path)
    config = dict(base=str(paths["base"]), method="task_arithmetic", dtype="float32", output=str(tmp_path / "merged"),
                  sources=[str(paths["adapter-a"]), str(paths["adapter-b"])])
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    command = [HIMERGE, "merge", str(tmp_path / "merge.yaml"), "--quiet", "--push-to-hub", "some-user/tiny-merge"]
    run = subprocess.run(command, capture_output=True, text=True, env=cli_env(hub, tmp_path), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{hub.endpoint}/some-user/tiny-merge" in run.stdout
    text = hub.files("some-user/tiny-merge")["README.md"].decode()
    card = ModelCard(text)
    assert card.data.model_name == "some-user/tiny-merge" and "\n# some-user/tiny-merge\n" in card.content
    assert 'AutoModelForCausalLM.from_pretrained("some-user/tiny-merge")' in text
    assert str(tmp_path) not in text and local_paths(text) == []
    assert "\n# merged\n" in (tmp_path / "merged" / "README.md").read_text()   # the local card keeps the folder's name
    assert TOKEN not in run.stdout + run.stderr

def test_push_is_rerunnable_and_creates_branch(hub, out):
    push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint)
    url = push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint, revision="exp/1",
                      commit_message="branch push")
    assert url.endswith("/some-user/tiny-merge/tree/exp/1")
    assert sorted(hub.files("some-user/tiny-merge", "exp/1")) == EXPECTED
    assert [(c["revision"], c["summary"]) for c in hub.commits][-1] == ("exp/1", "branch push")
    push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint, revision="exp/1")  # branch exists

def test_push_builds_card_in_memory_when_missing(hub, tmp_path):
    o = make_fake_output(tmp_path / "nocard")
    before = snapshot(o)
    push_to_hub(o, "some-user/nocard", token=TOKEN, endpoint=hub.endpoint)
    assert ModelCard(hub.files("some-user/nocard")["README.md"].decode()).data.model_name == "some-user/nocard"
    assert snapshot(o) == before

def test_a_readme_the_user_wrote_is_uploaded_as_it_is(hub, out):
    mine = "---\nlicense: mit\n---\n\n# My merge\n\nNotes of mine.\n"
    (out / "README.md").write_text(mine)
    push_to_hub(out, "some-user/mine", token=TOKEN, endpoint=hub.endpoint)
    assert hub.files("some-user/mine")["README.md"].decode() == mine
    # ...and metadata the Hub would refuse is refused, in one line, before any file is sent
    (out / "README.md").write_text("---\nmodel-index:\n- name: x\n  results:\n  - task: {type: text-generation}\n"
                                   "    metrics: [{type: accuracy, value: 1}]\n---\n# x\n")
    with pytest.raises(PushError, match="Invalid metadata") as e:
        push_to_hub(out, "some-user/mine", token=TOKEN, endpoint=hub.endpoint)
    assert "\n" not in str(e.value) and "dataset.type" in str(e.value) and len(hub.commits) == 1

def test_token_from_env(hub, out, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_to_hub(out, "some-user/from-env", endpoint=hub.endpoint)
    assert sorted(hub.files("some-user/from-env")) == EXPECTED


# ---------------------------------------------------------------- bad input: refused before any request

def _missing_weights(out, root): (out / "model.safetensors").unlink(); return out
def _broken_report(out, root): (out / "himerge_report.json").write_text("{not json"); return out
def _report_lists_outside(out, root):
    report = json.loads((out / "himerge_report.json").read_text()); report["files"].append("../../etc/passwd")
    (out / "himerge_report.json").write_text(json.dumps(report)); return out
def _a_file(out, root): (root / "notes.txt").write_text("x"); return root / "notes.txt"

BAD_INPUTS = [  # case, target folder (from the fixture's output and its parent), repo id, what the message says
    ("no such folder", lambda out, root: root / "nowhere", "some-user/x", "no such folder"),
    ("a file", _a_file, "some-user/x", "a file, not a merge output folder"),
    ("not a himerge output", lambda out, root: root, "some-user/x", "not a himerge output (no himerge_report.json)"),
    ("incomplete output", _missing_weights, "some-user/x", "missing: model.safetensors"),
    ("report not JSON", _broken_report, "some-user/x", "not valid JSON"),
    ("report lists a path outside", _report_lists_outside, "some-user/x", "'../../etc/passwd', not a file inside"),
    ("empty repo id", lambda out, root: out, "", "repo id '': empty"),
    ("repo id with spaces", lambda out, root: out, "not a repo", "repo id 'not a repo': not a valid Hub repository id"),
    ("repo id of three parts", lambda out, root: out, "a/b/c", "repo id 'a/b/c': expected NAMESPACE/NAME"),
    ("repo id without namespace", lambda out, root: out, "my-merge", "repo id 'my-merge': expected NAMESPACE/NAME"),
    ("repo id with '--'", lambda out, root: out, "some-user/x--y", "repo id 'some-user/x--y': not a valid"),
]

@pytest.mark.parametrize("case,target,repo,expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_before_any_request(hub, out, case, target, repo, expected):
    target = target(out, out.parent)
    n_requests, before = len(hub.requests), snapshot(out.parent)
    with pytest.raises(PushInputError) as e: push_to_hub(target, repo, token=TOKEN, endpoint=hub.endpoint)
    msg = str(e.value)
    assert isinstance(e.value, InputError) and isinstance(e.value, PushError)
    assert expected in msg, msg
    assert (str(target) in msg) if "repo id" not in expected else (repr(repo) in msg)   # names the culprit
    assert "\n" not in msg and TOKEN not in msg
    assert len(hub.requests) == n_requests and snapshot(out.parent) == before

@pytest.mark.parametrize("case,target,repo,expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_on_the_command_line(hub, out, case, target, repo, expected, monkeypatch, capsys):
    "`himerge push DIR REPO_ID`: one line on stderr, exit code 2, no traceback, no request, no token."
    from himerge.cli import main
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    target, n_requests = target(out, out.parent), len(hub.requests)
    assert main(["push", str(target), repo]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("himerge: error: ")
    assert expected in captured.err and "Traceback" not in captured.err and TOKEN not in captured.err
    assert len(hub.requests) == n_requests

def test_bad_input_in_a_real_process(hub, out, tmp_path):
    "The same as a user sees it, in a process of its own."
    for target, repo, expected in [(tmp_path / "nowhere", "some-user/x", "no such folder"), (out, "a/b/c", "'a/b/c'")]:
        run = subprocess.run([HIMERGE, "push", str(target), repo], capture_output=True, text=True,
                             env=cli_env(hub, tmp_path), timeout=120)
        assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1, run.stderr
        assert expected in run.stderr and "Traceback" not in run.stderr and TOKEN not in run.stderr
    assert hub.requests == []

@pytest.mark.parametrize("repo,token,expected", [("not a repo", TOKEN, "repo id 'not a repo'"),
                                                 ("a/b/c", TOKEN, "repo id 'a/b/c'"),
                                                 ("some-user/x", "", "--push-to-hub some-user/x: no Hub token")])
def test_merge_push_to_hub_is_checked_before_the_merge(hub, tmp_path, repo, token, expected):
    "`himerge merge CONFIG --push-to-hub ...` refuses a bad repo id, or no token, before it reads the config."
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(dict(base=str(tmp_path / "no-base"), sources=[str(tmp_path / "no-source")],
                                          method="task_arithmetic", output=str(tmp_path / "out"))))
    env = cli_env(hub, tmp_path, token=token)
    if not token: env.pop("HF_TOKEN")
    run = subprocess.run([HIMERGE, "merge", str(config), "--push-to-hub", repo], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert expected in run.stderr and "no-source" not in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() and hub.requests == []


# ---------------------------------------------------------------- the Hub refuses

@pytest.mark.parametrize("case", ["no token", "401", "403 read-only", "owned by other", "network down"])
def test_failures_are_clear_and_leave_output_intact(hub, out, case, monkeypatch, capfd):
    before, repo, token, endpoint = snapshot(out), "some-user/tiny-merge", TOKEN, hub.endpoint
    if case == "no token":
        token = None
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    elif case == "401": hub.fail = "401"
    elif case == "403 read-only": token, repo = "hf_readonly", "some-user/new"
    elif case == "owned by other":
        hub.add_repo("someone-else/their-model", owner="someone-else"); repo = "someone-else/their-model"
    elif case == "network down": hub.stop()
    n_requests = len(hub.requests)
    with pytest.raises(PushError) as e: push_to_hub(out, repo, token=token, endpoint=endpoint)
    msg = str(e.value)
    assert repo in msg and TOKEN not in msg and "\n" not in msg and not isinstance(e.value, InputError)
    expected = {"no token": "no Hub token", "401": "(401)", "403 read-only": "read-only",
                "owned by other": "owned by someone else", "network down": "cannot be reached"}[case]
    assert expected in msg, msg
    if case != "no token": assert f"run `himerge push {out} {repo}`" in msg   # how to try again
    if case == "no token": assert len(hub.requests) == n_requests  # refused before any request
    assert snapshot(out) == before
    assert all(not c["repo_id"].startswith("someone-else") for c in hub.commits)
    assert TOKEN not in "".join(capfd.readouterr())
    if case != "network down":  # rerunnable: the same call succeeds once the cause is gone
        hub.fail = None
        push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint)
        assert sorted(hub.files("some-user/tiny-merge")) == EXPECTED

def test_cli_push_command(hub, out, tmp_path):
    "`himerge push DIR REPO_ID` as a user runs it: endpoint and token from the environment."
    env = cli_env(hub, tmp_path)
    command = [HIMERGE, "push", str(out), "some-user/cli-merge", "--revision", "v1", "--commit-message", "from cli"]
    ok = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert f"{hub.endpoint}/some-user/cli-merge/tree/v1" in ok.stdout
    assert sorted(hub.files("some-user/cli-merge", "v1")) == EXPECTED
    bad = subprocess.run([HIMERGE, "push", str(out), "someone-else/x"], capture_output=True, text=True,
                         env={**env, "HF_TOKEN": "hf_wrong"}, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("himerge: error:") and "(401)" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    for text in [ok.stdout, ok.stderr, bad.stdout, bad.stderr]: assert TOKEN not in text and "hf_wrong" not in text

def test_card_and_push_import_nothing_heavy():
    "`himerge --help` builds the merge parser (add_push_arguments): huggingface_hub must be imported only when used."
    code = ("import sys, himerge.push, himerge.card, himerge.cli; himerge.cli.build_parser()\n"
            "print(','.join(m for m in ('huggingface_hub', 'torch', 'matplotlib', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
