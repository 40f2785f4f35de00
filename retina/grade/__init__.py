"""Grading raw photographs (predict.py) and its HTML report."""
