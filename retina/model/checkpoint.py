"""The one checkpoint format and its one writer and reader.

A checkpoint is a dict: model and optimizer state, epoch, best metrics, the
config name and the resolved config (so later stages rebuild the model from
the file alone).  Files are written atomically and read with
`weights_only=True`: a file carrying pickled code is refused.

Reading never trusts the file's size claims: torch.save never compresses, so
a compressed entry (a decompression bomb: a megabyte that inflates to
gigabytes) is refused before anything is read; tensors are memory-mapped,
not copied; and the tensors must be exactly those of the network its own
config describes (built on the `meta` device, which allocates nothing), so a
file can neither make us build a giant network nor carry extra payload.
Weights holding NaN or infinity are refused as broken.
"""
import dataclasses
import functools
import hashlib
import math
import pickle
import threading
import zipfile
from pathlib import Path

import torch

from retina.core import atomic
from retina.core.errors import UserError
from retina.core.metrics import FIXED_CUTS
from retina.model import config as config_module

FORMAT = 'retina-checkpoint-1'


def save(path, model, config, epoch, optimizer=None, **extra):
    atomic.torch_save(path, snapshot(model, config, epoch, optimizer, **extra))


def snapshot(model, config, epoch, optimizer=None, **extra):
    """The checkpoint dict of `model` (and `optimizer`) now, every tensor a CPU copy of its
    own: training may go on changing the originals while the dict is written."""
    return dict(format=FORMAT, config_name=config.name, config=config.resolved(), epoch=epoch,
                model={k: host_copy(v) for k, v in unwrap(model).state_dict().items()},
                optimizer=(host_copy(optimizer.state_dict()) if optimizer is not None
                           else None), **extra)


