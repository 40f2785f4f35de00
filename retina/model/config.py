"""Loading config modules by path or name, checking their keys, and resolving them.

A config module in `configs/` exposes a `cnf` dict and a `layers` list; its
name is its file name (`c_512_5x5_32_ram`).  `load` accepts
`configs/c_128_5x5_32.py`, `c_128_5x5_32` or `configs.c_128_5x5_32`.
"""
import difflib
import importlib.util
import json
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from retina.core.errors import UserError
from retina.data.stats import DESCRIPTIONS as PIXEL_CONSTANT_KEYS, check_constants

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {
    'w': 'input width in pixels', 'h': 'input height in pixels',
    'train_dir': 'folder of converted training images', 'test_dir': 'folder of converted test images',
    'labels': 'labels CSV (image,level)', 'batch_size_train': 'training batch size',
    'batch_size_test': 'batch size for validation and features',
    'balance_ratio': 'decay of the class-balance weights per epoch',
    'aug_params': 'augmentation ranges', 'sigma': 'colour noise sigma',
    'schedule': '{epoch: learning rate or "stop"}', 'momentum': 'Nesterov momentum',
    'weight_decay': 'L2 factor on weights (Lasagne convention, λ·Σw²)',
}
# Keys a config may carry or leave out (code reads them with cnf.get and a default): a new
# setting goes here, so that the configs and checkpoints written before it stay valid.
OPTIONAL_KEYS = {
    # A data set's own mean, std, colour PCA and balance weights (python -m retina.stats);
    # without them: the Kaggle constants.
    **PIXEL_CONSTANT_KEYS,
    # train_nn.py --hold_out: the fraction of patients kept out as a test split (data.held_out)
    'hold_out': 'fraction of the patients held out of training as a test split (0..0.5)',
    # retina/data/jpeg.py: JPEG re-encoding of training images; without it: none
    'jpeg': "JPEG re-encoding in training: {'probability': p, 'quality': (low, high)"
            "[, 'consistency': w]}",
}
AUG_KEYS = ('zoom_range', 'rotation_range', 'shear_range', 'translation_range', 'do_flip',
            'allow_stretch')


@dataclass
class Config:
    name: str
    cnf: dict
    layers: list
    path: Path

    @property
    def input_size(self):
        return (self.cnf['h'], self.cnf['w'])

    def build_net(self):
        from retina.model.nets import build_net
        try:
            return build_net(self.layers, self.input_size)
        except ValueError as error:  # the layer table does not fit the input size
            raise UserError(f'{self.path}: {error}; fix the config\'s layers or w/h') from None

    def resolved(self):
        """A JSON-able copy of everything that defines the run."""
        return to_jsonable(dict(name=self.name, path=str(self.path), cnf=self.cnf,
                                layers=self.layers))


def lr_for_epoch(schedule, epoch):
    """The learning rate of `epoch` (from 1) in a {epoch: lr or 'stop'} schedule, or 'stop'.

    An entry {k: v} takes effect at the end of epoch k, as in the original.
    """
    return schedule[max(k for k in schedule if k < epoch) if epoch > 0 else 0]


def available_configs():
    folders = [Path('configs'), REPO_ROOT / 'configs']
    return sorted({p.stem for folder in folders if folder.is_dir()
                   for p in folder.glob('c_*.py')})


def find_config_file(spec):
    spec = str(spec)
    candidates = [Path(spec)]
    if spec.endswith('.py'):  # a path: also relative to the repository (run from elsewhere)
        candidates += [REPO_ROOT / spec, REPO_ROOT / 'configs' / Path(spec).name]
    else:
        stem = spec.split('.')[-1] if spec.startswith('configs.') else Path(spec).name
        candidates += [Path('configs') / f'{stem}.py', REPO_ROOT / 'configs' / f'{stem}.py']
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    stem = Path(spec).stem.split('.')[-1]
    known = available_configs()
    close = difflib.get_close_matches(stem, known, n=1)
    hint = f'did you mean {close[0]}? ' if close else ''
    raise UserError(f'config {spec} not found; {hint}available: {", ".join(known)}')


