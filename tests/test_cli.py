"The command line as a user meets it: a console script that starts fast and reports its version."
import subprocess, sys, tomllib
from pathlib import Path
import himerge

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_package():
    out = subprocess.run([str(Path(sys.executable).parent / "himerge"), "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"himerge {himerge.__version__}"


def test_pyproject_reads_version_from_package():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "himerge.__version__"


def test_help_imports_no_heavy_library():
    # Start-up is part of speed: `himerge --help` must not pay for torch, transformers or lighteval.
    code = ("import sys, contextlib, io\n"
            "from himerge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main([])\n"
            "heavy = [m for m in ('torch', 'transformers', 'lighteval', 'peft', 'datasets') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy imports at start-up: {out.stdout.strip()}"
