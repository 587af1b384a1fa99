"""Studies: sweeps of trials (variant × learning rate × seed) with Ray Tune.

The sweep machinery:

    spec.py        the study spec (YAML -> typed, validated dataclasses); presets/ holds smoke, paper, optuna
    runner.py      run_study / resume_study: Ray, the Tuner, the trials table
    trainable.py   one trial: trainers.run.loop.train in a deterministic run folder, checkpoints through Tune
    search.py      grid, or Optuna TPE per (variant, seed) with a persisted journal
    early_stop.py  loss blow-up and λ₁/threshold rules that end a trial as diverged
    layout.py      the study folder (steps/ dataset, runs/, trials.parquet, study.json)
    trials.py      the trials table
    merge.py       studies run in parts -> one folder for the report
    commands.py    `eos study run|resume|merge`
"""