# Modules a config written for the flat package may import, and where they are now.
MOVED_MODULES = {'retina.nets': 'retina.model.nets', 'retina.config': 'retina.model.config',
                 'retina.augment': 'retina.model.augment', 'retina.data': 'retina.data.labels',
                 'retina.stats': 'retina.data.stats'}


def _import_config(path):
    name = f'configs.{path.stem}'
    root = str(path.resolve().parent.parent)
    for entry in (root, str(REPO_ROOT)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        if error.name not in MOVED_MODULES:
            raise UserError(f'{path}: the config failed to load ({error})') from None
        raise UserError(f'{path}: {error.name} moved to {MOVED_MODULES[error.name]} (the package '
                        f'is laid out by stage: docs/layout.md); change the config\'s import')\
            from None
    except SyntaxError as error:
        raise UserError(f'{error.filename or path}, line {error.lineno}: syntax error in the '
                        f'config ({error.msg}); fix the file') from None
    except Exception as error:  # a config is user code: report where it broke
        frame = traceback.extract_tb(error.__traceback__)[-1]
        raise UserError(f'{frame.filename}, line {frame.lineno}: the config failed to load '
                        f'({type(error).__name__}: {error})') from None
    return module


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# (keys, test, what the value must be)
_VALUE_RULES = [
    (('w', 'h', 'batch_size_train', 'batch_size_test'),
     lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, 'a positive integer'),
    (('train_dir', 'test_dir', 'labels'), lambda v: isinstance(v, (str, Path)), 'a path'),
    (('sigma', 'weight_decay'), lambda v: _is_number(v) and v >= 0, 'a number ≥ 0'),
    (('balance_ratio', 'momentum'), lambda v: _is_number(v) and 0 <= v <= 1,
     'a number from 0 to 1'),
]


def _check_values(cnf, path):
    for keys, test, what in _VALUE_RULES:
        for key in keys:
            if not test(cnf[key]):
                raise UserError(f'{path}: {key}={cnf[key]!r}; it must be {what}')
    for key in ('zoom_range', 'rotation_range', 'shear_range', 'translation_range'):
        value = cnf['aug_params'][key]
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(_is_number(v) for v in value) and value[0] <= value[1]):
            raise UserError(f'{path}: aug_params {key}={value!r}; it must be (low, high)')
    if min(cnf['aug_params']['zoom_range']) <= 0:
        raise UserError(f'{path}: aug_params zoom_range must be positive')
    if 'jpeg' in cnf:
        from retina.data.jpeg import check
        problem = check(cnf['jpeg'], path)
        if problem:
            raise UserError(problem)


def check_cnf(cnf, path):
    allowed = {**REQUIRED_KEYS, **OPTIONAL_KEYS}
    unknown = [k for k in cnf if k not in allowed]
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise UserError(f'{path}: unknown config key {key!r}; {hint}valid keys: '
                        f'{", ".join(allowed)}')
    missing = [k for k in REQUIRED_KEYS if k not in cnf]
    if missing:
        raise UserError(f'{path}: config key(s) missing: {", ".join(missing)} '
                        f'({"; ".join(REQUIRED_KEYS[k] for k in missing)})')
    if not isinstance(cnf['aug_params'], dict):
        raise UserError(f'{path}: aug_params must be a dict with the keys {", ".join(AUG_KEYS)}'
                        f' (found {type(cnf["aug_params"]).__name__})')
    bad_aug = [k for k in cnf['aug_params'] if k not in AUG_KEYS]
    if bad_aug or any(k not in cnf['aug_params'] for k in AUG_KEYS):
        raise UserError(f'{path}: aug_params must have exactly the keys {", ".join(AUG_KEYS)}'
                        f' (found {", ".join(cnf["aug_params"])})')
    _check_values(cnf, path)
    cnf.update(check_constants(cnf, path))  # as plain lists: the resolved config is JSON
    check_schedule(cnf['schedule'], path)


