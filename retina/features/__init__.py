"""TTA feature extraction (transform.py) and feature files."""
