"""``eos study merge``: studies run in parts (a subset of variants each)
become one folder that ``eos report`` reads exactly as the unsplit study."""
import json
import os

import pandas as pd
import pytest

from analysis.load import load
from analysis_fixtures import check_report, fixture_trials, write_study
from study.cli import main as eos


def split_study(root):
    """The fixture study written whole and as two parts (base | edm, vparam),
    each part with run folders holding a checkpoint and the relative steps link."""
    trials = fixture_trials()
    whole = write_study(root / "whole", trials)
    parts = []
    for name, variants in (("part-a", {"base"}), ("part-b", {"edm", "vparam"})):
        mine = [t for t in trials if t.variant in variants]
        part = write_study(root / name, mine)
        for t in mine:
            run = part / "runs" / t.trial_id
            (run / "checkpoints").mkdir(parents=True)
            (run / "checkpoints" / "ckpt-00000010.pt").write_bytes(b"x" * 100)
            (run / "status.json").write_text(json.dumps({"status": t.status}))
            os.symlink(f"../../steps/variant={t.variant}/trial={t.trial_id}", run / "steps")
        (part / "study.json").write_text(json.dumps({"format": 1, "spec": {"study": {"variants": sorted(variants)}}}))
        parts.append(part)
    return whole, parts


def test_a_merged_study_reads_as_the_unsplit_one(tmp_path, capsys):
    whole, parts = split_study(tmp_path)
    out = tmp_path / "merged"
    assert eos(["study", "merge", str(out), *map(str, parts)]) == 0
    assert capsys.readouterr().out == (f"merged 13 trials into {out} (part-a: 5, part-b: 8); eos report {out}\n")

    a, b = load(whole), load(out)
    key = ["trial_id", "step"]
    pd.testing.assert_frame_equal(a.steps.sort_values(key).reset_index(drop=True),
                                  b.steps.sort_values(key).reset_index(drop=True), check_like=True,
                                  check_categorical=False)
    trials = b.trials.set_index("trial_id")
    assert sorted(trials.index) == sorted(a.trials["trial_id"])
    assert set(trials.loc[trials["variant"] == "base", "part"]) == {"part-a"}
    assert set(trials.loc[trials["variant"] != "base", "part"]) == {"part-b"}
    # run folders come without checkpoints; their steps link still reaches the trial's partition
    run = out / "runs" / "edm_lr0.001_s1"
    assert (run / "status.json").is_file() and not (run / "checkpoints").exists()
    assert os.readlink(run / "steps") == "../../steps/variant=edm/trial=edm_lr0.001_s1"
    assert sorted(p.name for p in (run / "steps").iterdir()) == sorted(
        p.name for p in (parts[1] / "steps/variant=edm/trial=edm_lr0.001_s1").iterdir())
    record = json.loads((out / "merged.json").read_text())
    assert [(p["name"], p["trials"]) for p in record["parts"]] == [("part-a", 5), ("part-b", 8)]
    assert record["parts"][1]["spec"] == {"study": {"variants": ["edm", "vparam"]}}
    check_report(out, tmp_path / "report")


def test_merge_refuses_in_one_line(tmp_path, capsys):
    whole, parts = split_study(tmp_path)

    def error(*args):
        capsys.readouterr()
        assert eos(["study", "merge", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eos study merge: ") and err.count("\n") == 1
        return err.strip()

    assert error(tmp_path / "m", parts[0], whole).startswith("eos study merge: trial base_lr0.001_s0 is in two parts")
    assert error(tmp_path / "m", tmp_path / "nowhere") == f"eos study merge: {tmp_path / 'nowhere'}: no such study folder"
    (tmp_path / "empty").mkdir()
    assert "not a study folder with trials.parquet and steps/" in error(tmp_path / "m", tmp_path / "empty")
    (parts[0] / ".driver.lock").write_text("{}")
    assert "a driver holds this study" in error(tmp_path / "m", parts[0])
    (parts[0] / ".driver.lock").unlink()
    assert error(tmp_path / "m", parts[0], parts[0]) == "eos study merge: a study folder is named twice"
    assert error(parts[0], parts[0], parts[1]).endswith("the output cannot be one of the parts")
    assert not (tmp_path / "m").exists()                  # nothing written by a refused merge

    # an existing output: refused, unless it is an earlier merge and --replace is given
    assert eos(["study", "merge", str(tmp_path / "m"), str(parts[0])]) == 0
    assert "exists and is not empty" in error(tmp_path / "m", *parts)
    assert eos(["study", "merge", str(tmp_path / "m"), *map(str, parts), "--replace"]) == 0
    assert len(load(tmp_path / "m").trials) == 13
    assert "exists and is not empty" in error(whole, *parts[:1], "--replace")   # not a merge: kept
    assert (whole / "trials.parquet").is_file()


def test_a_merged_folder_is_not_resumed(tmp_path, capsys):
    _, parts = split_study(tmp_path)
    assert eos(["study", "merge", str(tmp_path / "m"), *map(str, parts)]) == 0
    capsys.readouterr()
    assert eos(["study", "resume", str(tmp_path / "m")]) == 2
    assert "is a merge of studies run in parts (merged.json): resume each part" in capsys.readouterr().err
