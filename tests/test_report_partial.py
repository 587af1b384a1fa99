"""``eos report`` on a study that is still running or was interrupted (issue
19.5): the trials come from the run folders and the step dataset when
``trials.parquet`` is missing or older than a run's ``status.json``,
unfinished trials are marked, and damaged chunks are still named.

The studies are written with the project's own code: run folders linked into
the dataset by :class:`study.layout.StudyLayout`, logs by
:class:`trainers.run.steplog.StepLog`, statuses by :class:`RunDir`, the
trials table by :func:`study.trials.collect_trials`."""
import os

import numpy as np
import pandas as pd

from analysis_fixtures import SyntheticTrial, markdown_rows, write_steps
from study.cli import main as eos
from study.layout import StudyLayout
from study.trials import collect_trials, write_trials
from trainers.config import run_config
from trainers.run.rundir import RunStatus
from trainers.run.steplog import StepLog

BANNER = "trials unfinished: the study is still running or was interrupted; numbers for them are partial"


def write_trial(layout: StudyLayout, t: SyntheticTrial, logged: int = None, status: str = "ended",
                checkpoint: int = None):
    """Trial ``t`` in its run folder: ``logged`` rows (default all); status
    ``ended`` (its own), ``running`` at step ``checkpoint`` or ``none`` (no status.json)."""
    run = layout.prepare_run_dir(t.variant, t.trial_id)
    run.write_config(run_config({"variant": {"name": t.variant}, "optim": {"name": "adam", "lr": t.lr},
                                 "train": {"seed": t.seed, "steps": t.steps}}).to_dict())
    rows = t.rows()[:logged]
    write_steps(run.steps, rows)
    if status == "ended":
        run.write_status(RunStatus(t.status, t.steps_done, t.expected_final_loss(), None, 1.0))
    elif status == "running":
        run.write_status(RunStatus("running", checkpoint, rows[checkpoint - 1]["loss"], None, 1.0))
    return run


def _report(path, capsys):
    capsys.readouterr()
    code = eos(["report", str(path)])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _docs(study):
    report = study / "report"
    return ((report / "summary.md").read_text(encoding="utf-8"), (report / "report.html").read_text(encoding="utf-8"),
            pd.read_csv(report / "per_trial.csv").set_index("trial_id"))


def _html_row(html: str, trial: str) -> str:
    row = html[html.index(f">{trial}</td>"):]
    return row[:row.index("</tr>")]


def _complete(layout):
    trials = [SyntheticTrial("base", 1e-3, 0, onset=40), SyntheticTrial("base", 1e-3, 1, onset=44),
              SyntheticTrial("edm", 1e-3, 0, onset=30, diverge_at=80), SyntheticTrial("edm", 1e-4, 0, onset=60)]
    for t in trials:
        write_trial(layout, t)
    return trials


def test_without_trials_parquet_every_trial_gets_its_run_folders_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    layout = StudyLayout(tmp_path / "s")
    done = _complete(layout)
    ckpt = SyntheticTrial("base", 1e-4, 0, onset=50)            # between checkpoints: rows beyond step 40
    write_trial(layout, ckpt, logged=57, status="running", checkpoint=40)
    killed = SyntheticTrial("base", 1e-4, 1, onset=None)         # killed before its first checkpoint
    write_trial(layout, killed, logged=12, status="none")
    orphan = SyntheticTrial("edm", 1e-4, 1, onset=64)            # rows in steps/, no run folder
    write_steps(layout.partition("edm", orphan.trial_id), orphan.rows()[:30])
    assert not layout.trials_table.exists()

    code, out, err = _report(layout.root, capsys)
    assert (code, err) == (0, [])
    md, html, per_trial = _docs(layout.root)
    expect = {**{t.trial_id: (t.status, t.steps_done) for t in done},
              ckpt.trial_id: ("running", 57), killed.trial_id: ("running", 12), orphan.trial_id: ("running", 30)}
    assert {i: (r["status"], r["steps_done"]) for i, r in per_trial.iterrows()} == expect
    assert per_trial.loc[orphan.trial_id, ["variant", "lr", "seed"]].tolist() == ["edm", 1e-4, 1]
    assert " >diverged</td>" in _html_row(html, done[2].trial_id)
    assert " >running (step 57 of 120)</td>" in _html_row(html, ckpt.trial_id)
    assert " >running (step 12 of 120)</td>" in _html_row(html, killed.trial_id)
    assert " >running (step 30)</td>" in _html_row(html, orphan.trial_id)   # no config: no planned steps
    for line in (f"- {ckpt.trial_id}: running (step 57 of 120)", f"- {killed.trial_id}: running (step 12 of 120)",
                 f"- {orphan.trial_id}: running (step 30)"):
        assert "> " + line in md and line in out
    assert f"`{layout.root}` · 7 trial(s): 3 running, 3 completed, 1 diverged" in md.splitlines()
    for t in done:
        assert t.trial_id in html