def host_copy(value):
    """`value` with its tensors (inside dicts and lists too) copied to the CPU, copied even
    when already there."""
    if isinstance(value, torch.Tensor):
        return value.detach().to('cpu', copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value


class BackgroundWriter:
    """Writes checkpoint dicts (`snapshot`s) to their files in a thread, in the order given.

    A 512-px net's last.pt (weights and momentum, ~60 MB) takes a second or more to reach a
    network disk: written in the training loop it stops the GPU for that long every epoch.
    The snapshot is taken in the loop (a device-to-host copy), the writing goes on beside the
    next epoch.  `wait` joins the writes in flight and raises their error, if any (a full
    disk): call it before the next writes and before the run ends or reports a file.
    """

    def __init__(self):
        self._thread, self._error = None, None

    def write(self, files):
        """Start writing `files`, a list of (path, state), after the writes in flight."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(list(files),),
                                        name='checkpoint-writer', daemon=False)
        self._thread.start()

    def _write(self, files):
        try:
            for path, state in files:
                atomic.torch_save(path, state)
        except BaseException as error:  # raised again in the training thread by wait()
            self._error = error

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load(path):
    """Read a checkpoint safely; every problem is a UserError naming the file.  `path` is what
    `resolve_weights` takes: a file, a run folder or a released model's short name (models/,
    checksum checked)."""
    from retina.model import released
    path = resolve_weights(path)
    if not path.is_file():
        shipped = released.names()
        raise UserError(f'{path}: weights file not found; train first (train_nn.py --cnf ...) '
                        f'or pass --weights_from'
                        + (f' (a file, or a released model: {", ".join(shipped)})'
                           if shipped else ''))
    state = read_torch_file(path, 'weights file', 'use a .pt file written by train_nn.py')
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise UserError(f'{path}: not a checkpoint written by train_nn.py')
    _check_contents(state, path)
    return state


def read_torch_file(path, kind, fix):
    """torch.load of a file that torch.save wrote, safely: a zip of stored entries
    (`_check_container`), plain tensors and containers only (weights_only), tensors
    memory-mapped.  Every problem is a UserError naming the file as a `kind` ('weights
    file') and ending with `fix` (what to pass instead)."""
    _check_container(path, kind, fix)
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as error:  # torch.load fails in many ways on a file of another kind
        from retina.core.errors import shorten
        first = shorten((str(error).strip().splitlines() or [type(error).__name__])[0], 120)
        if isinstance(error, pickle.UnpicklingError) and 'Weights only load failed' in str(error):
            # torch's own first lines are advice about weights_only; the line that names the
            # refused global is what the user needs
            named = [line.strip() for line in str(error).splitlines() if 'GLOBAL' in line]
            what = shorten(named[0].rstrip('.'), 160) if named else 'weights-only load failed'
            raise UserError(f'{path}: refused to load: the file holds pickled Python objects, '
                            f'not plain tensors ({what}); only load files you trust; '
                            f'{fix}') from None
        raise UserError(f'{path}: not a readable {kind} ({type(error).__name__}: {first}); it '
                        f'may be truncated or another kind of file: {fix}') from None


def _check_container(path, kind, fix):
    """Refuse what torch.save never writes: not a zip, or compressed (inflating) entries."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f'{path}: not a readable {kind} (not the zip archive torch.save '
                        f'writes); it may be truncated or another kind of file: {fix}') from None
    packed = [e.filename for e in entries
              if e.compress_type != zipfile.ZIP_STORED or e.file_size != e.compress_size]
    if packed:
        raise UserError(f'{path}: refused to load: {packed[0]} is compressed (inflating to '
                        f'{sum(e.file_size for e in entries) / 1e6:.0f} MB), which torch.save '
                        f'never writes; {fix}')


def _check_contents(state, path):
    """The state's tensors must be those of its config's network, and finite."""
    try:
        config = config_of(state)
    except Exception as error:  # absent, or not the shape Config.resolved() writes
        raise UserError(f'{path}: the checkpoint has no usable config ({type(error).__name__}: '
                        f'{error}); it was not written by train_nn.py, or is damaged: use the '
                        f'weights of a complete run') from None
    model = state.get('model')
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise UserError(f'{path}: the checkpoint holds no weights (model state); use weights '
                        f'written by train_nn.py')
    try:
        with torch.device('meta'):  # shapes only: nothing is allocated
            expected = {k: tuple(v.shape) for k, v in config.build_net().state_dict().items()}
    except Exception as error:
        raise UserError(f'{path}: its config does not describe a network ({error}); use '
                        f'weights written by train_nn.py') from None
    found = {k: tuple(v.shape) for k, v in model.items()}
    if found != expected:
        count = sum(math.prod(s) for s in found.values())
        wanted = sum(math.prod(s) for s in expected.values())
        odd = sorted(set(found) ^ set(expected)) or sorted(k for k in found
                                                           if found[k] != expected[k])
        raise UserError(f'{path}: its tensors do not match the network of its config '
                        f'{config.name} ({count} values in {len(found)} tensors, the network '
                        f'has {wanted} in {len(expected)}; first difference: {odd[0]}); the file '
                        f'is damaged or not from train_nn.py: use weights of a complete run')
    for name, value in model.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f'{path}: the weights are broken: {name} holds NaN or infinite '
                            f'values (saved by a run that diverged, or damaged); use weights of '
                            f'an earlier epoch (the best/ or epochs/ folder of the run) or train '
                            f'again')


def config_of(state):
    return config_module.from_resolved(state['config'])


def trained_config(weights):
    """The config name a checkpoint (a file or a released model's name) was trained as."""
    return load(weights)['config_name']


def config_name(cnf, weights_from):
    """The config a script loads its net as: --cnf when given, else the one its --weights_from
    (a checkpoint file or a released model's name) was trained as, so that a released name
    needs no --cnf anywhere (predict.py, ram.py, transform.py, the export)."""
    if cnf:
        return cnf
    if weights_from:
        return trained_config(weights_from)
    raise UserError('no net named: pass --weights_from WEIGHTS (a checkpoint, or a released '
                    'model such as eyepacs-256: it names its config) or --cnf CONFIG')


def level_cuts(nets, n_iter=1):
    """The cut-offs that turn the mean score of `nets` (LoadedNets) into a level, the same in
    every script: a lone net's own (fitted on its validation photographs when it was released:
    `retina.publish.release`) for its centred window, else 0.5, 1.5, 2.5, 3.5 (several nets averaged,
    or test-time augmentation, whose scores sit higher than the centred window's)."""
    nets = list(nets)
    own = nets[0].spec.cuts if len(nets) == 1 else None
    if own and n_iter == 1:
        return tuple(own)
    return FIXED_CUTS


def describe_cuts(cuts):
    """'0.500 1.500 2.500 3.500 (fixed)' or '... (the net\'s own)': what a script prints."""
    own = tuple(cuts) != tuple(FIXED_CUTS)
    return ' '.join(f'{c:.3f}' for c in cuts) + (" (the net's own)" if own else ' (fixed)')


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
    wrong += [name for name in theirs if name not in own]
    if wrong:
        raise UserError(f'{source}: weights of {state.get("config_name")} do not fit config '
                        f'{config_name} (layers {", ".join(sorted({w.split(".")[0] for w in wrong}))}'
                        f' differ); pass the weights trained with --cnf {config_name}')
    unwrap(model).load_state_dict({k: theirs[k] for k in own})


# ---------------------------------------------------------------- a trained net, loaded

SCORING_PRECISIONS = ('fp32', 'bf16')


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a net's input and output mean, read from its checkpoint alone: every stage that
    feeds it (`retina.model.scoring`) prepares images from this value and nothing else, as
    torchvision's `weights.transforms()` or timm's resolved data config do.

    `size` is the converted image side S its `window` (h, w) is cut from (convert.py
    --crop_size); `preprocessing` the look of its training images (convert.py --enhance);
    `constants` the `augment.PixelConstants` it was trained with; `precision` the arithmetic
    its scores (and cut-offs) are defined in, 'fp32' unless a caller asks otherwise; `cuts`
    its own level cut-offs for the centred window (a released net's, fitted on its
    validation photographs), or None; `encoding` how its training images were stored
    (`crop.ENCODINGS`: 'jpeg97' for convert.py --extension jpeg, 'none' for lossless files), which
    predict.py repeats on the images it converts in memory (`crop.as_stored`)."""
    window: tuple
    size: int
    preprocessing: str
    constants: object
    precision: str = 'fp32'
    cuts: tuple = None
    encoding: str = 'none'

    def __post_init__(self):
        if self.constants is None:
            raise ValueError('an InputSpec needs the pixel constants the net was trained with '
                             '(augment.constants_for(cnf) of its checkpoint\'s config)')
        if self.precision not in SCORING_PRECISIONS:
            raise ValueError(f'precision must be one of {", ".join(SCORING_PRECISIONS)}, '
                             f'not {self.precision!r}')

    @classmethod
    def of_config(cls, config, preprocessing='none', cuts=None, window=None, encoding='none'):
        """The spec of a net of `config` (a net being trained, or a checkpoint's own resolved
        config): its window [or `window`], the converted size, its pixel constants."""
        from retina.data.cache import converted_size
        from retina.model.augment import constants_for
        window = tuple(int(v) for v in (window or config.input_size))
        return cls(window=window, size=converted_size(window), preprocessing=preprocessing,
                   constants=constants_for(config.cnf),
                   cuts=tuple(float(c) for c in cuts) if cuts else None, encoding=encoding)

    @classmethod
    def of_state(cls, state, path='the checkpoint', window=None):
        """The spec a checkpoint (`load`'s dict) describes: its own config's window [or
        `window`: the net it is loaded as] and constants, the look it records, its cut-offs if
        it carries them."""
        from retina.data import preprocess
        preprocessing = state.get('preprocessing', 'none')
        if preprocessing not in preprocess.PREPROCESSING:
            raise UserError(f'{path}: trained on images preprocessed with {preprocessing!r}, '
                            f'which this version does not know '
                            f'({", ".join(preprocess.PREPROCESSING)})')
        from retina.data.crop import ENCODINGS
        encoding = state.get('encoding', 'none')
        if encoding not in ENCODINGS:
            raise UserError(f'{path}: trained on images stored as {encoding!r}, which this '
                            f'version does not know ({", ".join(ENCODINGS)})')
        return cls.of_config(config_of(state), preprocessing, state.get('thresholds'),
                             window, encoding)

    def as_dict(self):
        """Plain values (JSON, a checkpoint entry); `from_dict` reads them back."""
        return dict(window=list(self.window), size=self.size, preprocessing=self.preprocessing,
                    constants=dataclasses.asdict(self.constants), precision=self.precision,
                    cuts=list(self.cuts) if self.cuts else None, encoding=self.encoding)

    @classmethod
    def from_dict(cls, values):
        from retina.model.augment import constants_for
        constants = values['constants']
        return cls(window=tuple(values['window']), size=int(values['size']),
                   preprocessing=values['preprocessing'], constants=constants_for(constants),
                   precision=values['precision'],
                   cuts=tuple(float(c) for c in values['cuts']) if values.get('cuts') else None,
                   encoding=values.get('encoding', 'none'))


@dataclasses.dataclass(frozen=True)
class LoadedNet:
    """A trained net as every stage after training uses it (transform.py, ram.py, predict.py,
    the ONNX export, the release): the module and its `InputSpec`, what its checkpoint says
    about its input and output.  Nothing is read off the module: a stage that needs the pixel
    constants, the look of the training images or the cut-offs asks `spec`, so none can fall
    back to a default by a typo."""
    config: object          # the config the net was built from (its run's own, or the named one)
    net: torch.nn.Module    # in eval mode, on the device it was loaded to
    weights: Path           # the file it came from
    spec: InputSpec         # its input (window, converted size, look, constants) and cut-offs
    state: dict             # the checkpoint's other entries (epoch, feature_stats, thresholds...)
    encoding_known: bool = True  # False: a file written before checkpoints recorded it ('none')

    @property
    def name(self):
        return self.config.name

    @property
    def trained_as(self):
        """The config name the weights were trained under."""
        return self.state.get('config_name')

    @property
    def preprocessing(self):
        """How its training images were prepared (convert.py --enhance)."""
        return self.spec.preprocessing

    @property
    def constants(self):
        """augment.PixelConstants: the mean, std and colour PCA it trained with."""
        return self.spec.constants

    @property
    def input_size(self):
        return tuple(self.spec.window)

    @property
    def hold_out(self):
        """The test split the net was trained with (train_nn.py --hold_out), or None."""
        return self.state.get('config', {}).get('cnf', {}).get('hold_out')

    @functools.cached_property
    def fingerprint(self):
        return weights_fingerprint(self.net)

    def to(self, device):
        """The same net moved to `device` (a new value; the module moves in place)."""
        return dataclasses.replace(self, net=self.net.to(device))


def resolve_weights(weights_from=None, config_name=None):
    """The weights file of `weights_from`: a released model's short name (models/, checksum
    checked), a checkpoint file, or a run folder (its best-kappa weights); without it, the
    best-kappa weights of `config_name` (weights/CNF/weights.pt).  The one resolver every
    script uses."""
    from retina.core import paths
    from retina.model import released
    if weights_from:
        path = Path(weights_from)
        if path.is_dir():  # a run folder: weights/CNF/ or a --run_dir
            return paths.best_kappa_in(path)
        return released.weights_path(weights_from)
    if not config_name:
        raise UserError('no weights named: pass --weights_from WEIGHTS (a checkpoint, a run '
                        'folder or a released model such as eyepacs-256) or --cnf CONFIG')
    return paths.best_kappa_weights(config_name)


def load_net(config, weights_from=None, device='cpu'):
    """`LoadedNet` of the checkpoint `weights_from` (`resolve_weights`: a released model's
    name, a file, a run folder; default: `config`'s best-kappa weights) for `config` (a
    Config, or its name or path), in eval mode on `device`.

    The net is rebuilt from the checkpoint's own resolved config when it was trained under
    `config`'s name, so weights stay usable after the config module is edited; weights of
    another config must fit this one's layers exactly.  Its input spec (pixel constants,
    look, cut-offs) is the one it was trained with, whatever name it is loaded under: the
    named config's constants would standardise the images unlike training.
    """
    from retina.model import released
    if isinstance(config, (str, Path)):
        config = config_module.load(config)
    weights_path = resolve_weights(weights_from, config.name)
    state = load(weights_path)
    own = config_of(state)
    built = own if state.get('config_name') == config.name else config
    model = build_uninitialised(built)
    load_exact(model, state, weights_path, config.name)
    encoding_known = 'encoding' in state or released.identify(weights_path)[0] is not None
    if 'encoding' not in state:  # written before checkpoints said: a released model's index does
        state['encoding'] = released.encoding_of(weights_path)
    spec = InputSpec.of_state(state, weights_path, window=built.input_size)
    return LoadedNet(config=built, net=model.to(device).eval(), weights=Path(weights_path),
                     spec=spec,
                     state={k: v for k, v in state.items() if k not in ('model', 'optimizer')},
                     encoding_known=encoding_known)


def build_uninitialised(config):
    """The config's net with uninitialised weights, for loading a checkpoint into.

    Built on the meta device and then given (empty) storage: the orthogonal
    initialisation of a 512-px net takes seconds of QR decompositions that
    loading the weights throws away.  Every parameter and buffer must then come
    from the checkpoint, which `load_exact` checks; a net with a buffer that
    checkpoints do not hold is built the ordinary way.
    """
    with torch.device('meta'):
        model = config.build_net()
    saved = set(model.state_dict())
    if not all(name in saved for name, _ in model.named_buffers()):
        return config.build_net()
    return model.to_empty(device='cpu')


def weights_fingerprint(model):
    """A short hash of the model's parameters and buffers: equal weights, equal fingerprint."""
    digest = hashlib.sha256()
    for name, value in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
