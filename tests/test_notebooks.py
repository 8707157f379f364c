"""The notebooks are the documentation: every cell that ends in a value to be seen has its output committed."""
import ast, json, re
from pathlib import Path

import pytest

NBS = sorted((Path(__file__).parent.parent / "nbs").glob("*.ipynb"))


def shows_something(source: str) -> bool:
    "Whether a code cell's last statement is a value to be seen (not a test, an assignment or a silenced plot)."
    lines = [line for line in source.splitlines() if not line.startswith("#|")]
    code = "\n".join(lines)
    if not code.strip() or code.rstrip().endswith(";"): return False
    try: tree = ast.parse(code)
    except SyntaxError: return False
    if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print" for n in ast.walk(tree)): return True
    last = tree.body[-1] if tree.body else None
    if not isinstance(last, ast.Expr): return False
    call = last.value if isinstance(last.value, ast.Call) else None
    name = getattr(getattr(call, "func", None), "id", None) or getattr(getattr(call, "func", None), "attr", "")
    silent = ("tight_layout", "close", "set_num_threads", "rmtree")   # calls that return nothing to show
    return not (call is not None and (name.startswith("test") or name in silent))


CELLS = [(nb.name, i, "".join(c["source"])) for nb in NBS for i, c in enumerate(json.loads(nb.read_text())["cells"])
         if c["cell_type"] == "code" and "#| eval: false" not in "".join(c["source"])]


@pytest.mark.parametrize("notebook", [nb.name for nb in NBS])
def test_display_cells_have_outputs(notebook):
    cells = json.loads((Path(__file__).parent.parent / "nbs" / notebook).read_text())["cells"]
    missing = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and not c.get("outputs")
               and "#| eval: false" not in "".join(c["source"]) and "#| export" not in "".join(c["source"])
               and shows_something("".join(c["source"]))]
    assert not missing, f"{notebook}: cells {missing} end in a value to be seen but have no output committed"


# an absolute path of the machine that ran the notebook
MACHINE_PATH = re.compile(r"(?<![\w.~/:-])/(?:tmp|work|home|root)(?:/|\b)")

def output_texts(cell: dict) -> list:
    "The text of every output of a code cell: streams, rich text (plain, HTML, Markdown) and tracebacks."
    texts = []
    for o in cell.get("outputs", []):
        texts.append("".join(o.get("text", "")))
        texts += ["".join(v) for k, v in o.get("data", {}).items() if k.startswith("text/")]
        texts += o.get("traceback", [])
    return texts


@pytest.mark.parametrize("notebook", [nb.name for nb in NBS])
def test_outputs_name_no_path_of_the_machine(notebook):
    "A committed output shows paths relative to a folder, or placeholders: never /tmp, /work, /home or /root."
    cells = json.loads((Path(__file__).parent.parent / "nbs" / notebook).read_text())["cells"]
    found = [(i, m.group(0), text[max(0, m.start() - 40):m.end() + 40]) for i, c in enumerate(cells)
             for text in output_texts(c) for m in MACHINE_PATH.finditer(text)]
    assert not found, f"{notebook}: cell {found[0][0]} shows {found[0][2]!r}" + \
        (f" ({len(found) - 1} more)" if len(found) > 1 else "")
