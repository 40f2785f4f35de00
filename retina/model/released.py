"""The trained nets that ship with the repository (models/), by short name.

models/index.json lists them: per name, the checkpoint file, its sha256, the config it was
trained as, its model card (Markdown beside it) and a one-line summary; "default" names the
net predict.py grades with when no weights are given or trained.  A *chain* is a released
blend (blend.py --predict's file) over released nets: its entry names them (`nets`, in
order) and the one `fast` net predict.py --fast grades with alone; its `file` is the blend.  Every script that takes
weights takes a released name too (`--weights_from eyepacs-128`): `checkpoint.load` asks
`weights_path`, which checks the file against its sha256 before anything reads it.
`python -m retina.release` writes the files (see that module).

The folder is read-only to every other script: `check_not_released` refuses an output in it,
and a missing index.json is an error that says to restore the folder, not an empty one.
Outputs name the model that graded them by `identify` (its released name, found by
checksum, and its sha256).
"""
import functools
import hashlib
import json
import os
from pathlib import Path

from retina.core.errors import UserError

MODELS_DIR = Path(__file__).resolve().parents[2] / 'models'
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
            for key in ('file', 'sha256', 'card') + (('fast',) if 'nets' in entry else
                                                     ('config',)):
                if not isinstance(entry.get(key), str):
                    raise KeyError(f'{name}: {key}')
            if 'nets' in entry:
                nets = entry['nets']
                if not (isinstance(nets, list) and nets and
                        all(n in models and 'nets' not in models[n] for n in nets) and
                        entry['fast'] in nets):
                    raise KeyError(f'{name}: nets (released nets, the fast one among them)')
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


def restore_hint(folder):
    """How to get the released files of `folder` back."""
    if Path(folder).resolve() == MODELS_DIR:
        return (f'restore the released files with: git checkout -- models (in '
                f'{MODELS_DIR.parent})')
    return f'restore the released files with: git checkout -- {folder}'


def missing_index(folder=None, wanted=None):
    """The UserError for a models folder without its index.json: the released models are
    missing (a damaged clone or a deleted file), not weights still to be trained."""
    folder = Path(folder or default_folder())
    what = f'{wanted}: no such file, and ' if wanted else ''
    return UserError(f'{what}{folder / INDEX_NAME} is missing, so the released models '
                     f'({folder}) cannot be found; {restore_hint(folder)}')


def verified(name, folder=None):
    """The checkpoint file of released net `name`, after checking that it and its card are
    there and that the file's sha256 is the index's; a UserError naming the file otherwise."""
    folder = Path(folder or default_folder())
    entry = index(folder)['models'][name]
    path, card = folder / entry['file'], folder / entry['card']
    restore = restore_hint(folder)
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
        entry = index(folder)['models'][str(spec)]
        if 'nets' in entry:
            raise UserError(f'{spec} is a released chain (a blend of {", ".join(entry["nets"])}), '
                            f'not one net: grade with it by predict.py --blend {spec}, or name '
                            f'one of its nets here')
        return verified(str(spec), folder)
    if looks_like_a_name(spec) and not (Path(folder or default_folder()) / INDEX_NAME).is_file():
        raise missing_index(folder, spec)
    return path


def looks_like_a_name(spec):
    """A released model's short name rather than a path: no folder, no .pt ending."""
    text = str(spec)
    return bool(text) and '/' not in text and os.sep not in text and \
        not text.endswith(('.pt', '.pth'))


def is_chain(spec, folder=None):
    """Whether `spec` (as given to --blend) is the name of a released chain."""
    entry = index(folder)['models'].get(str(spec)) if looks_like_a_name(spec) else None
    return bool(entry and 'nets' in entry)


def chain(name, folder=None):
    """(verified blend file, [(config name, verified file) of each net, in order]) of released
    chain `name` (`default` gives its fast net)."""
    models = index(folder)['models']
    nets = [(models[n]['config'], verified(n, folder)) for n in models[name]['nets']]
    return verified(name, folder), nets


def default(folder=None):
    """(name, config name, verified file) of the default released net, or None; for a default
    chain, its fast net's config and file (`chain` gives the rest).  A models folder without
    its index is a UserError (the repository ships one: it was deleted)."""
    if not (Path(folder or default_folder()) / INDEX_NAME).is_file():
        raise missing_index(folder)
    found = index(folder)
    name = found['default']
    if not name or name not in found['models']:
        return None
    entry = found['models'][name]
    if 'nets' in entry:
        fast = entry['fast']
        return name, found['models'][fast]['config'], verified(fast, folder)
    return name, entry['config'], verified(name, folder)


def write_index(models_dir, name, entry, make_default):
    """Add or replace `name`'s entry in `models_dir`'s index.json (one atomic write); it becomes
    the default with `make_default`, or when there is none yet."""
    from retina.core import atomic
    found = index(models_dir)
    found['models'][name] = entry
    if make_default or not found['default']:
        found['default'] = name
    atomic.write_text(Path(models_dir) / INDEX_NAME,
                      json.dumps(found, indent=2, sort_keys=True) + '\n')


def folders():
    """The folders released models are read from: the repository's models/ and
    $RETINA_MODELS_DIR, resolved; no output may land in them."""
    from retina.core.paths import resolved
    return list(dict.fromkeys(resolved(f) for f in (MODELS_DIR, default_folder())))


def check_not_released(output, option):
    """Refuse an output path (`option` names it: '--output') that is a released model's file or
    lies in a released-models folder, whichever way the weights were named: writing there
    would replace a net or its card, and the checksums would then fail."""
    from retina.core.paths import resolved
    target = resolved(output)
    for folder in folders():
        if target == folder or folder in target.parents:
            raise UserError(f'{option} {output}: inside {folder}, the released models\' folder; '
                            f'write it elsewhere (that folder holds only the released files)')


def identify(path):
    """(released name or None, sha256) of a weights file: its name when it is one of the
    released files (by checksum), so that outputs can say which model graded them."""
    status = Path(path).stat()
    return _identify(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)


def encoding_of(path):
    """How the training images of the weights file `path` were stored (crop.ENCODINGS), for a
    checkpoint written before checkpoints recorded it: its released model's index entry says
    ('encoding'); 'none' for any other file."""
    name, _ = identify(path)
    if name is None:
        return 'none'
    for folder in folders():
        try:
            entry = index(folder)['models'].get(name)
        except UserError:
            continue
        if entry is not None:
            return entry.get('encoding', 'none')
    return 'none'


@functools.lru_cache(maxsize=16)
def _identify(path, size, mtime):  # each file hashed once per run while it is unchanged
    digest = sha256_of(path)
    for folder in folders():
        try:
            models = index(folder)['models']
        except UserError:
            continue
        for name, entry in models.items():
            if entry['sha256'] == digest:
                return name, digest
    return None, digest