def test_an_interrupted_study_is_marked_and_measured_from_the_rows_present(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    layout = StudyLayout(tmp_path / "s")
    done = _complete(layout)
    going = SyntheticTrial("base", 1e-4, 0, onset=50)
    run = write_trial(layout, going, logged=40, status="running", checkpoint=40)
    resumed = SyntheticTrial("base", 1e-4, 1, onset=None)
    write_trial(layout, resumed, logged=57, status="running", checkpoint=40)
    write_trials(layout, collect_trials(layout, "final_loss", ["base", "edm"]))   # the driver was stopped here
    table = pd.read_parquet(layout.trials_table).set_index("trial_id")
    assert table.loc[going.trial_id, "steps_done"] == 40 and table.loc[resumed.trial_id, "steps_done"] == 57
    then = layout.trials_table.stat().st_mtime
    # resumed: `going` trains on to a checkpoint at 80 and logs 97 steps; `resumed` is truncated back to its
    # checkpoint (40) and has logged 45 steps since, with no newer status.json
    log = StepLog(run.steps)
    for row in going.rows()[40:97]:
        log.append(**row)
    log.flush()
    run.write_status(RunStatus("running", 80, going.rows()[79]["loss"], None, 2.0))
    os.utime(run.status_file, (then + 10, then + 10))
    back = StepLog(layout.run_dir(resumed.trial_id).steps)
    back.truncate_after(39)
    for row in resumed.rows()[40:45]:
        back.append(**row)
    back.flush()

    code, out, err = _report(layout.root, capsys)
    assert (code, err) == (0, [])
    md, html, per_trial = _docs(layout.root)
    banner = f"2 of 6 {BANNER}"
    assert md.splitlines()[2] == f"**{banner}**"                 # under the title
    assert html.index(f'<p class="banner">{banner}</p>') < html.index("<h2>")
    assert out.splitlines()[0] == f"loading {layout.root}" and banner in out
    assert " >running (step 97 of 120)</td>" in _html_row(html, going.trial_id)
    assert " >running (step 45 of 120)</td>" in _html_row(html, resumed.trial_id)
    header = next(r for r in markdown_rows(md) if r and r[0] == "variant")
    rows = {(r[0], r[1]): r for r in markdown_rows(md) if r and r[0] in ("base", "edm")}
    assert rows[("base", "1e-4")][header.index("unfinished")] == "2/2"
    assert rows[("base", "1e-3")][header.index("unfinished")] == "0/2"
    # metrics of the rows present, against the synthetic curve's own answers
    g = per_trial.loc[going.trial_id]
    assert (g["steps_done"], g["onset_step"], g["logged_steps"]) == (97, 50, 97)
    assert np.isclose(g["final_loss"], going.loss_at(96))
    after = [s for s in range(50, 97)]
    assert np.isclose(g["frac_near_threshold"], sum(1 for k in range(len(after)) if k % 5 != 4) / len(after))
    r = per_trial.loc[resumed.trial_id]
    assert (r["steps_done"], r["logged_steps"]) == (45, 45) and np.isclose(r["final_loss"], resumed.loss_at(44))
    assert np.isclose(r["sharpening_rate"], resumed.threshold * (resumed.ratio_end - resumed.ratio0) / (resumed.steps - 1))
    for name in ("lambda", "ratio", "loss"):
        svg = (layout.root / "report" / "figures" / f"{name}.svg").read_text(encoding="utf-8")
        assert "partial: 2 of 6 trials unfinished" in svg


def test_a_damaged_chunk_of_a_running_study_is_still_one_line(tmp_path, capsys):
    layout = StudyLayout(tmp_path / "s")
    _complete(layout)
    going = SyntheticTrial("base", 1e-4, 0, onset=50)
    run = write_trial(layout, going, logged=70, status="running", checkpoint=50)
    part = layout.partition("base", going.trial_id)
    chunk = part / "part-000000050-000000069.parquet"
    chunk.write_bytes(chunk.read_bytes()[:100])
    code, out, err = _report(layout.root, capsys)
    assert code == 2 and err == [f"eos report: {part}: part-000000050-000000069.parquet is damaged (Parquet magic "
                                 "bytes not found in footer. Either the file is corrupted or this is not a "
                                 "parquet file.)"]
    chunk.unlink()
    (run.steps / "part-000000000-000000049.parquet").unlink()
    code, out, err = _report(layout.root, capsys)
    assert code == 2 and err == [f"eos report: {part}: part-000000000-000000049.parquet is missing (steps 0–49, "
                                 "50 rows, listed in _manifest.json); part-000000050-000000069.parquet is missing "
                                 "(steps 50–69, 20 rows, listed in _manifest.json)"]


def test_a_complete_study_reads_the_same_with_or_without_its_trials_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    layout = StudyLayout(tmp_path / "s")
    _complete(layout)
    write_trials(layout, collect_trials(layout, "final_loss", ["base", "edm"]))
    assert _report(layout.root, capsys)[0] == 0
    md, html, per_trial = _docs(layout.root)
    assert "unfinished" not in md and BANNER not in md and 'class="banner"' not in html
    assert set(per_trial["status"]) == {"completed", "diverged"}
    svg = (layout.root / "report" / "figures" / "ratio.svg").read_text(encoding="utf-8")
    assert "partial:" not in svg
    layout.trials_table.unlink()
    assert _report(layout.root, capsys)[0] == 0
    md2, _, per_trial2 = _docs(layout.root)
    assert md2 == md
    cols = ["variant", "lr", "seed", "status", "steps_done", "onset_step", "final_loss"]
    pd.testing.assert_frame_equal(per_trial2.sort_index()[cols], per_trial.sort_index()[cols])


def test_a_trial_named_otherwise_is_drawn_at_the_largest_lr_it_logged(tmp_path):
    from analysis.load import load

    t = SyntheticTrial("base", 2e-4, 3, steps=20, onset=10)
    rows = t.rows()
    for r in rows:
        r["lr"] = t.lr * min(1.0, (r["step"] + 1) / 5)          # warm-up: the logged lr rises to 2e-4
    write_steps(tmp_path / "s" / "steps" / "variant=base" / "trial=00017", rows)
    row = load(tmp_path / "s").trials.iloc[0]
    assert (row["trial_id"], row["variant"], row["lr"], row["status"], row["steps_done"]) == \
        ("00017", "base", 2e-4, "running", 20)
    assert row["seed"] is None


def test_a_single_run_between_checkpoints_is_marked(tmp_path, capsys, monkeypatch):
    from analysis_fixtures import write_run
    from trainers.run.rundir import RunDir

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t = SyntheticTrial("base", 1e-3, 0, steps=120, onset=40)
    run = write_run(tmp_path / "r", t)
    RunDir(run).write_status(RunStatus("running", 50, t.loss_at(49), None, 1.0))
    StepLog(run / "steps").truncate_after(56)                     # 57 steps logged, checkpoint at 50
    code, out, err = _report(run, capsys)
    assert (code, err) == (0, [])
    md, html, per_trial = _docs(run)
    assert md.splitlines()[2] == ("**1 of 1 trial unfinished: the run is still running or was interrupted; "
                                  "numbers for it are partial**")
    assert " >running (step 57 of 120)</td>" in _html_row(html, "r")
    assert per_trial.loc["r", "steps_done"] == 57 and np.isclose(per_trial.loc["r", "final_loss"], t.loss_at(56))
