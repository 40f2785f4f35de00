"""One option vocabulary: the click options that several scripts take, each defined once.

An idea has one name, one help text and one range in every script that takes it
(convert.py, train_nn.py, transform.py, blend.py, ram.py, predict.py and the
`python -m retina.NAME` entry points).  Each function returns a click decorator.  The
names are the original solution's (`--directory`, `--convert_directory`, `--cnf`,
`--n_iter`, `--train_dir`, `--weights_from`, `--crop_size`, ...); where our own scripts
came to call an idea otherwise, the other name is an alias of the same option, so both
work (the table in docs/reference.md, "Shared options").  A help text is a shared stem
(the module's *_HELP constants, which tests/test_options.py looks for in every --help)
followed by what the option does in that script.

Without torch, so that the scripts' --help stays quick.
"""
import click

from retina.core.precision import PRECISIONS

CONTEXT_SETTINGS = {'help_option_names': ['-h', '--help']}
MAX_TTA_ITERATIONS = 10_000  # transform.py and predict.py --n_iter: beyond it, no output for days

SEED_RANGE = click.IntRange(0, 2 ** 32 - 1)  # numpy's legacy seeding takes no more
SEED_HELP = 'Random seed, 0 to 2**32 - 1'
CNF_HELP = 'Config module: a name like c_512_5x5_32 or a path like configs/c_512_5x5_32.py.'
TRAINED_AS = 'the config --weights_from was trained as, e.g. of a released model'
WEIGHTS_HELP = 'Weights: a checkpoint file'
RELEASED_NAME = ", or a released model's short name (models/index.json, e.g. eyepacs-128)"
BEST_KAPPA = 'weights/CNF/weights.pt, the best validation kappa'
DEVICE_HELP = 'auto (CUDA if present), cpu, cuda or cuda:N.'
NO_PROGRESS_HELP = 'No progress bar (for logs).'
TTA_HELP = (f'Test-time augmentation iterations: the scores (or features) are averaged over N '
            'augmented views, drawn from the sequence of transform.py --tta_sequence (default '
            f'scrambled); 1: the centred window alone, no augmentation.  At most '
            f'{MAX_TTA_ITERATIONS}; the original used 50.')
BATCH_SIZE_HELP = 'Images scored together in one forward pass'
CROP_SIZE_RANGE = click.IntRange(min=8, max=8192)
CROP_SIZE_HELP = 'Side of the square converted images, in pixels'
LABELS_HELP = 'Labels CSV (image,level)'
TRAIN_DIR_HELP = 'Folder of converted training images'
TEST_DIR_HELP = 'Folder of converted test images'
INPUT_HELP = 'Input folder'
IMAGES_HELP = 'Input images: folders or single files; repeat the option for several.'
OUTPUT_FOLDER_HELP = 'Output folder'
OUTPUT_FILE_HELP = 'Output file'
COMPILE_HELP = ('torch.compile the network [default: on a GPU yes, on the CPU no]; a compiler '
                'that fails falls back to eager with a warning.')
PER_PATIENT_HELP = ('The per-patient blend: per eye, [this eye, the other eye ({patient}_left / '
                    '_right), right-eye flag]; an eye whose partner is missing uses its own '
                    'features.')
LAYER_HELP = ('With --method gradcam or layercam: the conv layer the map is taken at, e.g. conv5 '
              '(train_nn.py --summary lists them) [default: the last conv]; earlier layers give '
              'finer maps.')
FUSE_HELP = ('A second heat-map net whose maps are added to those of the net, each min-max '
             'normalised to [0, 1], on the smaller grid, or on the finer one when it is over '
             'twice the other (eyepacs-256 fused with eyepacs-128-fine: its 53x53 grid).')
SAVE_MAPS_HELP = ('Also save each map as the method made it (last conv resolution, float32) '
                  'beside its picture, as .npy: the numbers behind the picture.')

# What --precision auto means differs between the scripts, so each states its own.
PRECISION_AUTO_TRAINING = ('bf16 autocast on a GPU and on CPUs with native bf16 instructions '
                           '(AVX512-BF16 or AMX; about 2x the images per second of fp32 on such '
                           'a CPU), fp32 on other CPUs')
