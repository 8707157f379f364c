"""Publishing a merge output, tested against tests/hub_standin.py: a local HTTP server on 127.0.0.1 that
STANDS IN FOR THE HUGGING FACE HUB (the real Hub is never reachable from the tests)."""
import logging, os, subprocess, sys
from pathlib import Path
import pytest
import huggingface_hub.constants as hf_constants
from huggingface_hub import ModelCard

sys.path.insert(0, str(Path(__file__).parent))
from fake_output import make_fake_output
from hub_standin import HubStandIn
from himerge.card import write_card
from himerge.push import push_to_hub, PushError

TOKEN = "hf_standin_TOKEN_must_not_leak_42"
EXPECTED = ["README.md", "config.json", "gamma_heatmap.png", "generation_config.json", "himerge_config.yaml",
            "himerge_report.json", "model.safetensors", "tokenizer_config.json"]

@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # only the local stand-in is ever contacted
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))     # no stored login of the machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStandIn(tokens={TOKEN: ("some-user", True), "hf_readonly": ("some-user", False)}) as h:
        yield h

@pytest.fixture
def out(tmp_path):
    o = make_fake_output(tmp_path / "merged"); write_card(o); return o

def snapshot(folder): return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}

def test_push_uploads_model_card_report_heatmap(hub, out, caplog, capfd):
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_debug()
    try:
        with caplog.at_level(logging.DEBUG):
            url = push_to_hub(out, "some-user/tiny-merge", token=TOKEN, private=True, endpoint=hub.endpoint)
    finally: hf_logging.set_verbosity_warning()
    assert url == f"{hub.endpoint}/some-user/tiny-merge"
    files = hub.files("some-user/tiny-merge")
    assert sorted(files) == EXPECTED
    assert all(files[f] == (out / f).read_bytes() for f in EXPECTED)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model_relation == "merge" and "| severe | 1. kept only capitals |" in card.content
    assert hub.repos["some-user/tiny-merge"]["private"] and len(hub.commits) == 1
    assert {r[2] for r in hub.requests} == {f"Bearer {TOKEN}"}  # the token was used for every request...
    captured = capfd.readouterr()
    for text in [caplog.text, captured.out, captured.err, url]: assert TOKEN not in text  # ...and shown nowhere
    for data in list(snapshot(out).values()) + list(files.values()): assert TOKEN.encode() not in data

def test_push_is_rerunnable_and_creates_branch(hub, out):
    push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint)
    url = push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint, revision="exp/1",
                      commit_message="branch push")
    assert url.endswith("/some-user/tiny-merge/tree/exp/1")
    assert sorted(hub.files("some-user/tiny-merge", "exp/1")) == EXPECTED
    assert [(c["revision"], c["summary"]) for c in hub.commits][-1] == ("exp/1", "branch push")
    push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint, revision="exp/1")  # branch exists: fine

def test_push_builds_card_in_memory_when_missing(hub, tmp_path):
    o = make_fake_output(tmp_path / "nocard")
    before = snapshot(o)
    push_to_hub(o, "some-user/nocard", token=TOKEN, endpoint=hub.endpoint)
    assert "README.md" in hub.files("some-user/nocard") and snapshot(o) == before

def test_token_from_env(hub, out, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_to_hub(out, "some-user/from-env", endpoint=hub.endpoint)
    assert sorted(hub.files("some-user/from-env")) == EXPECTED

@pytest.mark.parametrize("case", ["no token", "401", "403 read-only", "owned by other", "network down", "not an output"])
def test_failures_are_clear_and_leave_output_intact(hub, out, case, monkeypatch, capfd):
    before, repo, token, endpoint, target = snapshot(out), "some-user/tiny-merge", TOKEN, hub.endpoint, out
    if case == "no token":
        token = None
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    elif case == "401": hub.fail = "401"
    elif case == "403 read-only": token, repo = "hf_readonly", "some-user/new"
    elif case == "owned by other":
        hub.add_repo("someone-else/their-model", owner="someone-else"); repo = "someone-else/their-model"
    elif case == "network down": hub.stop()
    elif case == "not an output": target = out.parent
    n_requests = len(hub.requests)
    with pytest.raises(PushError) as e: push_to_hub(target, repo, token=token, endpoint=endpoint)
    msg = str(e.value)
    assert repo in msg and TOKEN not in msg
    expected = {"no token": "no Hub token", "401": "(401)", "403 read-only": "read-only",
                "owned by other": "owned by someone else", "network down": "cannot be reached",
                "not an output": "himerge_report.json"}[case]
    assert expected in msg, msg
    if case in ("no token", "not an output"): assert len(hub.requests) == n_requests  # refused before any request
    assert snapshot(out) == before
    assert all(not c["repo_id"].startswith("someone-else") for c in hub.commits)
    assert TOKEN not in "".join(capfd.readouterr())
    if case != "network down":  # rerunnable: the same call succeeds once the cause is gone
        hub.fail = None
        push_to_hub(out, "some-user/tiny-merge", token=TOKEN, endpoint=hub.endpoint)
        assert sorted(hub.files("some-user/tiny-merge")) == EXPECTED

def test_cli_push_command(hub, out, tmp_path):
    "`himerge push DIR REPO_ID` as a user runs it: endpoint and token from the environment."
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    exe = str(Path(sys.executable).parent / "himerge")
    ok = subprocess.run([exe, "push", str(out), "some-user/cli-merge", "--revision", "v1", "--commit-message", "from cli"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert f"{hub.endpoint}/some-user/cli-merge/tree/v1" in ok.stdout
    assert sorted(hub.files("some-user/cli-merge", "v1")) == EXPECTED
    bad = subprocess.run([exe, "push", str(out), "someone-else/x"], capture_output=True, text=True,
                         env={**env, "HF_TOKEN": "hf_wrong"}, timeout=120)
    assert bad.returncode == 2 and "himerge: error:" in bad.stderr and "(401)" in bad.stderr
    for text in [ok.stdout, ok.stderr, bad.stdout, bad.stderr]: assert TOKEN not in text and "hf_wrong" not in text

def test_card_and_push_import_nothing_heavy():
    "`himerge --help` builds the merge parser (add_push_arguments): huggingface_hub must be imported only when used."
    code = ("import sys, himerge.push, himerge.card, himerge.cli; himerge.cli.build_parser()\n"
            "print(','.join(m for m in ('huggingface_hub', 'torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
