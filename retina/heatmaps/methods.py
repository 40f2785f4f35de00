"""Heat-map methods: each turns a batch into (maps at a conv layer's resolution, predictions).

- `ram`: the regression activation map (Wang & Yang 2017) of a RAM net, whose
  head is a global average pool of the last conv layer A and one linear unit:
  prediction = b + sum_k w_k mean_xy A_k(x, y).  The map is sum_k w_k A_k,
  without b by default as the RAM repository's notebook drew it (b adds the
  same value everywhere, so it only shifts the colours); with the bias the
  map's mean is the prediction.
- `gradcam` (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k) with alpha_k the
  spatial mean of d prediction / d A_k, at any conv layer, so baseline nets
  (RMS-pool and dense head) get maps too.  On a RAM net's last conv
  d prediction / d A_k(x, y) = w_k / (h w), so Grad-CAM there is
  ReLU(RAM without bias) / (h w).
- `layercam` (Jiang et al. 2021): ReLU(sum_k ReLU(d prediction / d A_k) A_k),
  the gradient kept per position, which keeps finer detail at earlier layers.

Each method is one small function, and METHODS is the list every script offers
(ram.py --method, predict.py --heatmap --method); the hook that reads a layer lives in
a context manager that always removes it.  Every map a user sees is made here:
ram.py's figures, predict.py's overlays on the photograph and the ONNX `ram` output
(`ram_of_activations`), upsampled by `upsample` and coloured by one rule
(`in_score_units`, then `colour_levels`: the positive part on one scale in score units,
[0, SCALE_TOP], for every photograph).  `upsample` brings maps to the
window smoothly (bicubic, clamped to each map's range so the overshoot of
the cubic kernel invents no values), and `fuse` adds the maps of two nets
as the RAM repository's notebook did.
"""
import contextlib

import torch
import torch.nn.functional as F

from retina.core.errors import UserError
from retina.heatmaps import METHOD_NAMES

RAM_ADVICE = 'use a *_ram config (e.g. c_512_5x5_32_ram): its global-average-pool head makes the map exact'


class Captured:
    """What a forward hook saw: `activations` is the layer's latest output."""

    def __init__(self):
        self.activations = None


@contextlib.contextmanager
def capture_activations(net, layer_name, keep_graph=False):
    """Record the output of `net`'s layer `layer_name` at each forward; the hook is always removed.

    With `keep_graph` the output is kept attached to the autograd graph, so
    that gradient methods can differentiate the prediction with respect to it.
    """
    try:
        module = net.get_submodule(layer_name)
    except AttributeError:
        raise ValueError(f'the network has no layer {layer_name!r}') from None
    captured = Captured()

    def hook(_module, _inputs, output):
        captured.activations = output if keep_graph else output.detach()

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def check_ram_net(net):
    """Refuse a network whose head does not make the regression activation map exact."""
    if not getattr(net, 'is_ram', False):
        raise UserError(f'this network has no global-average-pool head (a baseline net); {RAM_ADVICE}, '
                        f'or pass --method gradcam or layercam')
    from retina.model.nets import layers_after_last_conv, ram_exact
    if not ram_exact(net):
        after = layers_after_last_conv(net)
        raise UserError(f'the layers after {net.last_conv} are {", ".join(after)}; a RAM needs exactly '
                        f'a global average pool and the linear output; {RAM_ADVICE}')


def method_tag(method, layer=None, include_bias=False, net=None):
    """How output names carry the method: ram, ram_bias, gradcam, gradcam-conv5 (not the last conv)."""
    tag = method + ('_bias' if include_bias and method == 'ram' else '')
    if layer and (net is None or layer != net.last_conv):
        tag += f'-{layer}'
    return tag


def check_layer(method, layer, net=None, name=None):
    """A UserError unless `layer` (None: the last conv) suits `method` and (given a net, named
    `name`) is one of its conv layers."""
    from retina.core.errors import UserError
    if layer and method == 'ram':
        raise UserError('--layer is for --method gradcam or layercam; the RAM is defined at the '
                        'last conv')
    if layer and net is not None and layer not in conv_layers(net):
        raise UserError(f'--layer {layer}: {name} has no such conv layer; use one of '
                        f'{", ".join(conv_layers(net))}')


