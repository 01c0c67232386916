"""Batch captioning: inputs (what to caption), sinks (where results go, durably), runner (the loop)."""
