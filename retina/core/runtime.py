"""Where the work runs: the device, the processes of a multi-GPU run, and how images get there.

Training, feature extraction, the heat maps and prediction all share these:
`setup_runtime` picks the device (and joins torchrun's process group),
`place_images` keeps a uint8 image cache on the GPU when it fits, and
`batches` streams batches of it to the device.
"""
import gc
import os
import queue
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from retina.core.errors import UserError
from retina.core.precision import resolve_precision

GPU_EVAL_BATCH = 512  # validation and feature batches on a GPU: no gradients, bf16, < 10 GB


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    eval_limit: int = 0  # the evaluation batch that fits, once a larger one ran out of memory
    # 'auto', 'bf16' or 'fp32' (resolve_precision); '' keeps what came before the option:
    # bf16 on a GPU, fp32 on the CPU (grading and heat maps, whose figures tests compare)
    precision: str = ''

    def __post_init__(self):
        self.precision = resolve_precision(self.precision or
                                           ('bf16' if self.cuda else 'fp32'), self.device)

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
    def bf16(self):
        return self.precision == 'bf16'

    @property
    def input_dtype(self):
        """The network input's dtype: bf16 under bf16 autocast (what the autocast convolutions
        read, so the augmentation writes it directly), float32 otherwise."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self):
        """The context the net's forward pass runs in: bf16 autocast or none (`precision`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def eval_batch_size(self, cnf):
        """Images per validation or feature batch: the config's batch_size_test, at least
        GPU_EVAL_BATCH on a GPU (a batch of 32 leaves an H100 waiting on kernel launches), at
        most `eval_limit` once a batch ran out of memory (`smaller_batch`)."""
        size = max(cnf['batch_size_test'], GPU_EVAL_BATCH) if self.cuda else cnf['batch_size_test']
        return min(size, self.eval_limit) if self.eval_limit else size


def smaller_batch(error, batch_size, runtime, what):
    """The batch to try after out-of-memory `error` at `batch_size` images: half of it,
    kept as `runtime.eval_limit` for the evaluations that follow, with a note; `error`
    itself when a single image did not fit.  Each new size compiles again (a compiled net):
    past dynamo's recompile limit, new sizes run eager, slower but the same.  Call
    `release_memory` once the handler has ended."""
    from tqdm import tqdm
    if batch_size <= 1:
        raise error
    runtime.eval_limit = batch_size // 2
    tqdm.write(f'note: {what}: {batch_size} images per batch do not fit in memory; trying '
               f'{runtime.eval_limit}', file=sys.stderr)
    return runtime.eval_limit


def release_memory(runtime):
    """After an out-of-memory error has been handled: free what the failed batch held.  The
    collection breaks the cycle between an error raised in the host-batch thread and the
    frames of its traceback (it would keep the queued batches alive); the GPU's cache then
    goes back to the device, so that the smaller batch starts from unfragmented memory."""
    gc.collect()
    if runtime.cuda:
        torch.cuda.empty_cache()


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


def setup_runtime(requested='auto', precision='auto'):
    """One process per device (computing in `precision`, see `resolve_precision`); under
    torchrun, join the process group."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if 'OMP_NUM_THREADS' not in os.environ:  # never more threads than the cores we may use
        torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))
                                         // world)))
    if world == 1:
        return Runtime(resolve_device(requested), precision=precision)
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(requested)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Runtime(device, rank, world, precision=precision)


def place_images(images, runtime, cache_on_device):
    """Keep the uint8 cache on the GPU when it fits (or when asked), else on the host."""
    if not runtime.cuda or cache_on_device == 'no':
        return images
    free, _ = torch.cuda.mem_get_info(runtime.device)
    if cache_on_device == 'yes' or images.nbytes < 0.4 * free:
        return torch.from_numpy(np.ascontiguousarray(images)).to(runtime.device)
    return images


PREFETCH = 2  # host batches copied ahead of the one the GPU is working on


def host_tensor(images):
    """A torch view of a host cache (a read-only memory map), without a copy: it is only
    read from."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        return torch.from_numpy(images)


def gather(host, chunk, out=None):
    """Rows `chunk` of the host cache `host` (a `host_tensor`) as one (n, 3, S, S) tensor.

    One `index_select`, which ATen spreads over its intra-op threads (a 512-px
    batch is 25 MB: numpy's fancy indexing copies it in one thread, and the old
    path copied it a second time into pinned memory); into `out` (a pinned
    buffer for the GPU) when given.
    """
    index = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
    if out is None:  # numpy's allocator asks for huge pages, torch's CPU one does not: the
        # first-touch page faults of a fresh torch tensor doubled a 400-MB batch's time
        out = torch.from_numpy(np.empty((len(index), *host.shape[1:]), dtype=np.uint8))
    return torch.index_select(host, 0, index, out=out[:len(index)])


