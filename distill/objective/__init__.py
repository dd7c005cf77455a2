"""What a stage minimises: the loss terms (losses.py: ce, kd, hidden; intermediate.py: attention
maps and MiniLM relations), their weighted sum (`Objective`) and the hooks that capture the
student's attention projections (capture.py)."""
