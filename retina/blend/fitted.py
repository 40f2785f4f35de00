"""A blend fitted by `blend.py --predict`, saved beside its submission for predict.py.

blend.py fits, per run, a StandardScaler and `--n_iter` small nets on the
training features and averages their test predictions.  This file keeps what
it takes to do the same for new photographs (predict.py --blend):

- per run, its feature files, each described by what made it: the config,
  mean or std, the TTA iterations and Halton skip, and the weights with their
  fingerprint (from transform.py's `..._source_...json`), so predict.py can
  compute the same features with the same net, and refuse other weights;
- the scaler's mean and scale and every fitted net's weights;
- whether inputs are per patient, and the cut-offs of the submission.

A fitted blend of the 512-px nets is about 1 MB per net fitted.  It is a plain
dict of tensors and values written with torch.save and read back with
`weights_only=True`.
"""
from pathlib import Path

import numpy as np

from retina.blend.net import build_net, net_predictions, per_patient_inputs
from retina.core import atomic, paths
from retina.core.errors import UserError
from retina.features.files import source_of

FORMAT = 'retina-blend-1'


def describe_file(path):
    """What made a train feature file: config, statistic, TTA iterations and skip, weights
    (config None for a file not named as transform.py names them)."""
    path = Path(path)
    parts = paths.parse_features(path)
    if parts is None or parts.split != 'train':
        # Blended all the same; predict.py says what it cannot do with it.
        return dict(file=path.name, cnf=None, stat=None, n_iter=None, skip=None, weights=None,
                    fingerprint=None)
    entry = dict(file=path.name, cnf=parts.cnf, stat=parts.stat, n_iter=parts.n_iter,
                 skip=parts.skip, weights=None, fingerprint=None)
    recorded = source_of(path) or {}  # none before the source files: matched by config name
    entry.update(weights=recorded.get('weights'), fingerprint=recorded.get('fingerprint'),
                 # transform.py's arithmetic (bf16 or fp32): predict.py computes the blend's
                 # features in it, so that they are the features the blend was fitted on
                 precision=recorded.get('precision'),
                 # the TTA sequence (augment.tta_params; unrecorded: the original's)
                 sequence=recorded.get('sequence', 'halton'))
    return entry


def tta_of(entry):
    """(n_iter, skip, sequence) of a feature file's entry: the TTA predict.py must repeat."""
    return entry['n_iter'], entry['skip'], entry.get('sequence') or 'halton'


def fitted_run(name, files, scaler, nets):
    """One run of the blend: its feature files, the fitted scaler and nets."""
    import torch
    return dict(name=str(name), files=[describe_file(f) for f in files],
                mean=torch.from_numpy(np.asarray(scaler.mean_, dtype=np.float64)),
                scale=torch.from_numpy(np.asarray(scaler.scale_, dtype=np.float64)),
                nets=[{k: v.detach().clone() for k, v in net.state_dict().items()}
                      for net in nets],
                n_inputs=int(nets[0].hidden1.in_features))


def save(path, runs, per_patient, thresholds):
    atomic.torch_save(path, dict(format=FORMAT, per_patient=bool(per_patient),
                                 thresholds=[float(t) for t in thresholds], runs=list(runs)))
    return Path(path)


def load(path):
    """A saved blend, checked (as safely as a checkpoint); every problem is a UserError naming
    the file."""
    from retina.model import checkpoint
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: no such blend file; blend.py --predict writes one beside its '
                        f'submission (data/sub_..._blend.pt)')
    state = checkpoint.read_torch_file(path, 'blend file', 'pass the _blend.pt file written '
                                       'by blend.py --predict')
    if not isinstance(state, dict) or state.get('format') != FORMAT or not state.get('runs'):
        raise UserError(f'{path}: not a blend written by blend.py --predict (it writes '
                        f'data/sub_..._blend.pt beside the submission)')
    return state


def entries(state):
    """Every feature file of every run, in order."""
    return [entry for run in state['runs'] for entry in run['files']]


def predict(state, features_of, names, without=()):
    """The blend's continuous prediction per image of `names` (the runs' nets averaged).

    `features_of(entry)` returns the (len(names), F) features of one file entry; the names in
    `without` (ungradable photographs) never feed their partner eye's per-patient blend.
    """
    import torch

    total, count = np.zeros(len(names), dtype=np.float64), 0
    for run in state['runs']:
        features = np.hstack([np.asarray(features_of(entry), dtype=np.float64)
                              for entry in run['files']])
        mean, scale = run['mean'].numpy(), run['scale'].numpy()
        if features.shape[1] != mean.shape[0]:
            raise UserError(f'blend run {run["name"]}: {features.shape[1]} features per image '
                            f'but it was fitted on {mean.shape[0]}; use the nets the blend was '
                            f'fitted with')
        inputs = ((features - mean) / scale).astype(np.float32)
        if state['per_patient']:
            inputs = per_patient_inputs(inputs, list(names), without)
        for weights in run['nets']:
            net = build_net(run['n_inputs'], torch.Generator().manual_seed(0))
            net.load_state_dict(weights)
            total += net_predictions(net, inputs)
            count += 1
    return total / count
