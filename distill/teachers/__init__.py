"""The teacher a student learns from, as one callable `teacher(batch) -> Signals`: run online,
read from the on-disk cache (cache.py), or several teachers combined (ensemble.py);
teacher.py builds it."""
