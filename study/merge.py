"""``eos study merge OUT PART [PART ...]``: one study folder for the report
from studies run in parts.

A sweep too long for one session or machine (the ``paper`` preset on a GPU
whose calls are limited in time) runs as several studies, each a subset of
its trials, e.g. ``--name paper-a --set 'study.variants=[base,edm]'``.
Merging copies each part's step dataset, run folders (without their
checkpoints) and trials table into ``OUT``, which ``eos report OUT`` reads
like any study::

    OUT/trials.parquet     the parts' rows, one per trial (a ``part`` column names the part)
    OUT/steps/...          every part's partitions, copied
    OUT/runs/<trial_id>/   config.json, status.json, samples/ and the steps link; no checkpoints
    OUT/merged.json        which parts, and each part's resolved spec (study.json)

A merged folder is for reading: it has no ``study.json``, so ``eos study
resume`` refuses it; resume a part in its own folder and merge again.
Refused, in one line: a part that is not a finished-writing study folder
(no ``trials.parquet`` or ``steps/``), a part whose driver still runs
(``.driver.lock``), a trial in two parts, and an ``OUT`` that exists and is
not empty (unless ``--replace`` and it is itself a merged folder).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import pandas as pd

from study.layout import StudyLayout
from trainers.run.atomic import write_json_atomic


class MergeError(ValueError):
    """A part or the output cannot be merged; the message names it."""


MERGED_JSON = "merged.json"


def _check_part(path: Path) -> StudyLayout:
    layout = StudyLayout(path)
    if not path.is_dir():
        raise MergeError(f"{path}: no such study folder")
    if not layout.trials_table.is_file() or not layout.steps.is_dir():
        raise MergeError(f"{path}: not a study folder with trials.parquet and steps/ (a study writes its "
                         f"trials table when its driver ends; run 'eos study resume {path}' first)")
    if (path / ".driver.lock").exists():
        raise MergeError(f"{path}: a driver holds this study (.driver.lock): merge it after it ends")
    return layout


def merge_studies(out: str | os.PathLike, parts: Sequence[str | os.PathLike], *, replace: bool = False) -> pd.DataFrame:
    """Merge the study folders ``parts`` into ``out``; returns the merged trials table."""
    out = Path(out)
    paths = [Path(p) for p in parts]
    if len(paths) < 1:
        raise MergeError("name at least one study folder to merge")
    if len({p.resolve() for p in paths}) != len(paths):
        raise MergeError("a study folder is named twice")
    if out.resolve() in {p.resolve() for p in paths}:
        raise MergeError(f"{out}: the output cannot be one of the parts")
    layouts = [_check_part(p) for p in paths]
    if out.exists() and any(out.iterdir()):
        if not (replace and (out / MERGED_JSON).is_file()):
            raise MergeError(f"{out}: exists and is not empty (--replace overwrites an earlier merge)")
        shutil.rmtree(out)

    tables, owner = [], {}
    for layout in layouts:
        trials = pd.read_parquet(layout.trials_table)
        if "trial_id" not in trials.columns:
            raise MergeError(f"{layout.trials_table}: has no trial_id column")
        for trial in trials["trial_id"].astype(str):
            if trial in owner:
                raise MergeError(f"trial {trial} is in two parts: {owner[trial]} and {layout.root}")
            owner[trial] = layout.root
        tables.append(trials.assign(part=layout.root.name))

    tmp = out.with_name(f".{out.name}.merging")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    target = StudyLayout(tmp)
    for layout, trials in zip(layouts, tables):
        for variant_dir in sorted(layout.steps.glob("variant=*")):
            for trial_dir in sorted(variant_dir.glob("trial=*")):
                shutil.copytree(trial_dir, target.steps / variant_dir.name / trial_dir.name)
        if layout.runs.is_dir():
            for run in sorted(layout.runs.iterdir()):
                if run.is_dir():
                    shutil.copytree(run, target.runs / run.name, symlinks=True,   # the steps link stays relative
                                    ignore=lambda d, names, run=run: ["checkpoints"] if Path(d) == run else [])
    merged = pd.concat(tables, ignore_index=True)
    merged.to_parquet(target.trials_table, index=False)
    record = {"format": 1, "parts": [
        {"name": layout.root.name, "path": str(layout.root.resolve()), "trials": len(trials),
         "spec": (json.loads(layout.study_json.read_text()).get("spec") if layout.study_json.is_file() else None)}
        for layout, trials in zip(layouts, tables)]}
    write_json_atomic(tmp / MERGED_JSON, record)
    if out.exists():        # empty (checked above)
        out.rmdir()
    tmp.rename(out)         # the merged folder appears whole or not at all
    return merged
