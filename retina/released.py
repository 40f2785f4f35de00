"""The trained nets that ship with the repository (models/), by short name.

models/index.json lists them: per name, the checkpoint file, its sha256, the config it was
trained as, its model card (Markdown beside it) and a one-line summary; "default" names the
net predict.py grades with when no weights are given or trained.  Every script that takes
weights takes a released name too (`--weights_from eyepacs-128`): `checkpoint.load` asks
`weights_path`, which checks the file against its sha256 before anything reads it.
`python -m retina.release` writes the files (see that module).
"""
import hashlib
import json
import os
from pathlib import Path

from retina.errors import UserError

MODELS_DIR = Path(__file__).resolve().parent.parent / 'models'
INDEX_NAME = 'index.json'
MODELS_DIR_VARIABLE = 'RETINA_MODELS_DIR'  # another folder of released models (tests, mirrors)


def default_folder():
    """$RETINA_MODELS_DIR if set, else the repository's models/."""
    return Path(os.environ.get(MODELS_DIR_VARIABLE) or MODELS_DIR)


def index(folder=None):
    """{'default': name or None, 'models': {name: entry}} of `folder` [default: the
    repository's models/]; an absent index is an empty one, a broken one a UserError."""
    path = Path(folder or default_folder()) / INDEX_NAME
    if not path.is_file():
        return dict(default=None, models={})
    try:
        found = json.loads(path.read_text())
        models = found['models']
        if not isinstance(models, dict):
            raise TypeError('models is not a mapping')
        for name, entry in models.items():
            for key in ('file', 'sha256', 'config', 'card'):
                if not isinstance(entry.get(key), str):
                    raise KeyError(f'{name}: {key}')
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f'{path}: not a released-models index ({type(error).__name__}: '
                        f'{error}); restore it with: git checkout -- {path}') from None
    return dict(default=found.get('default'), models=models)


def names(folder=None):
    return sorted(index(folder)['models'])


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def verified(name, folder=None):
    """The checkpoint file of released net `name`, after checking that it and its card are
    there and that the file's sha256 is the index's; a UserError naming the file otherwise."""
    folder = Path(folder or default_folder())
    entry = index(folder)['models'][name]
    path, card = folder / entry['file'], folder / entry['card']
    restore = f'restore the released files with: git checkout -- {folder}'
    if not path.is_file():
        raise UserError(f'{path}: the weights of released model {name} are missing; {restore}')
    if not card.is_file():
        raise UserError(f'{card}: the model card of released model {name} is missing; '
                        f'{restore}')
    found = sha256_of(path)
    if found != entry['sha256']:
        raise UserError(f'{path}: fails its checksum (sha256 {found[:16]}…, the index says '
                        f'{entry["sha256"][:16]}…): damaged or replaced; {restore} (or '
                        f'rebuild it with python -m retina.release)')
    return path


def weights_path(spec, folder=None):
    """`spec` as given to --weights_from: an existing file is itself; a released name (e.g.
    eyepacs-128) is its verified file; anything else comes back as a Path, for the caller's
    own 'not found' error."""
    path = Path(spec)
    if path.is_file():
        return path
    if str(spec) in index(folder)['models']:
        return verified(str(spec), folder)
    return path


def default(folder=None):
    """(name, config name, verified file) of the default released net, or None."""
    found = index(folder)
    name = found['default']
    if not name or name not in found['models']:
        return None
    return name, found['models'][name]['config'], verified(name, folder)
