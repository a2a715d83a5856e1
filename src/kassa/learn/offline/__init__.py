"""Batch learning: logged-decision datasets, training, off-policy estimators, `kassa evaluate` and its reports."""
