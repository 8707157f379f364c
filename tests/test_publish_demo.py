"""Issue #8's end to end: `himerge demo --out DIR`, then `himerge push DIR some-user/some-repo` against a local
server standing in for the Hugging Face Hub (tests/hub_standin.py; the real Hub is never reachable here)."""
import os, subprocess, sys
from pathlib import Path

from hub_standin import HubStandIn
from himerge.zoo import load_zoo

HIMERGE = str(Path(sys.executable).parent / "himerge")
TOKEN = "hf_demoPushToken0123456789abcdef"


def test_demo_then_push_uploads_model_card_report_and_heatmap(tmp_path):
    env = {**os.environ, "HIMERGE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    demo = subprocess.run([HIMERGE, "demo", "--out", str(tmp_path / "demo"), "--quiet"], capture_output=True, text=True,
                          env=env)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "conflicts per layer" in demo.stdout and "test scores" in demo.stdout
    with HubStandIn(tokens={TOKEN: ("some-user", True)}) as hub:
        push_env = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN}
        push = subprocess.run([HIMERGE, "push", str(tmp_path / "demo"), "some-user/some-repo"], capture_output=True,
                              text=True, env=push_env)
        assert push.returncode == 0, push.stderr[-3000:]
        files = hub.files("some-user/some-repo")
    for name in ("model.safetensors", "config.json", "README.md", "himerge_report.json", "himerge_config.yaml",
                 "gamma_heatmap.png"):
        assert name in files, (name, sorted(files))
    assert files["model.safetensors"] == (tmp_path / "demo" / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    mc, gen = load_zoo().demo_tasks
    assert f"| layer | γ {mc} | γ {gen} | class | action |" in card and "kept only" in card
    for text in [demo.stdout, demo.stderr, push.stdout, push.stderr, *(b.decode("latin-1") for b in files.values())]:
        assert TOKEN not in text
