"""Export a trained net to ONNX for screening software, and check it against torch.

    python -m retina.export --cnf c_512_5x5_32_ram --output c_512_5x5_32_ram.onnx
    python -m retina.export --cnf c_512_5x5_32 --weights_from weights/c_512_5x5_32/best/X.pt \\
        --output net.onnx --check_images data/test_medium

The exported graph takes what an image library decodes, so the caller needs
no knowledge of the training constants:

- input `image`: uint8, N × S × S × 3 (NHWC, RGB), the *converted* image
  (the eye cropped and resized to S × S as convert.py does, S = 512 for the
  448-px nets; then the net's preprocessing, e.g. --enhance local_contrast,
  if it was trained on that);
- inside the graph: the centred h × w window, standardisation with the
  training channel means and standard deviations (`retina.model.scoring.prepare`, as every
  stage prepares a net's input), the net;
- output `score`: float32, N, the continuous level, cut into levels 0-4 at the
  metadata's `retina.level_cuts` (the net's own cut-offs when it carries them, as
  predict.py and ram.py cut it; else 0.5 … 3.5);
- output `ram` (RAM nets only): float32, N × h' × w', the regression
  activation map Σ_k w_k A_k of the last conv layer (no output bias) over the
  window, as predict.py --heatmap draws it.

The batch dimension is dynamic.  `check` runs torch and onnxruntime on the
same images (photographs or converted images, prepared as predict.py
prepares them) and reports the largest absolute difference of each output.
onnx and onnxruntime are imported only here (requirements.txt lists them).
"""
import sys
import warnings

import click
import numpy as np
import torch
import torch.nn as nn

from retina.core.errors import UserError, handle_errors
from retina.core.options import (CONTEXT_SETTINGS, TRAINED_AS, cnf_option, crop_size_option,
                                 output_file_option, weights_option)
from retina.heatmaps.methods import ram_of_activations
from retina.model import scoring
from retina.model.augment import place_constants

OPSET = 17
TOLERANCE = 1e-4        # fp32: the largest difference `check` accepts
CHECK_IMAGES = 8        # images `check` compares at most


class ExportedNet(nn.Module):
    """uint8 N × S × S × 3 converted images -> score (N,) [, RAM maps (N, h', w')].

    The input is prepared inside the graph by `retina.model.scoring.prepare`, the one path of
    every stage: the centred window of the net's input spec, standardised with its constants
    (constants of the graph, like the weights)."""

    def __init__(self, net, spec, with_ram, crop_size=None):
        super().__init__()
        if spec is None:
            raise ValueError('ExportedNet needs the net\'s input spec (LoadedNet.spec): its '
                             'window and the pixel constants it was trained with')
        self.net = net
        self.spec = spec
        self.crop_size = crop_size or spec.size
        self.with_ram = with_ram
        self.height, self.width = spec.window

    def forward(self, image):
        x = scoring.prepare(image.permute(0, 3, 1, 2), self.spec, precision='fp32')
        maps = None
        for name, module in self.net.named_children():
            x = module(x)
            if name == self.net.last_conv:
                maps = x
        score = x.squeeze(1)
        if not self.with_ram:
            return score
        return score, ram_of_activations(maps, self.net.get_submodule('output').weight[0])


