"""``eos report`` tells the truth (issue 18.6), through the CLI: the peak ratio
leaves out Adam's opening transient, errored trials show their status and
reason, one lr order in tables and figures, and the Inception box only when
FID was asked for."""
import hashlib
import json

import pandas as pd

from analysis import plots as P
from analysis_fixtures import SyntheticTrial, markdown_rows, write_study


def _config(eval_every: int) -> str:
    return json.dumps({"eval": {"every": eval_every}})


def _study(tmp_path, eval_every: int = 0):
    config = {"config": _config(eval_every)}
    trials = [
        SyntheticTrial("base", 1e-3, 0, steps=40, onset=None, ratio0=2900.0, ratio_end=1.59, extra=config),
        SyntheticTrial("base", 1e-4, 0, steps=40, onset=20, extra=config),
        SyntheticTrial("base", 5e-4, 0, steps=40, onset=25, extra=config),
    ]
    study_dir = write_study(tmp_path / "study", trials)
    table = pd.read_parquet(study_dir / "trials.parquet")
    failed = {"trial_id": "edm_lr0.001_s0", "variant": "edm", "lr": 1e-3, "seed": 0, "optimizer": "adam",
              "status": "error", "steps_done": 0, "final_loss": float("nan"), "config": _config(eval_every),
              "reason": "data.path: '/d/x.npz' has no array named 'x_train' or 'images' or 'x' (its arrays: foo)"}
    table = pd.concat([table, pd.DataFrame([failed])], ignore_index=True)
    table.to_parquet(study_dir / "trials.parquet")
    return study_dir


def _report(study_dir, capsys):
    from study.cli import main

    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in study_dir.rglob("*") if p.is_file()}
    assert main(["report", str(study_dir)]) == 0
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}
    assert after == before                                  # the results are read, never changed
    return capsys.readouterr().out, (study_dir / "report" / "summary.md").read_text(encoding="utf-8")


def test_the_peak_ratio_leaves_out_the_opening_transient(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out, md = _report(_study(tmp_path), capsys)
    rows = {(r[0], r[1]): r for r in markdown_rows(md) if r and r[0] in ("base", "edm")}
    header = next(r for r in markdown_rows(md) if r and r[0] == "variant")
    peak = header.index("peak ratio")
    assert rows[("base", "1e-3")][peak] == "—"             # never below 1: all of it is the transient
    assert "2.9e+03" not in md and "2900" not in md
    assert rows[("base", "1e-3")][header.index("reached EoS")] == "0/1 (1 never below 1)"


def test_errored_trials_show_status_and_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out, md = _report(_study(tmp_path), capsys)
    header = next(r for r in markdown_rows(md) if r and r[0] == "variant")
    edm = next(r for r in markdown_rows(md) if r and r[:2] == ["edm", "1e-3"])
    assert edm[header.index("reached EoS")] == "— (error)" and edm[header.index("errors")] == "1/1"
    assert edm[header.index("diverged")] == "—"            # not "0/1": it has no result
    line = ("- edm_lr0.001_s0: data.path: '/d/x.npz' has no array named 'x_train' or 'images' or 'x' "
            "(its arrays: foo)")
    assert line in out and "> " + line in md
    html = (tmp_path / "study" / "report" / "report.html").read_text(encoding="utf-8")
    row = html[html.index(">edm_lr0.001_s0</td>"):]
    row = row[:row.index("</tr>")]
    assert " >error</td>" in row and "has no array named" in row   # the trials table: status and reason


def test_one_learning_rate_order_in_tables_and_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out, md = _report(_study(tmp_path), capsys)
    order = [P.format_lr(lr) for lr in P.lr_order([1e-3, 1e-4, 5e-4])]
    assert order == ["1e-3", "5e-4", "1e-4"]
    summary = [r[1] for r in markdown_rows(md) if r and r[0] == "base" and len(r) > 3]
    assert summary[:3] == order
    html = (tmp_path / "study" / "report" / "report.html").read_text(encoding="utf-8")
    trials = [html.index(f">base_lr{lr:g}_s0</td>") for lr in (1e-3, 5e-4, 1e-4)]
    assert trials == sorted(trials)                          # the trials table: the same order
    assert list(P._grid(pd.DataFrame({"variant": "base", "lr": [1e-4, 1e-3, 5e-4], "x": 1.0}), "x").columns) == \
        [1e-3, 5e-4, 1e-4]                                   # heatmap columns


def test_the_inception_box_only_when_fid_was_asked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out, md = _report(_study(tmp_path / "off", eval_every=0), capsys)
    assert "No FID/IS/KID was measured" not in out + md and "Inception" not in md
    out, md = _report(_study(tmp_path / "on", eval_every=100), capsys)
    assert "No FID/IS/KID was measured" in out and "No FID/IS/KID was measured" in md
    assert "Inception-v3 weights for FID/IS/KID not found" in md
