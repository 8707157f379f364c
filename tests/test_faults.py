"""Faults of the machine, not of the user, injected for real into `himerge merge` processes (issue 32).

The world: copies of the embedded zoo's base and two LoRA sources, two tasks of 4 rows, and two configs:
`tasks.yaml` (task arithmetic scored on both tasks: 8 evaluations, each saved in the cache) and `plain.yaml` (the same
merge with no task: nothing imports LightEval, so a run takes ~3 s). Undisturbed runs of each give the reference
bytes. Every check compares an output with them: each weight, config and tokenizer file byte for byte, and the card
and report once their creation time, timings and this run's evaluation counts are set aside.

Faults: a kill at any moment (SIGKILL at the N-th write point, at random times, and SIGTERM: KILLS), two runs at once
(a locked output, a shared cache), a full disk (a real tmpfs mount: DISK_FULL), a damaged cache (DAMAGE), and a
source edited between the plan and the write (CHANGED). Processes start with SIGINT at its default (a shell's
background job would pass it on ignored) and run two at a time, one per core.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from himerge.cache import EvalCache, damaged_records, read_record

HIMERGE = str(Path(sys.executable).parent / "himerge")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
LEFTOVER = re.compile(r"^\.out\.(tmp|old)-\d+$|^\.out\.lock$")
WORKERS = 2


# --- the world ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    "The world every case copies: base/, lora-last/, lora-swap/, tasks.yaml, plain.yaml, old.yaml."
    from himerge.zoo import demo_config
    root = tmp_path_factory.mktemp("template") / "w"
    root.mkdir()
    c = demo_config("out")
    shutil.copytree(c["base"], root / "base"); c["base"] = "base"
    for s in c["sources"]:
        name = Path(s["path"]).name
        shutil.copytree(s["path"], root / name); s["path"] = name
    for t in c["tasks"].values(): t["limit"] = 4
    c.update(method="task_arithmetic", options={"test_scores": False, "cache_dir": "cache"})
    (root / "tasks.yaml").write_text(yaml.safe_dump(c))
    plain = {k: v for k, v in c.items() if k != "tasks"}
    plain.update(options={}, sources=[{k: v for k, v in s.items() if k != "task"} for s in c["sources"]])
    (root / "plain.yaml").write_text(yaml.safe_dump(plain))
    old = {**plain, "sources": [{**s, "scale": 0.5} for s in plain["sources"]]}   # another merge: other bytes
    (root / "old.yaml").write_text(yaml.safe_dump(old))
    return root


def start(root: Path, *args, env: dict | None = None) -> subprocess.Popen:
    "`himerge ARGS` in `root`, SIGINT at its default whatever the test runner's."
    return subprocess.Popen([HIMERGE, *map(str, args)], cwd=root, env={**ENV, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc: subprocess.Popen) -> tuple:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, [line for line in err.splitlines() if line.strip()]


def himerge(root: Path, *args, env: dict | None = None) -> tuple:
    return finish(start(root, *args, env=env))


def new_world(template: Path, dest: Path, old_output: Path | None = None) -> Path:
    "A copy of the template at `dest` (with `old_output` copied in as out/, for the --force cases)."
    shutil.copytree(template, dest)
    if old_output is not None: shutil.copytree(old_output, dest / "out")
    return dest


def snapshot(folder: Path) -> dict | None:
    "file -> contents of an output folder, the card's and report's run-specific parts set aside; None if absent."
    if not folder.exists(): return None
    files = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file(): continue
        data = f.read_bytes()
        if f.name == "README.md": data = re.sub(rb"on \d{4}-\d\d-\d\dT[\d:+]+", b"on DATE", data)
        if f.name == "himerge_report.json":
            report = json.loads(data)
            for k in ("created", "timings", "evaluations"): report.pop(k, None)
            data = json.dumps(report, sort_keys=True).encode()
        files[str(f.relative_to(folder))] = data
    return files


def leftovers(root: Path) -> list:
    "Hidden staging, old-output and lock names left beside the output."
    return sorted(p.name for p in root.iterdir() if LEFTOVER.match(p.name))


@dataclass
class References:
    template: Path
    old: Path                    # a previous output (another merge), replaced by the --force cases
    outputs: dict                # config -> snapshot of its undisturbed output
    cache: Path                  # the undisturbed tasks run's cache
    points: dict                 # (config, force) -> the write point names of an undisturbed run
    seconds: dict                # config -> wall seconds of the undisturbed run


@pytest.fixture(scope="module")
def refs(template, tmp_path_factory) -> References:
    "Undisturbed runs of each config, logging their write points, and an old output for --force to replace."
    base = tmp_path_factory.mktemp("refs")
    def reference(config):
        root = new_world(template, base / config)
        log, t0 = root / "points.log", time.monotonic()
        code, _, err = himerge(root, "merge", f"{config}.yaml", "--quiet", env={"HIMERGE_WRITE_LOG": str(log)})
        assert code == 0, err
        seconds = time.monotonic() - t0
        points = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
        log.unlink()
        return root, seconds, points
    with ThreadPoolExecutor(WORKERS) as pool:
        (tasks_root, tasks_s, tasks_points), (plain_root, plain_s, plain_points), (old_root, _, _) = \
            pool.map(reference, ["tasks", "plain", "old"])
    # with an old output in place the same points come, then the swap
    points = {("tasks", False): tasks_points, ("tasks", True): [*tasks_points, "output swapped in"],
              ("plain", False): plain_points, ("plain", True): [*plain_points, "output swapped in"]}
    return References(template, old_root / "out", {"tasks": snapshot(tasks_root / "out"),
                      "plain": snapshot(plain_root / "out")}, tasks_root / "cache", points,
                      {"tasks": tasks_s, "plain": plain_s})


def cache_state(cache: Path) -> tuple:
    "(records, damaged records) of a cache folder."
    if not cache.exists(): return 0, []
    return len(EvalCache(cache)), damaged_records(cache)


# --- 1. a kill at any moment --------------------------------------------------------------------------------------

@dataclass
class Kill:
    config: str                  # tasks or plain
    force: bool                  # an old output is there, replaced with --force
    point: tuple | None = None   # (write point name, occurrence): SIGKILL there
    after_s: float | None = None # or SIGKILL after this share of the undisturbed run's time
    term_at_record: bool = False # or SIGTERM once the first evaluation is saved


KILLS = {
    "plain/staging-folder": Kill("plain", False, ("staging folder", 1)),
    "plain/shard-written": Kill("plain", False, ("shard", 1)),
    "plain/model-files": Kill("plain", False, ("model files", 1)),
    "plain/staged-output-complete": Kill("plain", False, ("staged output complete", 1)),
    "force/staging-folder": Kill("plain", True, ("staging folder", 1)),
    "force/staged-output-complete": Kill("plain", True, ("staged output complete", 1)),
    "force/output-swapped-in": Kill("plain", True, ("output swapped in", 1)),
    "force/random-time": Kill("plain", True, after_s=0.9),
    "plain/random-time": Kill("plain", False, after_s=0.9),
    "tasks/3rd-cache-record": Kill("tasks", False, ("cache record", 3)),
    "tasks/sigterm": Kill("tasks", False, term_at_record=True),
}


@dataclass
class KillOutcome:
    code: int
    lines: list
    after: dict | None           # the output's snapshot right after the kill
    cache: tuple                 # (records, damaged) right after the kill
    rerun_code: int = 0
    rerun_lines: list = field(default_factory=list)
    rerun: dict | None = None
    left: list = field(default_factory=list)
    killed_at: str = ""


def _kill_case(name: str, kill: Kill, refs: References, base: Path) -> KillOutcome:
    root = new_world(refs.template, base / name.replace("/", "-"), refs.old if kill.force else None)
    args = ["merge", f"{kill.config}.yaml", "--quiet", *(["--force"] if kill.force else [])]
    env, how = {}, ""
    if kill.point is not None:
        names = refs.points[(kill.config, kill.force)]
        seen = [i for i, n in enumerate(names, 1) if n == kill.point[0]]
        env["HIMERGE_KILL_AT_WRITE"] = str(seen[kill.point[1] - 1])
        how = f"write point {env['HIMERGE_KILL_AT_WRITE']} of {len(names)}"
    proc = start(root, *args, env=env)
    if kill.after_s is not None:
        delay = random.Random(name).uniform(0.3, kill.after_s) * refs.seconds[kill.config]
        time.sleep(delay); proc.send_signal(signal.SIGKILL); how = f"{delay:.1f} s"
    if kill.term_at_record:
        while len(EvalCache(root / "cache")) < 1 and proc.poll() is None: time.sleep(0.01)
        proc.send_signal(signal.SIGTERM); how = "SIGTERM after the first record"
    code, _, lines = finish(proc)
    outcome = KillOutcome(code, lines, snapshot(root / "out"), cache_state(root / "cache"), killed_at=how)
    # a kill after the rename finds the new output complete: the same command then needs --force, as a user's would
    again = args + (["--force"] if outcome.after is not None and "--force" not in args else [])
    outcome.rerun_code, _, outcome.rerun_lines = himerge(root, *again)
    outcome.rerun, outcome.left = snapshot(root / "out"), leftovers(root)
    return outcome


@pytest.fixture(scope="module")
def kill_outcomes(refs, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("kills")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(_kill_case, name, k, refs, base) for name, k in KILLS.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(KILLS))
def test_a_kill_leaves_the_old_output_or_none_and_a_rerun_gives_the_same_bytes(name, kill_outcomes, refs):
    kill, o = KILLS[name], kill_outcomes[name]
    print(f"{name}: killed at {o.killed_at}, exit {o.code}, output after: "
          f"{'none' if o.after is None else 'old' if o.after == snapshot(refs.old) else 'new'}, cache {o.cache[0]}")
    if kill.term_at_record:
        assert o.code == 143, o.lines
        m = re.fullmatch(r"himerge: terminated\. (\d+) evaluations of this run are saved in .*cache; run the same "
                         r"command again to resume from them\.", o.lines[0] if len(o.lines) == 1 else "")
        assert m, o.lines
        assert int(m.group(1)) <= o.cache[0] <= int(m.group(1)) + 1
    elif o.after != refs.outputs[kill.config]:   # killed before it finished (a random kill may come late)
        assert o.code == -signal.SIGKILL, (o.code, o.lines)
    # the output is absent, the old one, or (killed after the swap) the new one: never partial
    allowed = [snapshot(refs.old) if kill.force else None, refs.outputs[kill.config]]
    assert o.after in allowed, sorted(o.after or {})
    assert o.cache[1] == [], o.cache
    assert o.rerun_code == 0, o.rerun_lines
    assert o.rerun == refs.outputs[kill.config]
    assert o.left == []


# --- 2. two runs at once ------------------------------------------------------------------------------------------

def test_two_runs_one_output_is_refused_naming_the_pid_and_a_shared_cache_stays_whole(refs, tmp_path):
    root = new_world(refs.template, tmp_path / "w")
    first = start(root, "merge", "tasks.yaml", "--quiet")
    beside = start(root, "merge", "tasks.yaml", "--quiet", "--out", "out-beside")   # the same cache folder
    while not (root / ".out.lock").exists() and first.poll() is None: time.sleep(0.01)
    code, out, lines = himerge(root, "merge", "plain.yaml", "--quiet")
    assert first.poll() is None, "the first run ended before the second started"
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"himerge: error: .*/out: another himerge run \(PID {first.pid}\) is writing this "
                        r"output; .*", lines[0]), lines[0]
    for proc in (first, beside):
        code, _, lines = finish(proc)
        assert code == 0, lines
    assert snapshot(root / "out") == refs.outputs["tasks"]
    beside_files = snapshot(root / "out-beside")
    assert {k: v for k, v in beside_files.items() if k not in ("README.md", "himerge_report.json")} == \
        {k: v for k, v in refs.outputs["tasks"].items() if k not in ("README.md", "himerge_report.json")}
    # both runs measured the same 8 records into one folder: each whole, each equal to the undisturbed run's
    records, damaged = cache_state(root / "cache")
    assert damaged == [] and records == len(EvalCache(refs.cache))
    for f in (root / "cache").glob("*/*.json"):
        mine, ref = read_record(f), read_record(refs.cache / f.relative_to(root / "cache"))
        assert mine["per_sample"] == ref["per_sample"], f
    code, _, lines = himerge(root, "merge", "plain.yaml", "--quiet", "--force")    # the first ended: allowed now
    assert code == 0, lines
    assert snapshot(root / "out") == refs.outputs["plain"] and leftovers(root) == []


# --- 3. a full disk (a real tmpfs mount) --------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    "Mount a tmpfs of a given size (MiB) under tmp_path; skip, saying why, where this machine does not allow it."
    mounted = []
    def mount(name: str, mib: int) -> Path:
        where = tmp_path / name
        where.mkdir()
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            reason = f"cannot mount a small tmpfs here ({run.stderr.strip() or run.returncode}): disk-full case skipped"
            print(reason); pytest.skip(reason)
        mounted.append(where)
        return where
    yield mount
    for where in mounted: subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> Path:
    "Take every free byte of `disk` with one file, as another program filling the disk would; the file."
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (2**16, 2**12, 1):              # unbuffered: every byte written is on the disk
            try:
                while True: os.write(fd, b"\0" * chunk)
            except OSError: pass
    finally: os.close(fd)
    return filler


def paused_at(root: Path, args: list, points: list, point: str, action, env=None) -> tuple:
    "Run `himerge ARGS`, stop it (SIGSTOP) at the first write point named `point`, call `action()`, let it go on."
    proc = start(root, *args, env={"HIMERGE_PAUSE_AT_WRITE": str(points.index(point) + 1), **(env or {})})
    while proc.poll() is None:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T": break
        time.sleep(0.01)
    assert proc.poll() is None, finish(proc)
    action()
    proc.send_signal(signal.SIGCONT)
    return finish(proc)


DISK_FULL = {   # name -> (config, extra arguments, an old output there, the write point where the disk fills)
    "model": ("plain", [], False, "staging folder"),
    "model over an old output": ("plain", ["--force"], True, "staging folder"),
    "card and report over an old output": ("plain", ["--force"], True, "model files"),
    "adapter over an old output": ("plain", ["--force", "--as-adapter"], True, "staging folder"),
}


@pytest.mark.parametrize("name", list(DISK_FULL))
def test_a_disk_that_fills_up_while_writing_stops_in_one_line_and_harms_nothing(name, refs, small_disk, tmp_path):
    config, extra, old, point = DISK_FULL[name]
    root = new_world(refs.template, tmp_path / "w")
    disk = small_disk("disk", 32)
    if old: shutil.copytree(refs.old, disk / "out")
    before = snapshot(disk / "out")
    args = ["merge", f"{config}.yaml", "--quiet", "--out", disk / "out", *extra]
    points = refs.points[(config, old)]
    filler = []
    code, _, lines = paused_at(root, args, points, point, lambda: filler.append(fill(disk)))
    print(f"{name}: {lines}")
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"himerge: error: --out .*/out: the disk filled up while writing \S+: the output needs "
                        rf"(about|at most) [\d.]+ MB in {re.escape(str(disk))}; nothing was written .*",
                        lines[0]), lines[0]
    assert snapshot(disk / "out") == before                       # the old output, or none, exactly as it was
    assert sorted(p.name for p in disk.iterdir()) == sorted(["filler", *(["out"] if old else [])])
    if name == "model":                                           # room again: the same command finishes
        filler[0].unlink()
        code, _, lines = himerge(root, *args)
        assert code == 0, lines
        assert snapshot(disk / "out") == refs.outputs["plain"]


def test_a_disk_too_small_is_refused_before_the_merge_and_the_dry_run_says_the_size(refs, small_disk, tmp_path):
    root = new_world(refs.template, tmp_path / "w")
    disk = small_disk("disk", 2)
    code, out, lines = himerge(root, "merge", "plain.yaml", "--out", disk / "out", "--dry-run")
    assert code == 0 and re.search(r"output +about 4\.\d MB \(model\)", out), out
    code, _, lines = himerge(root, "merge", "plain.yaml", "--quiet", "--out", disk / "out")
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(r"himerge: error: --out .*/out: not enough space: the output needs about 4\.\d MB, .* has "
                        r"[0-2]\.\d MB free; free some space or choose another folder", lines[0]), lines[0]
    assert list(disk.iterdir()) == []


def test_a_full_cache_disk_keeps_every_saved_evaluation_and_the_rerun_reuses_them(refs, small_disk, tmp_path):
    root = new_world(refs.template, tmp_path / "w")
    disk = small_disk("cache-disk", 8)
    config = yaml.safe_load((root / "tasks.yaml").read_text())
    config["options"]["cache_dir"] = str(disk / "cache")
    (root / "tasks.yaml").write_text(yaml.safe_dump(config))
    filler = []
    code, _, lines = paused_at(root, ["merge", "tasks.yaml", "--quiet"], refs.points[("tasks", False)],
                               "cache record", lambda: filler.append(fill(disk)))
    # paused with its first record written, not yet renamed: that one is saved, the next finds no room
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(r"himerge: error: options\.cache_dir: no space left on .*/cache to save an evaluation \(\d+ "
                        r"bytes needed, \d+ free\); the 1 evaluations saved so far are kept: .*", lines[0]), lines[0]
    assert cache_state(disk / "cache") == (1, [])
    assert not (root / "out").exists() and leftovers(root) == []
    filler[0].unlink()
    code, out, lines = himerge(root, "merge", "tasks.yaml", "--quiet")
    assert code == 0, lines
    assert "evaluations: 7 run, 1 reused from cache" in out, out
    assert snapshot(root / "out") == refs.outputs["tasks"]


# --- 4. a damaged cache -------------------------------------------------------------------------------------------

def damage(path: Path, how: str):
    "Damage the cache record at `path`."
    if how == "cut short": path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "another format": path.write_text(json.dumps({**json.loads(path.read_text()), "format": 2}))
    elif how == "empty": path.write_bytes(b"")
    elif how == "a folder": path.unlink(); path.mkdir(); (path / "stray").write_text("x")
    elif how == "a pipe": path.unlink(); os.mkfifo(path)
    elif how == "unreadable": path.chmod(0)
    else: raise ValueError(how)


DAMAGE = {"cut short": "not complete JSON", "another format": "format 2; this himerge reads format 1",
          "empty": "empty (0 bytes)", "a folder": "a folder where a record file should be",
          "a pipe": "not a regular file", "unreadable": "cannot be read (Permission denied)"}

_READ_AS = """
import json, logging, sys
from himerge.cache import EvalCache
warned = []
h = logging.Handler(); h.emit = lambda r: warned.append(r.getMessage()); logging.getLogger("himerge").addHandler(h)
cache = EvalCache(sys.argv[1])
print(json.dumps([cache.get(sys.argv[2]), cache.get(sys.argv[2]), warned]))
"""


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_record_is_reported_once_naming_the_file_and_measured_again(how):
    import tempfile
    from himerge.cache import fingerprint
    key = fingerprint({"state": "base", "task": how})
    folder = Path(tempfile.mkdtemp(prefix="himerge-damage-"))
    try:
        EvalCache(folder).put(key, {"score": 0.5, "per_sample": [1.0, 0.0]})
        path = next(folder.glob("*/*.json"))
        damage(path, how)
        prefix = []
        if how == "unreadable" and os.geteuid() == 0:
            # root reads any file whatever its mode: read it as root without that power, as a user would meet it
            if not shutil.which("setpriv"):
                reason = "setpriv is missing: cannot drop root's power to read any file; permission case skipped"
                print(reason); pytest.skip(reason)
            caps = "-dac_override,-dac_read_search"
            prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
        run = subprocess.run([*prefix, sys.executable, "-c", _READ_AS, str(folder), key], capture_output=True,
                             text=True, env=ENV)
        assert run.returncode == 0, run.stderr
        first, again, warned = json.loads(run.stdout)
        assert first is None and again is None
        assert len(warned) == 1 and str(path) in warned[0] and DAMAGE[how] in warned[0], warned
        if not prefix: assert [p for p, _ in damaged_records(folder)] == [path]   # what `cache check` lists
        EvalCache(folder).put(key, {"score": 0.5, "per_sample": [1.0, 0.0]})    # measured again, and replaced
        assert EvalCache(folder).get(key) == {"score": 0.5, "per_sample": [1.0, 0.0]}
        assert damaged_records(folder) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_merge_on_a_damaged_cache_warns_once_per_file_and_gives_the_same_bytes(refs, tmp_path):
    root = new_world(refs.template, tmp_path / "w")
    shutil.copytree(refs.cache, root / "cache")
    records = sorted((root / "cache").glob("*/*.json"))
    kinds = [k for k in DAMAGE if k != "unreadable"]            # root reads any file: that one is tested above
    for path, how in zip(records, kinds): damage(path, how)
    code, out, lines = himerge(root, "cache", "check", "cache")
    assert code == 1 and len(out.splitlines()) == len(kinds) + 1, out
    assert all(p.name in out for p in records[: len(kinds)]) and f"damaged: {len(kinds)}" in out, out
    code, out, lines = himerge(root, "merge", "tasks.yaml", "--quiet")
    assert code == 0, lines
    assert len(lines) == len(kinds), lines                       # one warning per damaged file, nothing else
    for path in records[: len(kinds)]:
        assert sum(path.name in line for line in lines) == 1, (path, lines)
    assert f"evaluations: {len(kinds)} run, {len(records) - len(kinds)} reused from cache" in out, out
    assert snapshot(root / "out") == refs.outputs["tasks"]
    assert damaged_records(root / "cache") == []


def test_cache_check_repair_removes_the_damaged_records(refs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(refs.cache, cache)
    records = sorted(cache.glob("*/*.json"))
    for path, how in zip(records, ["cut short", "a folder", "a pipe"]): damage(path, how)
    code, out, _ = himerge(tmp_path, "cache", "check", cache, "--repair")
    assert code == 0 and "damaged: 3, removed" in out, out
    assert cache_state(cache) == (len(records) - 3, [])
    code, out, _ = himerge(tmp_path, "cache", "check", cache)
    assert code == 0 and out.endswith("damaged: 0\n"), out


# --- 5. an input changed between the plan and the write; a cache path that is a file -------------------------------

CHANGED = {   # name -> (file, change, expected words)
    "a source's weights rewritten (modification time)": ("lora-last/adapter_model.safetensors",
                                                         lambda f: os.utime(f, ns=(0, 0)), "was modified"),
    "the base's config grown (size)": ("base/config.json", lambda f: f.write_bytes(f.read_bytes() + b" "),
                                       "changed size"),
}


@pytest.mark.parametrize("name", list(CHANGED))
def test_an_input_changed_after_the_plan_stops_the_merge_before_the_output(name, refs, tmp_path):
    file, change, words = CHANGED[name]
    root = new_world(refs.template, tmp_path / "w", refs.old)
    original = (root / file).read_bytes()
    code, _, lines = paused_at(root, ["merge", "plain.yaml", "--quiet", "--force"], refs.points[("plain", True)],
                               "model files", lambda: change(root / file))
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"himerge: error: .*/{re.escape(file)}: {words} since the merge was planned; the output "
                        r"was not written .*", lines[0]), lines[0]
    assert snapshot(root / "out") == snapshot(refs.old) and leftovers(root) == []
    (root / file).write_bytes(original)
    code, _, lines = himerge(root, "merge", "plain.yaml", "--quiet", "--force")
    assert code == 0, lines
    assert snapshot(root / "out") == refs.outputs["plain"]


def test_a_cache_dir_that_is_a_file_is_refused_even_without_evaluations(template, tmp_path, capsys):
    from himerge.cli import main
    root = new_world(template, tmp_path / "w")
    (root / "notes.txt").write_text("mine")
    config = yaml.safe_load((root / "plain.yaml").read_text())
    config["options"] = {"cache_dir": "notes.txt"}
    (root / "plain.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(root / "plain.yaml"), "--quiet", "--out", str(root / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"himerge: error: options.cache_dir: {root / 'notes.txt'} is a file; the evaluation cache "
                     "needs a folder"], lines
    assert not (root / "out").exists() and (root / "notes.txt").read_text() == "mine"
