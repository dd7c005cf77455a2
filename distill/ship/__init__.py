"""A trained student made ready for users: the exported folder with ONNX/int8 files checked by
the parity gate (export.py, onnx.py), its model card (card.py, card_template.md, evidence.py) and
the upload to the Hub (hub.py)."""