PRECISION_AUTO_FEATURES = ('bf16 autocast on a GPU, fp32 on every CPU (even one with native '
                           'bf16: there bf16 features depend on the batch, and predict.py, '
                           "computing them a few photographs at a time, would differ by up to "
                           "0.02 on a blend's score)")
PRECISION_HELP = ('bf16: bf16 autocast on any device (slow on CPUs without native bf16); fp32: '
                  'no autocast.')


def _help(stem, what=None, default_text=None):
    """`stem`, then what the option does in this script (after a stem that is a sentence, a
    sentence; else its continuation after a colon), then its default in brackets."""
    text = stem
    if what:
        text += ('  ' if stem.endswith('.') else ': ') + what
    if default_text:
        text += ('  ' if text.endswith('.') else ' ') + f'[default: {default_text}]'
    return text


def cnf_option(what=None, default_text=None, **kwargs):
    """--cnf: the config module of the net (train_nn.py, transform.py, blend.py, ram.py,
    predict.py, python -m retina.export)."""
    return click.option('--cnf', metavar='CONFIG', help=_help(CNF_HELP, what, default_text),
                        **kwargs)


def weights_option(what, default_text=BEST_KAPPA, released=True, aliases=(), dest='weights_from',
                   **kwargs):
    """--weights_from: the weights of the net (train_nn.py: to start from; the others: to use);
    `released`: a released model's short name is taken too; `aliases`: other names of the
    option (python -m retina.release's --weights)."""
    stem = WEIGHTS_HELP + (RELEASED_NAME if released else '') + '.'
    return click.option('--weights_from', *aliases, dest, type=click.Path(dir_okay=False),
                        help=_help(stem, what, default_text), **kwargs)


def seed_option(what, **kwargs):
    """--seed, one range everywhere: 0 to 2**32 - 1."""
    return click.option('--seed', default=0, show_default=True, type=SEED_RANGE,
                        help=_help(SEED_HELP, what), **kwargs)


def precision_help(auto, note=''):
    """The --precision help of a script whose 'auto' means `auto`
    (PRECISION_AUTO_TRAINING or PRECISION_AUTO_FEATURES)."""
    return f'auto: {auto}; {PRECISION_HELP}' + (f'  {note}' if note else '')


def precision_option(auto, note=''):
    """--precision: bf16 autocast or fp32; `auto` says what 'auto' means in this script."""
    return click.option('--precision', type=click.Choice(PRECISIONS), default='auto',
                        show_default=True, help=precision_help(auto, note))


def device_option():
    return click.option('--device', default='auto', show_default=True, help=DEVICE_HELP)


def no_progress_option():
    return click.option('--no_progress', is_flag=True, help=NO_PROGRESS_HELP)


def tta_iterations_option(what=None):
    """--n_iter of transform.py and predict.py: test-time augmentation iterations (blend.py's
    --n_iter is another idea, the blend's fits per run, and says so)."""
    return click.option('--n_iter', default=1, show_default=True,
                        type=click.IntRange(1, MAX_TTA_ITERATIONS), help=_help(TTA_HELP, what))


def batch_size_option(what=None, default=None, default_text=None):
    """--batch_size of the scripts that score images (transform.py, ram.py, predict.py):
    `default` a number, or None and `default_text` saying what is used then."""
    return click.option('--batch_size', type=click.IntRange(min=1), default=default,
                        show_default=default is not None,
                        help=_help(BATCH_SIZE_HELP + '.', what, default_text))


def crop_size_option(what, default=None, **kwargs):
    """--crop_size: the side of the converted images (convert.py makes them; predict.py and
    python -m retina.export expect them)."""
    return click.option('--crop_size', type=CROP_SIZE_RANGE, default=default,
                        show_default=default is not None, help=_help(CROP_SIZE_HELP, what),
                        **kwargs)


def labels_option(what, default=None, **kwargs):
    """--labels: a labels CSV with columns image,level."""
    return click.option('--labels', type=click.Path(dir_okay=False), default=default,
                        show_default=default is not None, help=_help(LABELS_HELP, what),
                        **kwargs)


