"""scripts/run_train_cgs_on_task.py and run_train_head_on_task.py end to end on tiny settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from script_helpers import load_script

from aiop.cache import Store
from aiop.tasks.recipes import DEFAULT_RECIPE, label_tag

ROOT = Path(__file__).resolve().parents[1]
CGS = ROOT / "scripts" / "run_train_cgs_on_task.py"
HEAD = ROOT / "scripts" / "run_train_head_on_task.py"
# Tiny but real: 32 px, 32 training scenes, one epoch, a 16-wide head.
TINY = ["-resolution", "32", "-n_train", "32", "-n_val", "16", "--batch_size", "16", "-width", "16"]


def _cmd(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        _cmd(script, *args), capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )


def _script(path: Path):
    """Import a script as a module, to call its ``main(argv)`` in this process (fast)."""
    return load_script(path, path.stem)


def _acc(store: Path, tag: str) -> dict[str, float]:
    """Labels of ``tag`` or of any tag it prefixes (the default tags name the recipe)."""
    with Store(store, readonly=True) as s:
        models = {i.fingerprint: i.meta["model"] for i in s.graphs()}
        return {
            models[r.graph]: r.value
            for r in s.labels(kind="acc")
            if r.mode == tag or r.mode.startswith(f"{tag}-")
        }


def test_labels_then_resume_skips_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default recipe, whatever it is, end to end (a supernet recipe's supernet tiny)."""
    from aiop.tasks import supernet

    monkeypatch.setenv("AIOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        supernet,
        "supernet_config",
        lambda family: supernet.SupernetConfig(family, epochs=1, n_train=32, n_val=16),
    )
    cgs = _script(CGS)  # in process: the data sets are built once
    db = tmp_path / "t.db"
    base = ["-family", "ofa_mbv3", "-task", "semantic", "-cache_file", str(db), "-q", *TINY]
    assert cgs.main([*base, "-num_archs", "1", "--num_epochs", "1"]) == 0
    # the default tag names the recipe and hashes the overridden settings
    overrides = {"resolution": 32, "n_train": 32, "n_val": 16, "batch_size": 16, "epochs": 1}
    tag = cgs.default_tag(DEFAULT_RECIPE, "semantic", overrides, shared=False)
    assert tag.startswith(f"{label_tag(DEFAULT_RECIPE, 'semantic')}-")
    assert f"tag {tag}: labelled 1, skipped 0" in capsys.readouterr().out
    one = _acc(db, "individual")
    assert list(one) == ["family:ofa_mbv3:0"] and 0.0 <= one["family:ofa_mbv3:0"] <= 1.0
    assert cgs.main([*base, "-num_archs", "2", "--num_epochs", "1", "--json"]) == 0
    assert '"labelled": 1, "skipped": 1' in capsys.readouterr().out
    both = _acc(db, "individual")
    assert both["family:ofa_mbv3:0"] == one["family:ofa_mbv3:0"]  # untouched
    with Store(db, readonly=True) as s:
        info = next(iter(s.graphs()))
        assert info.meta["task"] == "semantic" and info.name.endswith("+semantic")
        cg = s.get_graph(info.fingerprint)
        assert any(n.op == "Resize" for n in cg.nodes)  # the head is in the task CG
        kinds = {r.kind for r in s.labels(graph=info.fingerprint)}
        assert {"acc", "mIoU"} <= kinds
        assert s.tasks()["semantic"]["metric"] == "mIoU"


def _modes(store: Path) -> dict[str, set[str]]:
    """task -> the tags its ``acc`` labels are filed under."""
    with Store(store, readonly=True) as s:
        out: dict[str, set[str]] = {}
        for r in s.labels(kind="acc"):
            out.setdefault(r.task, set()).add(r.mode)
        return out