def parse_schedule(text):
    """'0:0.001,60:0.0001,81:stop' as {0: 0.001, 60: 0.0001, 81: 'stop'}, checked."""
    schedule = {}
    for item in text.replace(' ', '').split(','):
        epoch, _, value = item.partition(':')
        try:
            schedule[int(epoch)] = value if value == 'stop' else float(value)
        except ValueError:
            raise UserError(f'--schedule {text!r}: {item!r} is not EPOCH:RATE or EPOCH:stop; '
                            f'write e.g. 0:0.001,60:0.0001,81:stop') from None
    check_schedule(schedule, '--schedule')
    return schedule


def check_schedule(schedule, path):
    """A schedule starts at epoch 0 with a rate, has positive rates and ends with 'stop'."""
    if not isinstance(schedule, dict) or 0 not in schedule or schedule[0] == 'stop':
        raise UserError(f'{path}: schedule must be a dict {{epoch: lr or "stop"}} starting at '
                        f'epoch 0 with a learning rate')
    for epoch, value in schedule.items():
        if epoch < 0 or not (value == 'stop' or (_is_number(value) and value > 0)):
            raise UserError(f'{path}: schedule entry {epoch}: {value!r}; each entry must be '
                            f'epoch (≥ 0): a positive learning rate or \'stop\'')
    if 'stop' not in schedule.values():
        raise UserError(f'{path}: the schedule has no \'stop\' entry, so training would never '
                        f'end; add one, e.g. {max(schedule) + 1}: \'stop\'')


def check_layer_names(layers, path):
    """Every layer needs a name of its own: weights, transfers and heat maps go by it."""
    seen = set()
    for number, (kind, options) in enumerate(layers, start=1):
        name = options.get('name')
        if not isinstance(name, str) or not name:
            raise UserError(f'{path}: layer {number} ({kind!r}, {options}) has no name; give '
                            f'every layer a unique name=\'...\' (e.g. name=\'conv{number}\')')
        if name in seen:
            raise UserError(f'{path}: two layers are named {name!r}; names must be unique')
        seen.add(name)


def load(spec):
    """Load and check a config module; returns a `Config`."""
    path = find_config_file(spec)
    module = _import_config(path)
    for attribute in ('cnf', 'layers'):
        if not hasattr(module, attribute):
            raise UserError(f'{path}: a config module must define `{attribute}`')
    if not isinstance(module.cnf, dict):
        raise UserError(f'{path}: cnf must be a dict of settings, found '
                        f'{type(module.cnf).__name__}; write cnf = dict(w=..., h=..., ...)')
    if not (isinstance(module.layers, (list, tuple)) and module.layers
            and all(isinstance(layer, (list, tuple)) and len(layer) == 2
                    and isinstance(layer[0], str) and isinstance(layer[1], dict)
                    for layer in module.layers)):
        raise UserError(f'{path}: layers must be a non-empty list of (kind, options dict) pairs, '
                        f'like (\'conv\', dict(filters=32, size=5)); found '
                        f'{type(module.layers).__name__} {str(module.layers)[:60]}')
    check_layer_names(module.layers, path)
    cnf = dict(module.cnf)
    schedule = cnf.get('schedule')
    if isinstance(schedule, dict):
        try:
            cnf['schedule'] = {int(k): v for k, v in schedule.items()}
        except (TypeError, ValueError):
            raise UserError(f'{path}: schedule keys must be epoch numbers, not '
                            f'{", ".join(repr(k) for k in schedule)}') from None
    check_cnf(cnf, path)
    return Config(name=path.stem, cnf=cnf, layers=list(module.layers), path=path)


def from_resolved(resolved):
    """Rebuild a `Config` from `Config.resolved()` (as stored in checkpoints)."""
    cnf = dict(resolved['cnf'])
    cnf['schedule'] = {int(k): v for k, v in cnf['schedule'].items()}
    layers = [(kind, dict(opt)) for kind, opt in resolved['layers']]
    return Config(name=resolved['name'], cnf=cnf, layers=layers, path=Path(resolved['path']))


def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def dumps(config):
    return json.dumps(config.resolved(), indent=2)
