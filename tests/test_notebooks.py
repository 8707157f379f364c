"""The notebooks are the documentation: every cell that ends in a value to be seen has its output committed."""
import ast, json
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
