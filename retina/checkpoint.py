"""The one checkpoint format and its one writer and reader.

A checkpoint is a dict: model and optimizer state, epoch, best metrics, the
config name and the resolved config (so later stages rebuild the model from
the file alone).  Files are written atomically and read with
`weights_only=True`: a file carrying pickled code is refused.
"""
import pickle
from pathlib import Path

import torch

from retina import atomic, config as config_module
from retina.errors import UserError

FORMAT = 'retina-checkpoint-1'


def save(path, model, config, epoch, optimizer=None, **extra):
    state = dict(format=FORMAT, config_name=config.name, config=config.resolved(), epoch=epoch,
                 model={k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
                 optimizer=optimizer.state_dict() if optimizer is not None else None, **extra)
    atomic.torch_save(path, state)


def load(path):
    """Read a checkpoint safely; every problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: weights file not found; train first (train_nn.py --cnf ...) '
                        f'or pass --weights_from')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a file that is not weights
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        if isinstance(error, pickle.UnpicklingError) and 'Weights only load failed' in str(error):
            raise UserError(f'{path}: refused to load: the file holds pickled Python objects, '
                            f'not plain weights ({first}); only load weights you trust, '
                            f're-saved as tensors') from None
        raise UserError(f'{path}: not a readable weights file ({type(error).__name__}: {first}); '
                        f'it may be truncated or another kind of file: use a .pt file written '
                        f'by train_nn.py') from None
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise UserError(f'{path}: not a checkpoint written by train_nn.py')
    return state


def config_of(state):
    return config_module.from_resolved(state['config'])


def unwrap(model):
    """The plain model inside DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def load_matching(model, state, source):
    """Copy every parameter whose name and shape match; returns (copied, skipped) names."""
    own = unwrap(model).state_dict()
    theirs = state['model']
    copied, skipped = [], []
    for name, value in own.items():
        if name in theirs and theirs[name].shape == value.shape:
            own[name] = theirs[name]
            copied.append(name)
        else:
            found = tuple(theirs[name].shape) if name in theirs else 'absent'
            skipped.append(f'{name} {tuple(value.shape)} (in {Path(source).name}: {found})')
    if not any(name.endswith('weight') for name in copied):
        raise UserError(f'{source}: no weight matches this network (weights of '
                        f'{state.get("config_name")}); use weights of a compatible config')
    unwrap(model).load_state_dict(own)
    return copied, skipped


def load_exact(model, state, source, config_name):
    """Load weights that must fit the model exactly (inference)."""
    own = unwrap(model).state_dict()
    theirs = state['model']
    wrong = [name for name in own if name not in theirs or theirs[name].shape != own[name].shape]
    if wrong:
        raise UserError(f'{source}: weights of {state.get("config_name")} do not fit config '
                        f'{config_name} (layers {", ".join(sorted({w.split(".")[0] for w in wrong}))}'
                        f' differ); pass the weights trained with --cnf {config_name}')
    unwrap(model).load_state_dict({k: theirs[k] for k in own})
