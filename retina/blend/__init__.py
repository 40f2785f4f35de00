"""The blend (blend.py): the run (blending), its feature files (files), its small net (net),
fitting and the fit_on policy (fitting), reports, the submission, a fitted blend for predict.py
(fitted)."""