def batches(images, indices, batch_size, device):
    """Yield (uint8 batch, index tensor), both on `device`.

    From a device-resident cache the batch is gathered on the device and the
    indices travel once per epoch.  From a host cache batches are gathered in
    index order (`gather`); for a GPU, ahead of time in a thread, into pinned
    buffers, and copied on a stream of their own (`_prefetched`), so that the
    copy overlaps the previous batch's compute.
    """
    if isinstance(images, torch.Tensor) and images.device.type != 'cpu':
        on_device = torch.as_tensor(np.asarray(indices), device=images.device)
        for chunk in on_device.split(batch_size):
            yield images[chunk], chunk
        return
    host = images if isinstance(images, torch.Tensor) else host_tensor(images)
    chunks = [np.sort(np.asarray(indices[i:i + batch_size], dtype=np.int64))
              for i in range(0, len(indices), batch_size)]
    if device.type != 'cuda':
        for chunk in chunks:
            yield gather(host, chunk), torch.from_numpy(chunk)
    elif chunks:
        yield from _prefetched(host, chunks, device)


def _prefetched(host, chunks, device, depth=PREFETCH):
    """The GPU batches of `chunks` from the host cache, prepared by a producer thread.

    The thread gathers each batch into one of depth + 2 pinned buffers and copies it
    to the GPU on a side stream, recording an event; the consumer's stream waits for
    that event (the host does not) and `record_stream` keeps the allocator from
    reusing the batch's memory while the consumer's stream still reads it.  A
    pinned buffer is refilled only after its last copy has completed.  An error in
    the thread is raised in the consumer; a consumer that stops early stops it.
    """
    slots = [torch.empty((max(map(len, chunks)), *host.shape[1:]),  # the largest batch
                         dtype=host.dtype, pin_memory=True) for _ in range(depth + 2)]
    copied = [None] * len(slots)  # per buffer: the event of its last copy to the GPU
    stream = torch.cuda.Stream(device)
    ready, stop = queue.Queue(maxsize=depth), threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                for k, chunk in enumerate(chunks):
                    slot = k % len(slots)
                    if copied[slot] is not None:
                        copied[slot].synchronize()
                    pinned = gather(host, chunk, slots[slot])
                    batch = pinned.to(device, non_blocking=True)
                    index = torch.from_numpy(chunk).to(device)
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record(stream)
                    if not put((batch, index, copied[slot])):
                        return
        except BaseException as error:  # raised again in the consumer
            put(error)
            return
        put(None)

    worker = threading.Thread(target=produce, daemon=True, name='host-batches')
    worker.start()
    current = torch.cuda.current_stream(device)
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            batch, index, event = item
            current.wait_event(event)
            batch.record_stream(current)
            index.record_stream(current)
            yield batch, index
    finally:
        stop.set()
        worker.join(timeout=10)


CUDA_GRAPHS = 'reduce-overhead'  # torch.compile's mode that records CUDA graphs


def new_step(cuda_graphs):
    """Mark the start of a training step or evaluation batch for CUDA graphs: the outputs of
    the previous replay may be overwritten from here on (they have been used or copied)."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def check_cuda_graphs(runtime, compile_model):
    """CUDA graphs come from the compiler, on one CUDA GPU: anything else is a UserError."""
    if not runtime.cuda:
        raise UserError(f'--cuda_graphs: CUDA graphs need a CUDA GPU, and this run is on '
                        f'{runtime.device}; leave --cuda_graphs out')
    if not compile_model:
        raise UserError('--cuda_graphs: the graphs are recorded by torch.compile; leave out '
                        '--no_compile (or --cuda_graphs)')
    if runtime.distributed:
        raise UserError('--cuda_graphs: for one process only; under torchrun each GPU has the '
                        "config's whole batch, large enough to keep it busy: leave it out")


def note_cuda_graph_skips(say):
    """After the first epoch with CUDA graphs: say if the compiler ran parts of the step
    without them (its own count; a CPU tensor or an unsupported op in a graph), which costs
    speed, not correctness."""
    from torch._dynamo.utils import counters
    skipped = counters['inductor']['cudagraph_skips']
    if skipped:
        say(f'note: --cuda_graphs: the compiler ran {skipped} compiled part(s) without CUDA '
            f'graphs (slower, still correct); TORCH_LOGS=perf_hints shows why')
    return skipped


def compile_or_eager(model, say, quiet=False, backend='inductor', mode=None):
    """torch.compile the model (or function) if the toolchain allows it, else keep it eager.

    `mode` 'reduce-overhead' also records CUDA graphs (`CUDA_GRAPHS`): each shape's kernels
    replay from one launch, for batches too small to keep a GPU busy one launch at a time.

    Compiling happens at the first call: a compiler that fails there (no C compiler, no
    Triton for this GPU) makes that code run eager, with a warning, instead of stopping the
    run (dynamo's suppress_errors).  Shapes are static: one graph per batch size, which is
    why training drops the epoch's last, smaller batch and evaluation compiles its last batch
    once.
    """
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True
        return torch.compile(model, dynamic=False, backend=backend,
                             **({'mode': mode} if mode else {}))
    except Exception as error:  # compile support varies by platform: never fatal
        if not quiet:
            say(f'note: torch.compile unavailable ({type(error).__name__}); running eager')
        return model