def test_each_task_gets_its_recipes_tag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """v3 trains classification as v2 does and pose its own way: one run of both tasks files
    classification under individual-v2-<overrides> and pose under individual-v3-<overrides>;
    an explicit -tag is one set for every task and still refuses another recipe."""
    cgs = _script(CGS)
    two = ("classification", "pose")
    db = tmp_path / "two.db"
    base = ["-family", "ofa_mbv3", "-task", "classification", "pose", "-cache_file", str(db)]
    base += ["-recipe", "v3", "-num_archs", "1", "--num_epochs", "1", "-q", *TINY]
    assert cgs.main([*base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    overrides = {"resolution": 32, "n_train": 32, "n_val": 16, "batch_size": 16, "epochs": 1}
    tags = {t: cgs.default_tag("v3", t, overrides, shared=False) for t in two}
    assert tags["classification"].startswith("individual-v2-")
    assert tags["pose"].startswith("individual-v3-")
    assert tags["classification"].split("-")[-1] == tags["pose"].split("-")[-1]  # same overrides
    assert report["tags"] == tags
    assert {(x["task"], x["tag"]) for x in report["labels"]} == set(tags.items())
    assert _modes(db) == {t: {tag} for t, tag in tags.items()}
    # resumes per tag; the text report names each task's tag
    assert cgs.main(base) == 0
    out = capsys.readouterr().out
    assert (
        f"tags {tags['classification']} (classification), {tags['pose']} (pose): "
        "labelled 0, skipped 2"
    ) in out
    # an explicit -tag names one set for every task: a different recipe than the one it holds
    # for pose is refused before any training
    argv = [*base, "-tag", tags["pose"], "--num_epochs", "2"]
    assert cgs.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"label set '{tags['pose']}' of task pose holds" in err[0]
    assert _modes(db) == {t: {tag} for t, tag in tags.items()}  # nothing written


@pytest.mark.slow
def test_shared_head_then_pseudo_labels(tmp_path: Path) -> None:
    chkpt = tmp_path / "head.safetensors"
    head_args = ["-family", "ofa_pn", "-task", "pose", "-chkpt", str(chkpt), "-q"]
    tiny_head = ["-sample_n", "2", "--num_steps", "2", "-resolution", "32", "-n_train", "32"]
    made = _run(HEAD, *head_args, *tiny_head, "--batch_size", "16", "-width", "16")
    assert made.returncode == 0, made.stderr
    assert chkpt.is_file()
    again = _run(HEAD, *head_args, *tiny_head)
    assert again.returncode == 0 and "kept" in again.stdout
    db = tmp_path / "s.db"
    out = _run(
        CGS, "-family", "ofa_pn", "-task", "pose", "-chkpt", str(chkpt), "-num_archs", "1",
        "-cache_file", str(db), "-q", "-recipe", "v3", *TINY,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    labels = _acc(db, "shared")
    assert list(labels) == ["family:ofa_pn:0"]
    wrong = _run(
        CGS, "-family", "ofa_mbv3", "-task", "pose", "-chkpt", str(chkpt), "-cache_file",
        str(db), "-q", *TINY,
    )  # fmt: skip
    assert wrong.returncode == 2 and "ofa_pn" in wrong.stderr


BAD_FLAGS = [
    (["-family", "ofa_mbv3", "-task", "depth"], "unknown task 'depth'"),
    (["-family", "ofa_vgg", "-task", "pose"], "unknown family 'ofa_vgg'"),
    (["-family", "ofa_mbv3", "-task", "pose", "-num_archs", "0"], "num_archs >= 1"),
    (["-family", "ofa_mbv3", "-task", "pose", "-chkpt", "/nonexistent.st"], "does not exist"),
    (["-family", "ofa_mbv3", "-task", "pose", "--num_epochs", "x"], "invalid int value"),
    (["-task", "pose"], "-family"),
    (["-family", "ofa_mbv3", "-task", "pose", "-cache_file", "/no/dir/x.db"], "does not exist"),
    (["-family", "ofa_mbv3", "-task", "pose", "-resolution", "0"], "-resolution must be >= 1"),
]


def test_bad_flags_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cgs, head = _script(CGS), _script(HEAD)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    cases = [(cgs, a, m) for a, m in BAD_FLAGS] + [
        (cgs, ["-family", "ofa_mbv3", "-task", "pose", "-chkpt", str(bad)], "not a safetensors"),
        (head, ["-family", "ofa_mbv3", "-task", "segmentation"], "unknown task"),
        (head, ["-family", "ofa_mbv3", "-task", "pose", "-mode", "x"], "invalid choice"),
        (head, ["-family", "ofa_mbv3", "-task", "pose", "-sample_n", "0"], "pool_size >= 1"),
    ]
    for module, argv, message in cases:
        try:
            code = module.main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, err)
    # and through a real process: exit status 2, one line, no traceback
    out = _run(CGS, "-family", "ofa_mbv3", "-task", "depth")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_kill_minus_nine_then_resume(tmp_path: Path) -> None:
    """A run killed mid-way keeps its finished labels; a re-run does only the rest."""
    db = tmp_path / "k.db"
    args = [
        "-family", "ofa_mbv3", "-task", "classification", "-num_archs", "3", "--num_epochs", "1",
        "-cache_file", str(db), "-q", "-recipe", "v3", *TINY,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(CGS, *args), env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    if len(_acc(db, "individual")) >= 1:
                        break
                except Exception:  # the store is being created; try again
                    pass
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _acc(db, "individual")
    assert 1 <= len(done) <= 3
    rerun = _run(CGS, *args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert f'"skipped": {len(done)}' in rerun.stdout
    final = _acc(db, "individual")
    assert len(final) == 3 and all(final[k] == v for k, v in done.items())
