"""Where the work runs: the device, the processes of a multi-GPU run, and how images get there.

Training, feature extraction, the heat maps and prediction all share these:
`setup_runtime` picks the device (and joins torchrun's process group),
`place_images` keeps a uint8 image cache on the GPU when it fits, and
`batches` streams batches of it to the device.
"""
import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from retina.errors import UserError

GPU_EVAL_BATCH = 512  # validation and feature batches on a GPU: no gradients, bf16, < 10 GB


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def cuda(self):
        return self.device.type == 'cuda'

    @property
    def main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1

    @property
    def input_dtype(self):
        """The network input's dtype: bf16 on a GPU (what the autocast convolutions read, so
        the augmentation writes it directly), float32 on the CPU (no autocast there)."""
        return torch.bfloat16 if self.cuda else torch.float32

    def eval_batch_size(self, cnf):
        """Images per validation or feature batch: the config's batch_size_test, at least
        GPU_EVAL_BATCH on a GPU (a batch of 32 leaves an H100 waiting on kernel launches)."""
        return max(cnf['batch_size_test'], GPU_EVAL_BATCH) if self.cuda else cnf['batch_size_test']


def resolve_device(requested='auto'):
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> torch.device; a missing GPU is a UserError."""
    if requested == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f'unknown device {requested!r}; use auto, cpu, cuda or cuda:N') from None
    if device.type not in ('cpu', 'cuda'):
        raise UserError(f'--device {requested}: only cpu and cuda are supported (bf16 autocast '
                        f'and the tests cover those two); use auto, cpu, cuda or cuda:N')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {requested}: no CUDA GPU is available on this machine; '
                            f'use --device cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'--device {requested}: this machine has '
                            f'{torch.cuda.device_count()} GPU(s)')
    return device


def setup_runtime(requested='auto'):
    """One process per device; under torchrun, join the process group."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if 'OMP_NUM_THREADS' not in os.environ:  # never more threads than the cores we may use
        torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))
                                         // world)))
    if world == 1:
        return Runtime(resolve_device(requested))
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(requested)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Runtime(device, rank, world)


def place_images(images, runtime, cache_on_device):
    """Keep the uint8 cache on the GPU when it fits (or when asked), else on the host."""
    if not runtime.cuda or cache_on_device == 'no':
        return images
    free, _ = torch.cuda.mem_get_info(runtime.device)
    if cache_on_device == 'yes' or images.nbytes < 0.4 * free:
        return torch.from_numpy(np.ascontiguousarray(images)).to(runtime.device)
    return images


def _to_device(batch, chunk, device):
    """A host batch and its indices on `device`; pinned, so the copy does not block."""
    tensors = (torch.from_numpy(np.ascontiguousarray(batch)), torch.from_numpy(chunk))
    if device.type == 'cuda':
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tensors


def batches(images, indices, batch_size, device):
    """Yield (uint8 batch, index tensor), both on `device`.

    From a device-resident cache the batch is gathered on the device and the
    indices travel once per epoch; from a host cache batches are gathered in
    index order and, for a GPU, prepared ahead in a thread.
    """
    if isinstance(images, torch.Tensor):
        on_device = torch.as_tensor(np.asarray(indices), device=images.device)
        for chunk in on_device.split(batch_size):
            yield images[chunk], chunk
        return
    chunks = [np.sort(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    if device.type != 'cuda':
        for chunk in chunks:
            yield _to_device(images[chunk], chunk, device)
        return
    ready = queue.Queue(maxsize=3)

    def produce():
        for chunk in chunks:
            ready.put(_to_device(images[chunk], chunk, device))
        ready.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ready.get()) is not None:
        yield item


def compile_or_eager(model, say, quiet=False, backend='inductor'):
    """torch.compile the model (or function) if the toolchain allows it, else keep it eager.

    Compiling happens at the first call: a compiler that fails there (no C compiler, no
    Triton for this GPU) makes that code run eager, with a warning, instead of stopping the
    run (dynamo's suppress_errors).  Shapes are static: one graph per batch size, which is
    why training drops the epoch's last, smaller batch and evaluation compiles its last batch
    once.
    """
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True
        return torch.compile(model, dynamic=False, backend=backend)
    except Exception as error:  # compile support varies by platform: never fatal
        if not quiet:
            say(f'note: torch.compile unavailable ({type(error).__name__}); running eager')
        return model
