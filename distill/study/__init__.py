"""Study tooling on top of the library: the study's published tables, `distill report`,
`distill grid`, `distill search` and the closing summary table of `distill run`.

These modules read only what stages write (`metrics.json`, `config.yaml`) and launch stages
through `distill.loop.train.run_stage`; nothing in the library imports them.
"""