def train_dir_option(what=None, default_text="the config's train_dir", aliases=()):
    """--train_dir (train_nn.py also takes it as --directory)."""
    return click.option('--train_dir', *aliases, 'train_dir', type=click.Path(file_okay=False),
                        help=_help(TRAIN_DIR_HELP + '.', what, default_text))


def test_dir_option(what=None, default_text="the config's test_dir"):
    return click.option('--test_dir', type=click.Path(file_okay=False),
                        help=_help(TEST_DIR_HELP + '.', what, default_text))


def directory_option(what, default=None, **kwargs):
    """--directory: the input folder of a script that reads one folder (convert.py, python -m
    retina.stats)."""
    kwargs.setdefault('type', click.Path(file_okay=False))
    return click.option('--directory', default=default, show_default=default is not None,
                        help=_help(INPUT_HELP, what), **kwargs)


def images_option(what=None, default_text=None, positional=False):
    """--images, also --directory: converted images or photographs, folders or single files,
    repeatable (ram.py).  `positional` (predict.py): IMAGES may be given as arguments too,
    and at least one image must be given one way or the other."""
    help_text = _help(IMAGES_HELP, what, default_text)
    if not positional:
        return click.option('--images', '--directory', 'images', multiple=True,
                            type=click.Path(), help=help_text)
    seen = 'retina.options.images_seen'

    def gather(context, _parameter, value):
        context.params['images'] = context.params.get('images', ()) + tuple(value or ())
        context.meta[seen] = context.meta.get(seen, 0) + 1
        if context.meta[seen] == 2 and not context.params['images'] and \
                not context.resilient_parsing:
            raise click.UsageError("Missing argument 'IMAGES...' (or --images FOLDER).", context)

    def decorate(function):
        function = click.option('--images', '--directory', 'images_option', multiple=True,
                                type=click.Path(), expose_value=False, callback=gather,
                                help=help_text + '  The same as giving them as arguments '
                                                 '(IMAGES).')(function)
        return click.argument('images', nargs=-1, type=click.Path(), expose_value=False,
                              callback=gather)(function)
    return decorate


def output_folder_option(original, dest, what, default=None, **kwargs):
    """The folder a script writes into, under its original name and --output (convert.py's
    --convert_directory, ram.py's --output_dir, python -m retina.synthetic's --out)."""
    return click.option(original, '--output', dest, type=click.Path(file_okay=False),
                        default=default, show_default=default is not None,
                        help=_help(OUTPUT_FOLDER_HELP, what), **kwargs)


def output_file_option(what, **kwargs):
    """--output: the one file a script writes (blend.py, predict.py, python -m retina.export
    and retina.stats)."""
    kwargs.setdefault('type', click.Path(dir_okay=False))
    return click.option('--output', help=_help(OUTPUT_FILE_HELP, what), **kwargs)


def compile_option(what=None):
    """--compile/--no_compile (train_nn.py, transform.py)."""
    return click.option('--compile/--no_compile', 'compile_model', default=None,
                        help=_help(COMPILE_HELP, what))


def per_patient_option(what):
    """--per_patient: blend.py fits the per-patient blend, predict.py applies one."""
    return click.option('--per_patient', is_flag=True, help=_help(PER_PATIENT_HELP, what))


def layer_option(what=None):
    return click.option('--layer', metavar='NAME', help=_help(LAYER_HELP, what))


def fuse_option(what=None, default_text=None):
    return click.option('--fuse', 'fuse_cnf', metavar='CONFIG',
                        help=_help(FUSE_HELP, what, default_text))


def fuse_weights_option(default_text='weights/FUSE/weights.pt'):
    return click.option('--fuse_weights', type=click.Path(dir_okay=False),
                        help=_help(WEIGHTS_HELP + RELEASED_NAME + '.', 'those of the --fuse net.',
                                   default_text))


def save_maps_option(what=None):
    return click.option('--save_maps', is_flag=True, help=_help(SAVE_MAPS_HELP, what))