def conv_layers(net):
    """Names of the net's spatial layers (nets.LAYER_KINDS marks them), input first."""
    return list(net.spatial_layers)


@contextlib.contextmanager
def _eval_mode(net):
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


@torch.no_grad()
def regression_activation_map(net, x, include_bias=False, layer=None):
    """(maps (N, h', w') at the last conv layer's resolution, predictions (N,)) for the batch `x`.

    `x` is the standardised network input.  With `include_bias` the output
    bias is added to every position, so each map's mean is its prediction.
    `layer` must be the last conv (or None): the map is exact only there.
    """
    check_ram_net(net)
    if layer not in (None, net.last_conv):
        raise UserError(f'--layer {layer}: the regression activation map exists only at the last conv '
                        f'layer ({net.last_conv}); use --method gradcam or layercam for other layers')
    with _eval_mode(net), capture_activations(net, net.last_conv) as captured:
        predictions = net(x)[:, 0]
    maps = ram_of_activations(captured.activations, net.output.weight[0])
    if include_bias:
        maps = maps + net.output.bias[0]
    return maps, predictions.float()


def ram_of_activations(activations, weight):
    """sum_k w_k A_k: the (N, h', w') maps of last-conv activations A (N, K, h', w') and the
    output unit's weights w (K,).  The one RAM formula: the ONNX export (retina.publish.export) traces
    it into its graph."""
    return (activations.float() * weight.float()[None, :, None, None]).sum(1)


def activations_and_gradients(net, x, layer=None):
    """(A (N, K, h', w') at `layer`, d prediction_n / d A_n, predictions (N,)), in eval mode.

    Images do not interact in eval mode, so the gradient of the batch's summed
    prediction gives every image's own gradient in one backward pass.
    """
    layer = layer or net.last_conv
    with _eval_mode(net), torch.enable_grad(), capture_activations(net, layer, keep_graph=True) as captured:
        predictions = net(x)[:, 0]
        if captured.activations is None or captured.activations.dim() != 4:
            raise UserError(f'--layer {layer}: not a layer with a spatial map; use one of '
                            f'{", ".join(conv_layers(net))}')
        gradients, = torch.autograd.grad(predictions.sum(), captured.activations)
    return captured.activations.detach().float(), gradients.float(), predictions.detach().float()


def grad_cam(net, x, layer=None):
    """Grad-CAM: ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of the gradient of the prediction."""
    activations, gradients, predictions = activations_and_gradients(net, x, layer)
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * activations).sum(1)), predictions


def layer_cam(net, x, layer=None):
    """LayerCAM: ReLU(sum_k ReLU(gradient_k) A_k), position by position."""
    activations, gradients, predictions = activations_and_gradients(net, x, layer)
    return F.relu((F.relu(gradients) * activations).sum(1)), predictions


METHODS = {'ram': regression_activation_map, 'gradcam': grad_cam, 'layercam': layer_cam}
assert tuple(METHODS) == METHOD_NAMES  # the scripts' choices (retina.heatmaps) are these


def compute_maps(method, net, x, layer=None, include_bias=False):
    """Maps and predictions of `method` (a key of METHODS) for the batch `x`."""
    if method == 'ram':
        return regression_activation_map(net, x, include_bias=include_bias, layer=layer)
    return METHODS[method](net, x, layer)


def upsample(maps, size):
    """(N, h', w') maps -> (N, *size): bicubic, every cell covering an equal share, in each map's range.

    Bicubic interpolation overshoots next to sharp changes; clamping to the
    map's own minimum and maximum keeps the upsampled map from showing values
    the map does not have.
    """
    maps = maps.float()
    up = F.interpolate(maps[:, None], size=tuple(size), mode='bicubic', align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2))[:, None, None]
    high = maps.amax(dim=(1, 2))[:, None, None]
    return torch.maximum(torch.minimum(up, high), low)


