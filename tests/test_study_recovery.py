"""What a study's driver repairs before it starts, without Ray: Tune state
cut short by a kill or a full disk is set aside (issue 17.4), temporaries of
interrupted writes are removed (issue 17.9)."""
import json


def test_damaged_tune_state_is_set_aside_and_a_whole_one_is_left_alone(tmp_path):
    import pickle

    from study.layout import StudyLayout
    from study.runner import set_aside_damaged_tune_state

    layout = StudyLayout(tmp_path)
    layout.tune.mkdir()
    (layout.tune / "experiment_state-2026-12-02_07-00-00.json").write_text(json.dumps({"trial_data": []}))
    (layout.tune / "basic-variant-state-2026-12-02_07-00-00.json").write_bytes(pickle.dumps({"x": 1}))
    (layout.tune / "tuner.pkl").write_bytes(pickle.dumps({"y": 2}))
    assert set_aside_damaged_tune_state(layout) == []
    assert sorted(p.name for p in layout.tune.iterdir())[0] == "basic-variant-state-2026-12-02_07-00-00.json"

    (layout.tune / "experiment_state-2026-12-02_07-00-00.json").write_text('{"trial_da')   # cut mid-write
    damaged = set_aside_damaged_tune_state(layout)
    assert [p.name for p in damaged] == ["experiment_state-2026-12-02_07-00-00.json"]
    assert sorted(p.name for p in layout.tune.iterdir()) == [
        ".basic-variant-state-2026-12-02_07-00-00.json.damaged", ".experiment_state-2026-12-02_07-00-00.json.damaged",
        ".tuner.pkl.damaged"]   # nothing of that experiment is restored


def test_stale_temporaries_of_a_study_are_removed(tmp_path):
    from study.layout import StudyLayout

    layout = StudyLayout(tmp_path)
    run = layout.prepare_run_dir("base", "base_lr0.001_s0")
    for folder in (run.checkpoint_dir, run.samples):
        folder.mkdir(parents=True, exist_ok=True)
    stale = [tmp_path / ".study.json.tmp-1", run.path / ".config.json.tmp-2",
             run.checkpoint_dir / ".ckpt-000000004.pt.tmp-3", run.samples / ".step-000000004.png.tmp-4",
             run.steps / ".part-000000000-000000003.parquet.tmp-5"]
    for p in stale:
        p.write_bytes(b"half")
    (run.path / ".tune-checkpoint-abc").mkdir()
    keep = run.checkpoint_dir / "ckpt-000000002.pt"
    keep.write_bytes(b"whole")
    assert layout.remove_stale_temporaries() == 6
    assert not any(p.exists() for p in stale) and not (run.path / ".tune-checkpoint-abc").exists()
    assert keep.is_file()
