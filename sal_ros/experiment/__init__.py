"""``sal-ros experiment``: SAL measured on a SemanticKITTI-format dataset (config/experiments/mini.yaml).

Modules: config (the experiment file), stages (pseudo-label, quality, train, evaluate: each cached), run (the
protocol: teachers x {pseudo-labels, student}, supervised references, untrained floor, data scaling), report
(results.json, table.md, PNGs), cli.
"""
