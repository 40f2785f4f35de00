"""Diabetic retinopathy grading with regression activation maps.

A PyTorch port of the 2015 Kaggle DR 2nd-place pipeline (team o_O) with the
RAM head of Wang & Yang.  The scripts at the top of the repository are thin
click wrappers around the modules of this package.
"""
