"""Running one trial: a RunConfig in, a run folder out.

    loop.py        train(): the training loop (one step, evaluation, checkpoints, progress) and Trainer
    probing.py     Probing: when the curvature is probed, on which frozen batch, in probe mode
    rundir.py      RunDir: the run folder (config, status, step log, checkpoints, samples),
                   the status vocabulary and trial_id, the one trial naming
    atomic.py      the one atomic write (temporary file + rename) for JSON, Parquet, checkpoints
    rng.py         every random stream of a run, as a function of (seed, step)
    steplog.py     the per-step Parquet log and its schema
    data.py        image data sets in memory and deterministic batches
    optimizers.py  GD, momentum, Adam, AdamW
    fid.py         FID / IS / KID of samples
    cli.py         `eos train`, `eos sample`
"""
