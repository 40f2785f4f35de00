"""The blend (blend.py): its small net, fitting, cut-offs, reports, the submission, a fitted
blend for predict.py."""
