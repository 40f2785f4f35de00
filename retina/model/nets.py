"""The convolutional networks of the original solution, built from plain layer lists.

A config module lists its layers as `(kind, options)` pairs, made with the
helpers below; `build_net` turns the list into a `Net` (an `nn.Sequential`
whose parameter names, e.g. `conv3.weight`, are the same at every
resolution, so that weights move between the 128, 256 and 512 nets).

Every conv and hidden dense layer has a leaky ReLU (0.01), orthogonal
weights and biases of 0.05.  Conv biases are untied: one per channel and
output position.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LEAKINESS = 0.01
BIAS_INIT = 0.05


class UntiedConv2d(nn.Module):
    """Convolution + untied bias (C × H × W) + leaky ReLU."""

    def __init__(self, in_channels, filters, size, stride, pad, out_hw):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(filters, in_channels, size, size))
        self.bias = nn.Parameter(torch.full((filters, *out_hw), BIAS_INIT))
        self.stride, self.pad = stride, pad
        nn.init.orthogonal_(self.weight, gain=1.0)

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.pad)
        # Under bf16 autocast the conv gives bf16: add the bias in that type, so that the
        # activation stays half the bytes instead of being promoted to float32.
        if x.device.type == 'cpu' and torch.is_grad_enabled():
            return F.leaky_relu(_AddUntiedBias.apply(x, self.bias), LEAKINESS)
        return F.leaky_relu(x + self.bias.to(x.dtype), LEAKINESS)


class _AddUntiedBias(torch.autograd.Function):
    """x + bias (C × H × W), whose bias gradient sums the batch as one 2-D reduction.

    Autograd's own gradient of the broadcast add is grad.sum(0) on the 4-D channels_last
    gradient, which the CPU reduces about 40× slower than the same sum over the (N, H·W·C)
    view of the same memory (400 ms against 10 ms for a 128 × 32 × 110 × 110 batch): it took
    a quarter of a 256-px training step.  The CPU only: GPU kernels reduce either fast.
    """

    @staticmethod
    def forward(ctx, x, bias):
        ctx.bias_dtype = bias.dtype
        return x + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = sum_over_batch(grad).to(ctx.bias_dtype)
        return grad, grad_bias


def sum_over_batch(x):
    """x.sum(0) of an (N, C, H, W) tensor, as a 2-D reduction over its memory's own order."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(n, -1).sum(0).view(h, w, c).permute(2, 0, 1)
    if x.is_contiguous():
        return x.reshape(n, -1).sum(0).view(c, h, w)
    return x.sum(0)


class Dense(nn.Linear):
    """Fully connected layer, leaky ReLU unless it is the linear output."""

    def __init__(self, in_features, units, nonlinear=True):
        super().__init__(in_features, units)
        self.nonlinear = nonlinear
        nn.init.orthogonal_(self.weight, gain=1.0)
        nn.init.constant_(self.bias, BIAS_INIT)

    def forward(self, x):
        x = super().forward(x.flatten(1))
        return F.leaky_relu(x, LEAKINESS) if self.nonlinear else x


class RMSPool(nn.Module):
    """Root-mean-square pooling: sqrt(avg_pool(x²) + 1e-12)."""

    def __init__(self, size, stride):
        super().__init__()
        self.size, self.stride = size, stride

    def forward(self, x):
        return torch.sqrt(F.avg_pool2d(x.square(), self.size, self.stride) + 1e-12)


class Maxout(nn.Module):
    """Max over consecutive groups of `pool` features."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return x.unflatten(1, (-1, self.pool)).amax(2)


def is_ram_net(layers):
    """Whether a layer list is a RAM net's: a global-average-pool head (the baseline nets
    have an RMS pool).  Every "is this a RAM net" question asks here or `ram_exact`."""
    return any(kind == 'gap' for kind, _ in layers)


def layers_after_last_conv(net):
    """The names of the net's layers after its last conv, dropout aside."""
    names = [name for name, _ in net.named_children()]
    return [name for name in names[names.index(net.last_conv) + 1:]
            if not isinstance(net.get_submodule(name), nn.Dropout)]


def ram_exact(net):
    """Whether the net's head makes the regression activation map exact: last conv, global
    average pool, linear output (dropout aside)."""
    return (getattr(net, 'is_ram', False)
            and layers_after_last_conv(net) == [net.feature_layer, 'output'])


class GlobalAveragePool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


# Layer-list helpers used by the config modules.

