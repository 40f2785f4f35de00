"""The blend net: a small maxout net fitted on standardised features (per eye, optionally
with the other eye's), as the original's blend did it.  blend.py fits it (`retina.blend.fitting`)
and predict.py applies a fitted one (`retina.blend.fitted`); both import it from here.

torch is imported in the functions that need it, so that blend.py reports bad input quickly.
"""
import contextlib
import math
from collections import OrderedDict

import numpy as np
from sklearn.preprocessing import StandardScaler

from retina.core.errors import UserError
from retina.core.metrics import LEVELS
from retina.core.paths import patient_and_eye
from retina.model.config import lr_for_epoch

# {epoch: learning rate or 'stop'}; an entry {k: v} takes effect at the end of
# epoch k (epochs count from 1), as in the CNN schedules: 100 epochs in all.
SCHEDULE = {0: 5e-4, 60: 5e-5, 80: 5e-6, 90: 5e-7, 100: 'stop'}
BATCH_SIZE = 128
BALANCED_BATCH_PROBABILITY = 0.2
UNIFORM_BATCH_PROBABILITY = 0.3
L1_FIRST_LAYER = 2e-5
L2_WEIGHTS = 0.005
HIDDEN_UNITS = 32
MAXOUT_POOL = 2
_OTHER_EYE = {'left': 'right', 'right': 'left'}


def per_patient_inputs(features, names, without=()):
    """Per eye: [this eye's features, the other eye's features, 1 if right eye else 0].

    The other eye is found by name (`patient_and_eye`, the eye in any case); an eye
    whose partner is missing (or a name without an eye) uses its own features
    (`lone_eyes` names them, for the note callers print).  The names in `without`
    (ungradable photographs) are never anyone's partner: their partner is blended alone.
    """
    row_of = {patient_and_eye(name): i for i, name in enumerate(names)
              if name not in without}
    other = np.arange(len(names))
    right = np.zeros((len(names), 1), dtype=features.dtype)
    for i, name in enumerate(names):
        patient, eye = patient_and_eye(name)
        if eye:
            other[i] = row_of.get((patient, _OTHER_EYE[eye]), i)
            right[i] = eye == 'right'
    return np.hstack([features, features[other], right])


def prepare_inputs(features, names, fit_rows, per_patient):
    """Standardise with a scaler fitted on `fit_rows`; returns (inputs, scaler)."""
    scaler = StandardScaler().fit(features[fit_rows])
    scaled = scaler.transform(features).astype(np.float32, copy=False)
    return (per_patient_inputs(scaled, names) if per_patient else scaled), scaler


def build_net(n_inputs, generator=None):
    """dense 32 -> maxout 2 -> dense 32 -> maxout 2 -> dense 1, as an nn.Sequential.

    Hidden layers: ReLU, orthogonal weights with the 'relu' gain, biases 0.01;
    the output is linear (orthogonal, gain 1, bias 0).  torch is imported in
    the functions that need it, so that blend.py reports bad input quickly.
    """
    from torch import nn

    from retina.model.nets import Maxout  # the max of consecutive pairs: Lasagne's FeaturePoolLayer

    pooled = HIDDEN_UNITS // MAXOUT_POOL
    net = nn.Sequential(OrderedDict(
        hidden1=nn.Linear(n_inputs, HIDDEN_UNITS), relu1=nn.ReLU(), maxout1=Maxout(MAXOUT_POOL),
        hidden2=nn.Linear(pooled, HIDDEN_UNITS), relu2=nn.ReLU(), maxout2=Maxout(MAXOUT_POOL),
        output=nn.Linear(pooled, 1), level=nn.Flatten(0)))
    for layer in (net.hidden1, net.hidden2):
        nn.init.orthogonal_(layer.weight, gain=nn.init.calculate_gain('relu'),
                            generator=generator)
        nn.init.constant_(layer.bias, 0.01)
    nn.init.orthogonal_(net.output.weight, gain=1.0, generator=generator)
    nn.init.zeros_(net.output.bias)
    return net


def weight_penalty(net):
    """L1 on the first layer's weights plus L2 on every layer's weights (not the biases)."""
    l1 = net.hidden1.weight.abs().sum()
    l2 = sum(layer.weight.pow(2).sum() for layer in (net.hidden1, net.hidden2, net.output))
    return L1_FIRST_LAYER * l1 + L2_WEIGHTS * l2


def add_penalty_gradients(net):
    """Add the gradient of `weight_penalty` to the weights' gradients after backward().

    The same update as putting the penalty in the loss, at a third less time
    per step: the penalty stays out of the autograd graph.
    """
    import torch
    with torch.no_grad():
        for layer in (net.hidden1, net.hidden2, net.output):
            layer.weight.grad.add_(layer.weight, alpha=2 * L2_WEIGHTS)
        net.hidden1.weight.grad.add_(net.hidden1.weight.sign(), alpha=L1_FIRST_LAYER)


def balanced_probabilities(levels):
    """Sampling probability per row that makes every present level equally likely.

    On the Kaggle training set this is the original's BALANCE_WEIGHTS (the
    inverse class frequencies); computing it from the rows being fitted keeps
    the batches balanced on any data set.
    """
    counts = np.bincount(levels, minlength=len(LEVELS)).astype(np.float64)
    weights = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)[levels]
    return weights / weights.sum()


def epoch_batches(levels, rng, batch_size=BATCH_SIZE):
    """Row indices of one epoch's batches: a shuffled pass over the rows, each batch
    replaced with probability 0.2 by a class-balanced and 0.3 by a uniform random sample."""
    n = len(levels)
    order = rng.permutation(n)
    balanced = balanced_probabilities(levels)
    for start in range(0, n, batch_size):
        draw = rng.random()
        if draw < BALANCED_BATCH_PROBABILITY:
            yield rng.choice(n, size=batch_size, replace=True, p=balanced)
        elif draw < BALANCED_BATCH_PROBABILITY + UNIFORM_BATCH_PROBABILITY:
            yield rng.integers(0, n, size=batch_size)
        else:
            yield order[start:start + batch_size]


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread: the net's tensors are so small that thread start-up
    costs more than it saves (ten times slower on a busy two-core machine)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_net(inputs, levels, seed, schedule=SCHEDULE):
    """Fit the blend net on (inputs, levels) with Adam: MSE plus `weight_penalty`.

    Returns (net, the last epoch's mean training MSE)."""
    with single_thread():
        return _fit_net(inputs, levels, seed, schedule)


def _fit_net(inputs, levels, seed, schedule):
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    y = torch.from_numpy(np.asarray(levels, dtype=np.float32))
    net = build_net(x.shape[1], generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr_for_epoch(schedule, 1))
    net.train()
    mse, epoch = float('nan'), 1
    while (lr := lr_for_epoch(schedule, epoch)) != 'stop':
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss_sum, count = 0.0, 0
        for rows in epoch_batches(levels, rng):
            rows = torch.from_numpy(np.asarray(rows))
            loss = F.mse_loss(net(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            add_penalty_gradients(net)
            optimizer.step()
            loss_sum, count = loss_sum + loss.item() * len(rows), count + len(rows)
        mse = loss_sum / count
        if not math.isfinite(mse):
            raise UserError(f'the blend net diverged (MSE {mse}) in epoch {epoch}; check the '
                            f'feature files for extreme values (run transform.py again)')
        epoch += 1
    return net, mse


def net_predictions(net, inputs, chunk=8192):
    import torch
    net.eval()
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    with single_thread(), torch.no_grad():
        return torch.cat([net(x[i:i + chunk]) for i in range(0, len(x), chunk)]).numpy()