SCALE_TOP = 4.0    # the colour scale's top in score units: a map this high everywhere makes a level-4 score


def in_score_units(method, maps, predictions, fused=False):
    """(N, h', w') maps as they are coloured: in score units per pixel, so that one colour
    means one amount of evidence on every photograph (the scale is [0, SCALE_TOP]).

    A RAM is in those units already: its mean over the grid is the prediction less the
    output bias.  Other maps (Grad-CAM, LayerCAM, a fused map) have no unit of their own;
    each is shown as the photograph's score (`predictions`, the first net's for a fused map,
    nothing when negative) spread over the eye in the map's proportions: its mean is the
    score.  The maps the methods return (scored, saved with --save_maps) are not changed.
    """
    if method == 'ram' and not fused:
        return maps.float()
    maps = maps.float().clamp_min(0)
    mean = maps.mean(dim=(1, 2))
    factor = torch.where(mean > 0, predictions.float().clamp_min(0) / mean.clamp_min(1e-12),
                         torch.zeros_like(mean))
    return maps * factor[:, None, None]


def colour_peak(maps, signed=False):
    """The top of the colour scale of `maps` (arrays, NaN outside the fundus): the largest
    value (magnitude when `signed`); the scale is [0, peak], or [-peak, peak] when signed."""
    import numpy as np
    peaks = [float(np.nanmax(np.abs(m) if signed else m)) for m in maps
             if np.isfinite(m).any()]
    peak = max(peaks, default=0.0)
    return peak if peak > 1e-6 else 1e-6


def colour_levels(heat, peak=SCALE_TOP, signed=False):
    """Where `heat` (score units, `in_score_units`) sits on the colour scale, 0..1 (-1..1
    when `signed`): its positive part (unless `signed`) over `peak` [default: SCALE_TOP, the
    same for every photograph of every run; None: `colour_peak` of this map].  ram.py's and
    predict.py's pictures are coloured by this rule (`figures.render`)."""
    import numpy as np
    shown = np.asarray(heat, dtype=np.float64)
    shown = shown if signed else np.clip(shown, 0, None)
    peak = colour_peak([shown], signed) if peak is None else peak
    return np.clip(shown / peak, -1 if signed else 0, 1)


def to_grid(maps, grid):
    """(N, h, w) maps on the (h', w') `grid`: equal sizes unchanged; one cell more loses its last row
    and column (the RAM notebook's 55 -> 54); a smaller grid is resampled by area, a larger one
    by `upsample`."""
    h, w = maps.shape[-2:]
    if (h, w) == tuple(grid):
        return maps
    if (h - grid[0], w - grid[1]) in ((1, 1), (1, 0), (0, 1)):
        return maps[:, :grid[0], :grid[1]]
    if h < grid[0] and w < grid[1]:
        return upsample(maps, grid)
    return F.interpolate(maps[:, None].float(), size=tuple(grid), mode='area')[:, 0]


def fusion_grid(grid_a, grid_b):
    """The grid two nets' maps are fused on: the smaller of the two when they are alike (two
    heat-map nets, 53 and 55 -> 53, as the RAM notebook did), the finer one when one is over
    twice the other (a 6x6 net with a 53x53 one: the fine net's detail kept, the 6x6 map
    upsampled onto it)."""
    small, large = sorted((tuple(grid_a), tuple(grid_b)), key=lambda s: s[0] * s[1])
    return large if large[0] > 2 * small[0] and large[1] > 2 * small[1] else small


def min_max(maps):
    """Each map rescaled to [0, 1] (a constant map becomes 0)."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return (maps - low) / torch.where(span > 0, span, torch.ones_like(span))


def fuse(maps_a, maps_b):
    """The sum of two nets' maps, each min-max normalised to [0, 1] on their `fusion_grid`."""
    grid = fusion_grid(maps_a.shape[-2:], maps_b.shape[-2:])
    return min_max(to_grid(maps_a, grid)) + min_max(to_grid(maps_b, grid))
