"""A trained net's output on the centred window of cached images, in batches: validation
during training, the feature statistics of `gradability`, the release's and the benchmarks'
scores, each image prepared and scored by `retina.model.scoring` from the net's input spec."""
import contextlib

import numpy as np
import torch

from retina.core.runtime import batches, new_step, release_memory, smaller_batch
from retina.model import scoring


@torch.no_grad()
def predict(model, images, indices, spec, runtime, batch_size, cuda_graphs=False,
            features=False):
    """Predictions for `indices` on the centred window of `spec` (a `checkpoint.InputSpec`: the
    net's window and pixel constants; no augmentation), in index order, or with `features` the
    pooled features (N × F); batches of `batch_size` (runtime.eval_batch_size(cnf): larger on a
    GPU, at most what fitted before), in the runtime's precision; each batch's output is copied
    out of `model`'s CUDA graph (`cuda_graphs`) before the next replay."""
    model.eval()
    while True:  # out of memory (a GPU smaller than the default batch needs): half, again
        try:
            return _predict(model, images, np.asarray(indices), spec, runtime, batch_size,
                            cuda_graphs, features)
        except torch.OutOfMemoryError as error:
            batch_size = smaller_batch(error, batch_size, runtime, 'validation')
        release_memory(runtime)


def _predict(model, images, order, spec, runtime, batch_size, cuda_graphs, features=False):
    outputs, chunks = [], []
    with contextlib.closing(batches(images, order, batch_size, runtime.device)) as stream:
        for batch, chunk in stream:
            new_step(cuda_graphs)
            # read back once, after the loop: a copy, never the graph's output
            scored = scoring.score(model, batch, spec, precision=runtime.precision,
                                   memory_format=torch.channels_last, features=features)
            outputs.append(scored.features if features else scored.scores)
            chunks.append(chunk)
    if not outputs:
        return np.empty(len(order), dtype=np.float32)
    found = torch.cat(outputs).cpu().numpy()
    out = np.empty((len(order), *found.shape[1:]), dtype=np.float32)
    position = {int(i): k for k, i in enumerate(order)}
    out[[position[int(i)] for i in torch.cat(chunks).cpu().numpy()]] = found
    return out


def centred_scores(loaded, image_paths, folder=None, device='cpu', cache_dir=None):
    """The output of `loaded` (a `checkpoint.LoadedNet`) on the centred window of each converted
    image of `image_paths` (of `folder`, named in a size error), fp32, as predict.py scores a
    photograph: the release's figures and the benchmarks'."""
    from retina.core.runtime import Runtime
    from retina.data import cache
    images = cache.load_images(image_paths, progress=False, cache_dir=cache_dir)
    cache.check_size(images, loaded.input_size, folder or image_paths[0].parent, loaded.name)
    runtime = Runtime(torch.device(device))
    return predict(loaded.net, images, np.arange(len(images)), loaded.spec, runtime,
                   runtime.eval_batch_size(loaded.config.cnf))
