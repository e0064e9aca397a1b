"""The steps of a run, one module per phase (`--until`): curated, models, index, tokens.

Each step is a function `step_<name>(ctx: RunContext) -> (counters, info)` that reads what
earlier steps wrote under OUT, writes its own outputs there, and runs its Beam graph (if it
has one) through `pipeline.runner.run_beam`. pipeline/run.py lists them in order (STEPS) and
owns resume and the run record; docs/architecture.md says how to add one.
"""
