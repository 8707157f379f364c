"""The demo (Hi-Merging on the embedded zoo) gives exactly what it gave before issue #29's restructuring (commit
825ed71): the same plan, scores, γ per layer, conflict classes and resolution decisions, and the same bytes in every
file it writes. A change of layout must not change behaviour; this test says so.

The fixture `fixtures/demo_identity.json` was recorded from 825ed71 by running this file, and recorded again when
a default of the method changed on purpose (the whole-merge scale step of `merge_scales`, third wave, with the
modules as they were before that session's splits, so that the splits are held to it):
`python tests/test_architecture_identity.py --record`. Two things legitimately differ run to run and are left out:
the report's `created` time and `timings` (their keys are still compared; the report file is hashed as written with
those two replaced), and the time on the card's "Made with himerge ... on <created>" line (the card's bytes are
hashed with that time replaced). Two runs of 825ed71, with 1 and with 4
threads, gave the same fixture."""
import hashlib, json, os, sys, tempfile
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "demo_identity.json"


def demo_record(root: Path) -> dict:
    "The demo run into `root/demo` on a fresh evaluation cache, as a JSON-ready record."
    os.environ["HIMERGE_CACHE"] = str(root / "cache")   # fresh: every evaluation is run, and counted the same
    from himerge.merge import merge
    from himerge.zoo import conflict_table, demo, demo_config
    from himerge.zoo import path as zoo_path
    out = root / "demo"
    plan = merge(demo_config(out), dry_run=True)
    plan_text = str(plan).replace(str(zoo_path()), "<zoo>").replace(str(root), "<tmp>")
    result = demo(str(out), progress=False)
    report = dict(result.report)
    created = report.pop("created")
    report["timings"] = sorted(report["timings"])                 # which stages were timed, not how long
    files = {}
    for f in sorted(out.iterdir()):
        data = f.read_bytes()
        if f.name == "README.md": data = data.replace(created.encode(), b"<created>")
        if f.name == "himerge_report.json":   # as written (key order, indentation), less the time and the timings
            written = json.loads(data)
            written["created"], written["timings"] = "<created>", dict.fromkeys(written["timings"])
            data = json.dumps(written, indent=2).encode()
        files[f.name] = hashlib.sha256(data).hexdigest()
    table = conflict_table(result).reset_index()
    return dict(plan=plan_text.splitlines(), report=json.loads(json.dumps(report, default=str)), files=files,
                test_scores=json.loads(result.scores("test").to_json(orient="index")),
                conflict_table=json.loads(table.to_json(orient="records")))


def test_demo_is_identical_to_the_recorded_run(tmp_path):
    want, got = json.loads(FIXTURE.read_text()), demo_record(tmp_path)
    # the parts one by one first, so that a failure names what changed
    assert got["plan"] == want["plan"]
    for key in ("scores", "gamma", "classes", "decisions", "resolution", "contributions", "evaluations"):
        assert got["report"].get(key) == want["report"].get(key), key
    assert got["report"] == want["report"]
    assert got["test_scores"] == want["test_scores"]
    assert got["conflict_table"] == want["conflict_table"]
    assert got["files"] == want["files"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    FIXTURE.write_text(json.dumps(demo_record(Path(tempfile.mkdtemp())), indent=1, sort_keys=True) + "\n")
    print("recorded", FIXTURE)