def export(grader, output):
    """Write `grader`'s net as ONNX to `output`; returns the wrapped module (for `check`)."""
    from retina.core import atomic
    wrapped = ExportedNet(grader.net.cpu().eval(), grader.spec, grader.is_ram,
                          grader.crop_size).eval()
    example = torch.zeros(2, grader.crop_size, grader.crop_size, 3, dtype=torch.uint8)
    outputs = ['score', 'ram'] if grader.is_ram else ['score']
    axes = {'image': {0: 'batch'}, **{name: {0: 'batch'} for name in outputs}}
    place_constants('cpu', grader.spec.constants)  # made before the trace, not inside it
    with atomic.atomic_path(output) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter: deprecated since torch 2.9 but complete for these
        # plain feed-forward nets, and it needs no onnxscript (the new exporter does).
        warnings.simplefilter('ignore', DeprecationWarning)
        try:
            torch.onnx.export(wrapped, (example,), str(tmp), input_names=['image'],
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
        except ImportError as error:
            raise UserError(f'ONNX export needs the onnx package ({error}); pip install onnx '
                            f'onnxruntime (both are in requirements.txt)') from None
        add_metadata(tmp, metadata(grader, wrapped))
    return wrapped


def metadata(grader, wrapped):
    """What software running the file must know to prepare its input and read its output:
    the look of the training images (convert.py --enhance), the converted size and window,
    the constants, and the cut-offs of the levels (`checkpoint.level_cuts`: one per net)."""
    from retina.model import checkpoint
    return {'retina.config': grader.config.name,
            'retina.preprocessing': grader.preprocessing,
            'retina.crop_size': str(grader.crop_size),
            'retina.window': f'{wrapped.height}x{wrapped.width}',
            'retina.mean': ','.join(f'{v:.6g}' for v in wrapped.spec.constants.mean),
            'retina.std': ','.join(f'{v:.6g}' for v in wrapped.spec.constants.std),
            'retina.level_cuts': ','.join(f'{c:.6g}' for c in checkpoint.level_cuts(
                [grader.loaded])),
            'retina.input': ('uint8 N x crop_size x crop_size x 3 RGB: the photograph cropped '
                             'to the eye and resized by convert.py, with --enhance applied')}


def add_metadata(path, entries):
    """Write `entries` into the ONNX file's metadata_props (onnx.load / model.metadata_props)."""
    import onnx
    model = onnx.load(str(path))
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


def _session(path):
    try:
        import onnxruntime
    except ImportError:
        raise UserError('checking the export needs onnxruntime; pip install onnxruntime (it is in '
                        'requirements.txt), or pass --no_check') from None
    return onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def check_images(grader, sources, limit=CHECK_IMAGES):
    """(N, S, S, 3) uint8 converted images of up to `limit` photographs of `sources` (files or
    folders), prepared exactly as predict.py prepares them, and their names."""
    from retina.data.images import BadImage
    from retina.data.images import collect_images
    from retina.grade.photos import prepare_photo
    key = (grader.crop_size, grader.preprocessing)
    images, names = [], []
    for path in collect_images(sources, keep_odd_names=True, what='photographs'):
        try:
            photo = prepare_photo(path, {key})
        except BadImage as error:
            print(f'skipped: {error}', file=sys.stderr)
            continue
        images.append(photo.converted[key])
        names.append(photo.name)
        if len(images) == limit:
            break
    if not images:
        raise UserError(f'none of {", ".join(map(str, sources))} could be read for the check')
    return np.stack(images), names


def synthetic_images(crop_size, count=3, seed=0):
    """Random uint8 images when no real ones are given (the check is numerical only; three,
    not the two the graph was traced with, so the dynamic batch is checked too)."""
    return np.random.default_rng(seed).integers(0, 256, (count, crop_size, crop_size, 3),
                                                dtype=np.uint8)


def check(wrapped, path, images):
    """{output name: largest |torch − onnxruntime|} on `images` (N, S, S, 3) uint8."""
    session = _session(path)
    found = session.run(None, {'image': images})
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(images))
    expected = expected if isinstance(expected, tuple) else (expected,)
    names = [o.name for o in session.get_outputs()]
    return {name: float(np.max(np.abs(np.asarray(f, dtype=np.float64)
                                      - e.double().numpy())))
            for name, f, e in zip(names, found, expected)}


@click.command(context_settings=CONTEXT_SETTINGS)
@cnf_option('The trained net to export.', default_text=TRAINED_AS)
@weights_option('The weights to export.')
@output_file_option('the ONNX file to write, e.g. c_512_5x5_32_ram.onnx.', required=True)
@crop_size_option("S: the graph takes N×S×S×3 uint8 images [default: the net's input / "
                  '0.875: 512 for 448-px nets].')
@click.option('--check_images', 'check_sources', multiple=True, type=click.Path(exists=True),
              help='Photographs or converted images (files or folders; repeatable) to compare '
                   f'torch and onnxruntime on (the first {CHECK_IMAGES}); they are prepared as '
                   'predict.py prepares them. [default: random images]')
@click.option('--no_check', is_flag=True,
              help='Only export; do not compare with onnxruntime.')
@handle_errors()
def main(cnf, weights_from, output, crop_size, check_sources, no_check):
    """Export the net of CNF to ONNX: uint8 N×S×S×3 (RGB) converted images in, the
    standardisation and centred window inside, outputs score (N) and, for RAM nets,
    ram (N×h'×w').  Then check it against torch with onnxruntime and print the
    largest absolute difference (exit 1 above 1e-4)."""
    from retina.grade.grader import load_grader
    from retina.model import released
    from retina.model.checkpoint import config_name
    released.check_not_released(output, '--output')
    grader = load_grader(config_name(cnf, weights_from), weights_from, 'cpu', crop_size)
    if check_sources and not no_check:  # before the file is written: a bad folder writes none
        images, names = check_images(grader, check_sources)
    wrapped = export(grader, output)
    outputs = 'score, ram' if grader.is_ram else 'score'
    size = grader.crop_size
    click.echo(f'wrote {output}: input image uint8 N×{size}×{size}×3 (RGB'
               + (f', preprocessed with {grader.preprocessing}' if grader.preprocessing != 'none'
                  else '') + f'), outputs {outputs}')
    if no_check:
        return
    if check_sources:
        what = f'{len(names)} image(s) of {", ".join(check_sources)}'
    else:
        images = synthetic_images(size)
        what = f'{len(images)} random images'
    differences = check(wrapped, output, images)
    worst = max(differences.values())
    click.echo(f'onnxruntime vs torch on {what}: largest |difference| '
               + ', '.join(f'{name} {value:.2e}' for name, value in differences.items()))
    if not worst <= TOLERANCE:
        click.echo(f'error: the export differs from torch by {worst:.2e} (> {TOLERANCE:g}); '
                   f'report it with the onnxruntime and torch versions', err=True)
        sys.exit(1)
