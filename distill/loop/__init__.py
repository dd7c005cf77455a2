"""A stage, from its plan to its finished folder: `plan.plan_stage` resolves it, `folders` owns its
folder (status, lock, readers), `preflight` checks every stage first, `setup` builds it (`trim`
trims the student's vocabulary), `train.run_stage` runs it with `step.train_step`, `evaluate`
scores it and `checkpoints` saves and resumes it."""