def conv(name, filters, size, stride=1, pad=None):
    return ('conv', dict(name=name, filters=filters, size=size, stride=stride,
                         pad=size // 2 if pad is None else pad))


def pool(name):
    return ('pool', dict(name=name, size=3, stride=2))


def trunk_5x5(blocks, n=32):
    """The net-5 trunk; `blocks` = 3 (128 px), 4 (256 px) or 5 (512 px)."""
    layers = [conv('conv1', n, 5, 2), conv('conv2', n, 3), pool('pool1'),
              conv('conv3', 2 * n, 5, 2), conv('conv4', 2 * n, 3), conv('conv5', 2 * n, 3),
              pool('pool2'),
              conv('conv6', 4 * n, 3), conv('conv7', 4 * n, 3), conv('conv8', 4 * n, 3)]
    if blocks >= 4:
        layers += [pool('pool3'), conv('conv9', 8 * n, 3), conv('conv10', 8 * n, 3),
                   conv('conv11', 8 * n, 3)]
    if blocks >= 5:
        layers += [pool('pool4'), conv('conv12', 16 * n, 3), conv('conv13', 16 * n, 3)]
    return layers


def trunk_4x4(blocks, n=32):
    """The net-4 trunk: 4×4 convs, pad 2 on alternate layers (sizes 224 -> 225 -> ...)."""
    layers = [conv('conv1', n, 4, 2, 1), conv('conv2', n, 4, 1, 2), pool('pool1'),
              conv('conv3', 2 * n, 4, 2, 1), conv('conv4', 2 * n, 4, 1, 2),
              conv('conv5', 2 * n, 4, 1, 1), pool('pool2'),
              conv('conv6', 4 * n, 4, 1, 2), conv('conv7', 4 * n, 4, 1, 1),
              conv('conv8', 4 * n, 4, 1, 2)]
    if blocks >= 4:
        layers += [pool('pool3'), conv('conv9', 8 * n, 4, 1, 2), conv('conv10', 8 * n, 4, 1, 1),
                   conv('conv11', 8 * n, 4, 1, 2)]
    if blocks >= 5:
        layers += [pool('pool4'), conv('conv12', 16 * n, 4, 1, 1)]
    return layers


def baseline_head(rms_stride):
    """RMS pool -> dropout -> dense 1024 -> maxout -> dropout -> dense 1024 -> maxout -> 1."""
    return [('rmspool', dict(name='rmspool', size=3, stride=rms_stride)),
            ('dropout', dict(name='dropout1', p=0.5)),
            ('dense', dict(name='dense1', units=1024)), ('maxout', dict(name='maxout1', pool=2)),
            ('dropout', dict(name='dropout2', p=0.5)),
            ('dense', dict(name='dense2', units=1024)), ('maxout', dict(name='maxout2', pool=2)),
            ('output', dict(name='output', units=1))]


def batch_norm(name):
    return ('bn', dict(name=name))


def with_batch_norm(layers):
    """The RAM repository's nets: batch norm on the input and after every conv layer's
    nonlinearity but the last conv's (before the following max-pool, where there is one).

    Named after their conv (`conv3_bn`), so weight transfer 128 -> 256 -> 512 carries them.
    """
    last_conv = max(i for i, (kind, _) in enumerate(layers) if kind == 'conv')
    out = [batch_norm('input_bn')]
    for i, layer in enumerate(layers):
        out.append(layer)
        kind, opt = layer
        if kind == 'conv' and i != last_conv:
            out.append(batch_norm(f'{opt["name"]}_bn'))
    return out


def fine_trunk_128(n=32):
    """The RAM repository's 128-px heat-map trunk (its configs_CAM): strides 1 where net-5
    has 2, the second pool of stride 1, so the last conv is 54 × 54 for a 112-px input."""
    return [conv('conv1', n, 5, 1), conv('conv2', n, 3), pool('pool1'),
            conv('conv3', 2 * n, 5, 1), conv('conv4', 2 * n, 3), conv('conv5', 2 * n, 3),
            ('pool', dict(name='pool2', size=3, stride=1)),
            conv('conv6', 4 * n, 3), conv('conv7', 4 * n, 3), conv('conv8', 4 * n, 3)]


def fine_trunk_256(n=32):
    """The 256-px heat-map trunk: net-5 up to the first pool, then stride 1 and no more pools,
    ending in three 8n convs; the last conv is 55 × 55 for a 224-px input."""
    return [conv('conv1', n, 5, 2), conv('conv2', n, 3), pool('pool1'),
            conv('conv3', 2 * n, 5, 1), conv('conv4', 2 * n, 3), conv('conv5', 2 * n, 3),
            conv('conv6', 4 * n, 3), conv('conv7', 4 * n, 3), conv('conv8', 4 * n, 3),
            conv('conv9', 8 * n, 3), conv('conv10', 8 * n, 3), conv('conv11', 8 * n, 3)]


def ram_head():
    """Global average pool of the last conv -> linear output: the RAM head."""
    return [('gap', dict(name='gap')), ('output', dict(name='output', units=1))]


def replace_head(layers, head):
    """`layers` with everything after the last conv replaced by `head`."""
    last_conv = max(i for i, (kind, _) in enumerate(layers) if kind == 'conv')
    return layers[:last_conv + 1] + head


@dataclass(frozen=True)
class LayerKind:
    """How a layer kind of the config modules' layer lists is built.  `build(options, shape)`
    returns (module, output shape) for an input of `shape` ((channels, h, w) or (units,));
    `spatial`: its output is a map a heat map can be taken of (Grad-CAM's layers);
    `regularizable`: its parameters that weight decay applies to (Lasagne's)."""
    build: Callable
    spatial: bool = False
    regularizable: tuple = ()


LAYER_KINDS = {}


def layer_kind(kind, spatial=False, regularizable=()):
    """Register a builder for layer lists' `kind`: a new net family is one module that
    registers its layers (and its configs); nothing else names them."""
    def register(build):
        if kind in LAYER_KINDS:
            raise ValueError(f'layer kind {kind!r} is registered twice')
        LAYER_KINDS[kind] = LayerKind(build, spatial, tuple(regularizable))
        return build
    return register


@layer_kind('conv', spatial=True, regularizable=('weight',))
def _conv(opt, shape):
    (channels, h, w), k, s, p = shape, opt['size'], opt['stride'], opt['pad']
    h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if h < 1 or w < 1:
        raise ValueError(f'layer {opt["name"]}: input too small for this net')
    return UntiedConv2d(channels, opt['filters'], k, s, p, (h, w)), (opt['filters'], h, w)


def _pooled(shape, opt):
    channels, h, w = shape
    return channels, (h - opt['size']) // opt['stride'] + 1, (w - opt['size']) // opt['stride'] + 1


@layer_kind('pool')
def _max_pool(opt, shape):
    return nn.MaxPool2d(opt['size'], opt['stride']), _pooled(shape, opt)


@layer_kind('rmspool')
def _rms_pool(opt, shape):
    return RMSPool(opt['size'], opt['stride']), _pooled(shape, opt)


@layer_kind('bn')
def _batch_norm(opt, shape):
    return nn.BatchNorm2d(shape[0]), shape


@layer_kind('gap')
def _global_average_pool(opt, shape):
    return GlobalAveragePool(), (shape[0],)


@layer_kind('dropout')
def _dropout(opt, shape):
    return nn.Dropout(opt['p']), shape


@layer_kind('dense', regularizable=('weight',))
def _dense(opt, shape):
    return Dense(_numel(shape), opt['units'], nonlinear=True), (opt['units'],)


@layer_kind('output', regularizable=('weight',))
def _output(opt, shape):
    return Dense(_numel(shape), opt['units'], nonlinear=False), (opt['units'],)


@layer_kind('maxout')
def _maxout(opt, shape):
    return Maxout(opt['pool']), (shape[0] // opt['pool'],)


FEATURE_KINDS = ('rmspool', 'gap')  # the first of these is the net's feature layer


class Net(nn.Sequential):
    """A built network; knows its feature layer, its last conv and every output shape."""

    def __init__(self, layers, input_size):
        modules, shapes = OrderedDict(), OrderedDict()
        shape = (3, *input_size)
        features = None
        for kind, opt in layers:
            name = opt['name']
            if kind not in LAYER_KINDS:
                raise ValueError(f'unknown layer kind {kind!r} (layer {name}); known: '
                                 f'{", ".join(LAYER_KINDS)}')
            try:
                modules[name], shape = LAYER_KINDS[kind].build(opt, shape)
            except ValueError as error:
                raise ValueError(f'{error} ({input_size})') from None
            if kind in FEATURE_KINDS and features is None:
                features = name
            shapes[name] = shape
        super().__init__(modules)
        self.input_size = tuple(input_size)
        self.output_shapes = shapes
        self.feature_layer = features
        self.kinds = {opt['name']: kind for kind, opt in layers}
        self.spatial_layers = [opt['name'] for kind, opt in layers if LAYER_KINDS[kind].spatial]
        self.last_conv = self.spatial_layers[-1]
        self.is_ram = is_ram_net(layers)

    def regularizable(self):
        """The parameters weight decay applies to: those each layer kind names."""
        return [module.get_parameter(attribute) for name, module in self.named_children()
                for attribute in LAYER_KINDS[self.kinds[name]].regularizable]

    def forward(self, x, return_features=False):
        features = None
        for name, module in self.named_children():
            x = module(x)
            if name == self.feature_layer:
                features = x.flatten(1)
        return (x, features) if return_features else x

    def summary(self):
        """Rows of (layer name, type, output shape, parameter count)."""
        rows = [('input', 'Input', (3, *self.input_size), 0)]
        for name, module in self.named_children():
            n = sum(p.numel() for p in module.parameters())
            rows.append((name, type(module).__name__, self.output_shapes[name], n))
        return rows


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def build_net(layers, input_size):
    return Net(layers, tuple(input_size))


def parameter_count(net):
    return sum(p.numel() for p in net.parameters())


def format_summary(net, name=''):
    """A table of layers, output shapes and parameter counts, ending with `parameters: N`."""
    lines = [f'{name}' if name else 'network', f'{"layer":<10} {"type":<18} {"output":<18} '
             f'{"params":>12}']
    for layer, kind, shape, n in net.summary():
        lines.append(f'{layer:<10} {kind:<18} {"x".join(map(str, shape)):<18} {n:>12,}')
    lines.append(f'parameters: {parameter_count(net):,}')
    return '\n'.join(lines)
