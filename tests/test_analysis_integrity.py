"""A study or run whose step log lost or damaged a chunk (issue 17.3): loading,
``eos report`` and a resume name the file and the missing steps in one line."""
import pytest

from analysis.load import StudyFormatError, load
from analysis_fixtures import SyntheticTrial, write_run, write_study
from study.cli import main as eos


def _trials():
    return [SyntheticTrial("base", 1e-3, 0, steps=120), SyntheticTrial("base", 1e-4, 0, steps=120)]


def _report(path, capsys):
    capsys.readouterr()
    code = eos(["report", str(path), "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_deleted_chunk_of_a_study_is_named(tmp_path, capsys):
    study = write_study(tmp_path / "s", _trials())
    part = study / "steps" / "variant=base" / "trial=base_lr0.001_s0"
    (part / "part-000000050-000000099.parquet").unlink()
    message = (f"{part}: part-000000050-000000099.parquet is missing (steps 50–99, 50 rows, listed in "
               "_manifest.json)")
    with pytest.raises(StudyFormatError) as err:
        load(study)
    assert str(err.value) == message
    assert _report(study, capsys) == (2, [f"eos report: {message}"])


def test_a_truncated_chunk_is_named_not_a_traceback(tmp_path, capsys):
    study = write_study(tmp_path / "s", _trials())
    part = study / "steps" / "variant=base" / "trial=base_lr0.0001_s0"
    chunk = part / "part-000000100-000000119.parquet"
    chunk.write_bytes(chunk.read_bytes()[:100])
    code, err = _report(study, capsys)
    assert code == 2 and len(err) == 1
    assert err[0] == (f"eos report: {part}: part-000000100-000000119.parquet is damaged (Parquet magic bytes "
                      "not found in footer. Either the file is corrupted or this is not a parquet file.)")


def test_steps_missing_without_a_manifest_are_caught_by_steps_done(tmp_path):
    study = write_study(tmp_path / "s", _trials())
    part = study / "steps" / "variant=base" / "trial=base_lr0.001_s0"
    (part / "_manifest.json").unlink()          # a log written before manifests
    (part / "part-000000100-000000119.parquet").unlink()
    with pytest.raises(StudyFormatError) as err:
        load(study)
    assert str(err.value) == (f"{study}/trials.parquet: trial base_lr0.001_s0: steps 100–119 missing from the "
                              "step log (20 of the 120 steps done)")


def test_a_run_folder_with_a_gap_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "base_lr0.001_s0", SyntheticTrial("base", 1e-3, 0, steps=120))
    (run / "steps" / "part-000000000-000000049.parquet").unlink()
    code, err = _report(run, capsys)
    assert (code, err) == (2, [f"eos report: {run / 'steps'}: part-000000000-000000049.parquet is missing "
                               "(steps 0–49, 50 rows, listed in _manifest.json)"])


def test_a_sound_study_loads_and_its_manifests_list_every_chunk(tmp_path):
    import json
    study = write_study(tmp_path / "s", _trials())
    loaded = load(study)
    assert len(loaded.steps) == 240
    part = study / "steps" / "variant=base" / "trial=base_lr0.001_s0"
    manifest = json.loads((part / "_manifest.json").read_text())
    assert [(c["first"], c["last"], c["rows"]) for c in manifest["chunks"]] == [(0, 49, 50), (50, 99, 50),
                                                                              (100, 119, 20)]
