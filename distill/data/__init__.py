"""From files and Hub datasets to batches: reading splits (read.py) in every format (formats.py),
label names (labels.py), the words of raw rows (rows.py), features and loaders (features.py,
sampling.py), and the student's extra rows: transfer sets (transfer.py) and augmented copies
(augment.py)."""
