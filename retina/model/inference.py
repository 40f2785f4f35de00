"""A trained net's output on the centred window of cached images, in batches: validation
during training, the feature statistics of `gradability`, the release's and the benchmarks'
scores.  (predict.py grades raw photographs on top of the same batch preparation.)"""
import contextlib

import numpy as np
import torch

from retina.core.runtime import batches, new_step, release_memory, smaller_batch
from retina.model.augment import constants_for, prepare_batch


@torch.no_grad()
def predict(model, images, indices, config, runtime, batch_size=None, cuda_graphs=False,
            features=False):
    """Predictions for `indices` on the centred window (no augmentation), in index order, or
    with `features` the pooled features (N × F); batches of `batch_size` [default:
    runtime.eval_batch_size, larger on a GPU]; each batch's output is copied out of `model`'s
    CUDA graph (`cuda_graphs`) before the next replay."""
    model.eval()
    batch_size = batch_size or runtime.eval_batch_size(config.cnf)
    while True:  # out of memory (a GPU smaller than the default batch needs): half, again
        try:
            return _predict(model, images, np.asarray(indices), config, runtime, batch_size,
                            cuda_graphs, features)
        except torch.OutOfMemoryError as error:
            batch_size = smaller_batch(error, batch_size, runtime, 'validation')
        release_memory(runtime)


def _predict(model, images, order, config, runtime, batch_size, cuda_graphs, features=False):
    outputs, chunks, constants = [], [], constants_for(config.cnf)
    with contextlib.closing(batches(images, order, batch_size, runtime.device)) as stream:
        for batch, chunk in stream:
            new_step(cuda_graphs)
            x = prepare_batch(batch, config.input_size, dtype=runtime.input_dtype,
                              memory_format=torch.channels_last, constants=constants)
            with runtime.autocast():
                out = model(x, return_features=True)[1] if features else model(x).squeeze(1)
                # read back once, after the loop: a copy, never the graph's output
                outputs.append(out.to(torch.float32, copy=True))
            chunks.append(chunk)
    if not outputs:
        return np.empty(len(order), dtype=np.float32)
    found = torch.cat(outputs).cpu().numpy()
    out = np.empty((len(order), *found.shape[1:]), dtype=np.float32)
    position = {int(i): k for k, i in enumerate(order)}
    out[[position[int(i)] for i in torch.cat(chunks).cpu().numpy()]] = found
    return out
