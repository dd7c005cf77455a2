"""`distill search`: an Optuna study over recipe keys, in which every trial is an ordinary stage.

The recipe's `search:` section (its grammar and checks: distill/config/search_space.py; the
guide: docs/search.md) names the space, the objectives, the budget, the sampler and the pruner.

    command.py   the command line; launch scripts for several workers
    trials.py    the search: shared teachers, trials as `student` stages, pruning, the run loop
    study.py     Optuna's storage (database or journal file), study, sampler, pruner, retries
    team.py      the processes of one worker under `accelerate launch`: the main one leads
    outputs.py   trials.md/.csv, best.yaml or pareto/, plots/, search.json; `distill report`

A search folder (--root):
    study.db                the Optuna storage (unless search.storage names another)
    teacher/ | teacher-<i>/ the fine-tuned teacher(s), trained once and shared by every trial
    teacher_cache/          the teachers' cached outputs, shared the same way
    trial-<n>/student/      trial n: an ordinary stage folder (config.yaml, metrics.json, ...)
    trials.md, trials.csv, best.yaml | pareto/, plots/, search.json
"""
