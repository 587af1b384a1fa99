"""Analysis of edge-of-stability studies.

* :mod:`analysis.load` — a study folder or a run folder → pandas (:class:`analysis.load.Study`);
* :mod:`analysis.metrics` — EoS onset, time near the threshold, peak ratio, sharpening rate,
  divergence, final loss and FID per trial; means and confidence bands over seeds;
* :mod:`analysis.plots` — seaborn figures (PNG and SVG);
* :mod:`analysis.report` — ``eos report``: self-contained HTML and a Markdown summary;
* :mod:`trainers.run.fid` — FID / IS / KID through torch-fidelity with a pluggable feature extractor;
* :mod:`analysis.cli` — the ``report`` subcommand; ``notebooks/eos_curves.ipynb`` — the figures interactively.
"""
