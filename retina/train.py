"""Training a config's network the way the original did, on CPU, one GPU or many.

Per epoch: a class-balanced resample of the training images, augmentation on
the device that holds the batch, MSE on the level, Nesterov momentum, then
validation MSE and kappa on 10% of the patients.  `train` reads like the
epoch loop of torchvision's reference script: `set_up` (data, net, optimizer),
the start state (`fresh_start` or `resume_state`), then per epoch `one_epoch`
(the plain functions `train_one_epoch` and `evaluate`) and one call to the
`Keeper`, which holds the checkpoint policy and the log.

Everything random in an epoch is seeded from (seed, epoch, rank), so a run
resumed from `last.pt` gives the same result as an uninterrupted one.
Multi-GPU runs use DistributedDataParallel under torchrun (gloo on the CPU).
"""
import contextlib
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from retina import atomic, cache, checkpoint, data, lock, paths, preprocess
from retina.augment import constants_for, place_constants, prepare_batch, random_params
from retina.config import lr_for_epoch, to_jsonable
from retina.errors import UserError
from retina.plots import training_curves
from retina.runtime import (CUDA_GRAPHS, Runtime, batches, check_cuda_graphs, compile_or_eager,
                            new_step, note_cuda_graph_skips, place_images, release_memory,
                            setup_runtime, smaller_batch)

LOG_COLUMNS = ('epoch', 'train_loss', 'valid_loss', 'valid_kappa', 'lr', 'seconds',
               'images_per_s')
SAVE_EVERY = 5


class Diverged(Exception):
    """The training loss became NaN or infinite."""


def make_optimizer(model, cnf, lr):
    """Nesterov SGD; L2 on conv and dense weights only (Lasagne's `regularizable`: not biases,
    not batch-norm scales), with Lasagne's λ·Σw² (gradient 2λw)."""
    weights = [p for p in model.parameters() if p.ndim > 1 and p.ndim != 3]
    others = [p for p in model.parameters() if not (p.ndim > 1 and p.ndim != 3)]
    return torch.optim.SGD([dict(params=weights, weight_decay=2 * cnf['weight_decay']),
                            dict(params=others, weight_decay=0.0)],
                           lr=lr, momentum=cnf['momentum'], nesterov=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def epoch_seed(seed, epoch, rank=0):
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_one_epoch(model, optimizer, images, levels, indices, config, runtime, generator,
                    progress=True, sync_every=20, description='train', prepare=prepare_batch,
                    batch_size=None, drop_last=False, cuda_graphs=False):
    """One pass over `indices` (this rank's share of the epoch's sample); returns metrics.

    `prepare` turns a uint8 batch and its augmentation parameters into the
    network's input (`prepare_batch`, or a torch.compile'd copy of it).
    `batch_size` is this process's [default: the config's batch_size_train];
    `drop_last` leaves out the epoch's last, smaller batch (a compiled net would
    compile again for its shape); `cuda_graphs` says that the net and `prepare` replay CUDA
    graphs (`compile_or_eager` with CUDA_GRAPHS), whose outputs live until the next step.
    """
    cnf = config.cnf
    constants = constants_for(cnf)  # the config's mean, std and colour PCA [default: Kaggle]
    place_constants(runtime.device, constants)  # before `prepare`, which may be compiled
    model.train()
    batch_size = batch_size or cnf['batch_size_train']
    if drop_last and len(indices) > batch_size:
        indices = indices[:len(indices) - len(indices) % batch_size]
    levels_device = torch.as_tensor(levels, dtype=torch.float32, device=runtime.device)
    total_loss = torch.zeros((), device=runtime.device)
    seen, start = 0, time.perf_counter()
    steps = math.ceil(len(indices) / batch_size)
    bar = tqdm(total=len(indices) * runtime.world, desc=description, unit='img', leave=False,
               disable=not (progress and runtime.main), dynamic_ncols=True)
    # closing: a loop left by an exception (a NaN loss) stops the host-cache thread at once
    with contextlib.closing(batches(images, indices, batch_size, runtime.device)) as stream:
        for step, (batch, chunk) in enumerate(stream):
            new_step(cuda_graphs)
            params = random_params(len(chunk), cnf['aug_params'], cnf['sigma'], generator,
                                   runtime.device)
            x = prepare(batch, config.input_size, params, dtype=runtime.input_dtype,
                        memory_format=torch.channels_last, constants=constants)
            target = levels_device[chunk]
            with runtime.autocast():
                out = model(x)
            loss = F.mse_loss(out.float().squeeze(1), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(chunk)
            seen += len(chunk)
            # Reading the loss back stalls the GPU: do it once every `sync_every` steps.
            if (step + 1) % sync_every == 0 or step + 1 == steps:
                mean_loss = total_loss.item() / seen
                if not math.isfinite(mean_loss):
                    bar.close()
                    raise Diverged(f'the training loss became NaN (step {step + 1})')
                rate = seen * runtime.world / (time.perf_counter() - start)
                bar.set_postfix(loss=f'{mean_loss:.4f}', img_s=f'{rate:.0f}')
            bar.update(len(chunk) * runtime.world)
    bar.close()
    loss = total_loss / max(seen, 1)
    if runtime.distributed:
        dist.all_reduce(loss)
        loss /= runtime.world
    seconds = time.perf_counter() - start
    return dict(train_loss=loss.item(), seconds=seconds,
                images_per_s=seen * runtime.world / max(seconds, 1e-9))


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


def evaluate(model, images, levels, indices, config, runtime, cuda_graphs=False):
    """Validation MSE and kappa over `indices`, shared out between ranks."""
    if len(indices) == 0:
        return dict(valid_loss=float('nan'), valid_kappa=float('nan'))
    mine = indices[runtime.rank::runtime.world]
    predictions = predict(model, images, mine, config, runtime, cuda_graphs=cuda_graphs)
    if runtime.distributed:
        gathered = [None] * runtime.world
        dist.all_gather_object(gathered, (mine, predictions))
        mine = np.concatenate([g[0] for g in gathered])
        predictions = np.concatenate([g[1] for g in gathered])
    truth = np.asarray(levels)[mine]
    return dict(valid_loss=float(np.mean((predictions - truth) ** 2)),
                valid_kappa=data.kappa(truth, predictions))


def epoch_sample(train_indices, levels, epoch, seed, balance_ratio, runtime, weights=None):
    """This rank's share of the epoch's class-balanced resample (same on every rank), from the
    balance `weights` (a config's balance_weights; default: the Kaggle ones)."""
    rng = np.random.default_rng(epoch_seed(seed, epoch))
    picks = data.balanced_sample(levels[train_indices], epoch - 1, rng, ratio=balance_ratio,
                                 weights=weights)
    sample = train_indices[picks]
    usable = len(sample) - len(sample) % runtime.world
    return sample[:usable][runtime.rank::runtime.world]


def write_log(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buffer.getvalue())


def read_log(path):
    """The rows of a run's log.csv; a log edited elsewhere (a spreadsheet's byte-order mark)
    still reads, and one that is not a log is a UserError naming it."""
    if not path.is_file():
        return []
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            int(row['epoch'])
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise UserError(f'{path}: not a training log (expected the columns '
                        f'{",".join(LOG_COLUMNS)} with an epoch number per row; '
                        f'{type(error).__name__}: {error}); restore it, or move it away to '
                        f'start the log again from the resumed epoch') from None
    return rows


@dataclass
class Run:
    """What a run trains with: set up once by `set_up`, the same on every rank."""
    config: object
    runtime: Runtime
    images: object  # uint8 cache, on the host (numpy) or the device (torch)
    levels: np.ndarray
    train_idx: np.ndarray
    valid_idx: np.ndarray
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    preprocessing: str  # convert.py --enhance of the training images: kept in every checkpoint
    batch_size: int  # images per step in this process (`process_batch_size`)


@dataclass
class Start:
    """Where a run starts: epoch 1 of a new run, or the epoch after the one in last.pt."""
    epoch: int = 1
    best_kappa: float = -math.inf
    best_loss: float = math.inf
    seed: int = 0
    log_rows: list = field(default_factory=list)
    resumed: bool = False


def train(config, weights_from=None, resume=False, max_epochs=None, device='auto', seed=0,
          deterministic=False, compile_model=None, cache_on_device='auto', progress=True,
          echo=print, split_batch=False, cuda_graphs=False, precision='auto'):
    """Train `config`'s net; returns a dict with the final epoch and the best metrics.

    `precision` is runtime.PRECISIONS' (bf16 autocast or fp32; recorded in the checkpoints).
    `compile_model` None compiles on a GPU and not on the CPU; `cuda_graphs` compiles with
    CUDA graphs (one GPU only: `check_cuda_graphs`).  Under torchrun each process
    trains on the config's batch_size_train, or on its share of it with `split_batch`.  The
    run holds weights/NAME/run.lock from start to end (a second run of the config is refused).
    """
    runtime = setup_runtime(device, precision)
    say = echo if runtime.main else (lambda *a, **k: None)
    compile_model = runtime.cuda if compile_model is None else compile_model
    if cuda_graphs:
        check_cuda_graphs(runtime, compile_model)
    guard = (lock.hold(paths.run_lock(config.name), paths.run_dir(config.name), say)
             if runtime.main else contextlib.nullcontext())
    with guard:
        run = set_up(config, runtime, seed, deterministic, cache_on_device, progress, say,
                     split_batch)
        start = (resume_state(run.model, run.optimizer, config.name, seed, weights_from, say,
                              runtime.precision)
                 if resume else fresh_start(run.model, config.name, seed, weights_from, say))
        keeper = Keeper(run, start, say)
        net, prepare, eval_net = wrap(run.model, runtime, compile_model, say, cuda_graphs)
        say(announcement(run, compile_model, cuda_graphs))
        try:
            for epoch, lr in schedule_epochs(config.cnf['schedule'], start.epoch, max_epochs):
                try:
                    metrics = one_epoch(run, net, prepare, epoch, lr, start.seed, progress,
                                        eval_net, drop_last=compile_model,
                                        cuda_graphs=cuda_graphs)
                except Diverged as what:
                    keeper.wait()  # last.pt of the epoch before is complete before it is named
                    raise diverged(config.name, epoch, str(what), keeper.last_good())
                keeper.end_epoch(epoch, lr, metrics)
                if cuda_graphs and epoch == start.epoch:
                    note_cuda_graph_skips(say)
                if runtime.distributed:
                    dist.barrier()
            result = keeper.finish(max_epochs)
        finally:
            keeper.wait()  # an interrupted run still leaves its last checkpoints whole
        if runtime.distributed:
            dist.barrier()
            dist.destroy_process_group()
        return result


def announcement(run, compiled, cuda_graphs=False):
    """The line that opens a run: images, device, processes, compiled or not."""
    runtime, cnf = run.runtime, run.config.cnf
    return (f'{run.config.name}: {len(run.train_idx)} training / {len(run.valid_idx)} validation '
            f'images ({cnf["train_dir"]}), device {runtime.device}'
            + (f' × {runtime.world} processes, {run.batch_size} images per step each'
               if runtime.distributed else '') + (', compiled' if compiled else '')
            + (' with CUDA graphs' if cuda_graphs else '') + f', {runtime.precision}')


def set_up(config, runtime, seed, deterministic, cache_on_device, progress, say,
           split_batch=False):
    """Seeds and backend flags, the image cache (on the device when it fits), the split,
    the net (channels_last), its optimizer at the first epoch's learning rate and this
    process's batch size (`process_batch_size`)."""
    cnf, name = config.cnf, config.name
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif runtime.cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    image_paths, levels = data.labelled_images(cnf['train_dir'], cnf['labels'], say)
    image_paths, levels = without_held_out(image_paths, levels, cnf.get('hold_out'), say)
    preprocessing = preprocess.folder_method(cnf['train_dir'])
    if runtime.main:  # the main process builds the cache file; the others then read it
        host_images = cache.load_images(image_paths, progress=progress)
    if runtime.distributed:
        dist.barrier()
    if not runtime.main:
        host_images = cache.load_images(image_paths, progress=False)
    cache.check_size(host_images, config.input_size, cnf['train_dir'], name)
    train_idx, valid_idx = data.split_indices([p.stem for p in image_paths], levels)
    # channels_last on the CPU too: oneDNN's convolutions are about 1.3× faster in it.
    model = config.build_net().to(runtime.device).to(memory_format=torch.channels_last)
    return Run(config, runtime, place_images(host_images, runtime, cache_on_device), levels,
               train_idx, valid_idx, model,
               make_optimizer(model, cnf, lr_for_epoch(cnf['schedule'], 1)), preprocessing,
               process_batch_size(cnf, runtime, split_batch))


def without_held_out(image_paths, levels, fraction, say):
    """The images and levels left for training and validation once the test split of
    `fraction` of the patients (`data.held_out`) is kept out."""
    if not fraction:
        return image_paths, levels
    keep = np.array([not data.held_out(p.stem, fraction) for p in image_paths], dtype=bool)
    if not keep.any():
        raise UserError(f'--hold_out {fraction}: every image of {len(image_paths)} is a '
                        f'held-out patient; nothing is left to train on (a smaller fraction)')
    patients = {data.patient_and_eye(p.stem)[0] for p, k in zip(image_paths, keep) if not k}
    say(f'hold-out: {int((~keep).sum())} image(s) of {len(patients)} patient(s) kept out of '
        f'training and validation (test split, hold_out {fraction:g})')
    return [p for p, k in zip(image_paths, keep) if k], levels[keep]


def process_batch_size(cnf, runtime, split_batch=False):
    """Images per training step in this process.

    The config's batch_size_train is per process: under torchrun with N processes a step
    trains on N × batch images (splitting 32 over 8 GPUs left 4 images each, too few to keep
    a GPU busy or for batch norm).  The learning rates of the config's schedule are used as
    they are: for the N-times larger global batch the linear scaling rule (rates × N) is
    the usual starting point; `split_batch` keeps the config's global batch and its
    rates exactly, each process taking batch / N.
    """
    if split_batch:
        return max(1, cnf['batch_size_train'] // runtime.world)
    return cnf['batch_size_train']


def wrap(model, runtime, compile_model, say, cuda_graphs=False):
    """(the net to train, the batch preparation, the net to validate with): compiled if asked
    (recording CUDA graphs with `cuda_graphs`), the first under DDP on many ranks."""
    net, prepare, eval_net = model, prepare_batch, model
    if runtime.distributed:
        if runtime.cuda:  # batch statistics over the global batch, as on one device
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, so
        # no copy into and out of them on every step (and one gradient-sized buffer less).
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.cuda else None,
            gradient_as_bucket_view=True)
    if compile_model:
        mode = CUDA_GRAPHS if cuda_graphs else None
        # DDP first, then compile (PyTorch's advice): the compiler splits the graph at the
        # gradient buckets so that their all-reduce overlaps the backward pass.
        compiled = compile_or_eager(net, say, mode=mode)
        eval_net = (compiled if net is model
                    else compile_or_eager(model, say, quiet=True, mode=mode))
        net = compiled
        # The augmentation too: one fused kernel from uint8 pixels to the standardised input.
        prepare = compile_or_eager(prepare_batch, say, quiet=True, mode=mode)
    return net, prepare, eval_net


def schedule_epochs(schedule, first, max_epochs=None):
    """(epoch, learning rate) from `first` until the schedule says 'stop' or after
    `max_epochs`."""
    epoch = first
    while ((lr := lr_for_epoch(schedule, epoch)) != 'stop'
           and (max_epochs is None or epoch <= max_epochs)):
        yield epoch, lr
        epoch += 1


def one_epoch(run, net, prepare, epoch, lr, seed, progress, eval_net=None, drop_last=False,
              cuda_graphs=False):
    """Train on the epoch's balanced sample, then validate (with `eval_net`, compiled or not,
    default the model itself); returns the epoch's metrics.

    Raises `Diverged` on a NaN training loss or NaN validation predictions.
    """
    runtime, config = run.runtime, run.config
    set_lr(run.optimizer, lr)
    torch.manual_seed(epoch_seed(seed, epoch, runtime.rank))
    generator = torch.Generator(device=runtime.device)
    generator.manual_seed(epoch_seed(seed, epoch, runtime.rank + 7919))
    sample = epoch_sample(run.train_idx, run.levels, epoch, seed, config.cnf['balance_ratio'],
                          runtime, config.cnf.get('balance_weights'))
    metrics = train_one_epoch(net, run.optimizer, run.images, run.levels, sample, config,
                              runtime, generator, progress, description=f'epoch {epoch}',
                              prepare=prepare, batch_size=run.batch_size or None,
                              drop_last=drop_last, cuda_graphs=cuda_graphs)
    if runtime.distributed:
        average_buffers(run.model, runtime.world)
    metrics.update(evaluate(eval_net or run.model, run.images, run.levels, run.valid_idx, config,
                            runtime, cuda_graphs))
    if len(run.valid_idx) and not math.isfinite(metrics['valid_loss']):
        raise Diverged('the validation predictions became NaN or infinite')
    return metrics


class Keeper:
    """The checkpoint and logging policy of a run, as timm's CheckpointSaver and update_summary.

    After each epoch, in the main process: weights.pt at a new best validation kappa,
    best/ at a new best validation loss, epochs/ every SAVE_EVERY epochs, log.csv and
    curves.png, then last.pt; weights_final.pt when the schedule is done.  The weights are
    copied to the host at once and written by a `checkpoint.BackgroundWriter` while the next
    epoch trains; `wait` (before the next epoch's writes, and at the end) joins them.  A new run
    writes nothing until its first epoch has ended (`begin_run`): one that fails in its
    set-up or first epoch leaves the earlier run of the config where it was.
    """

    def __init__(self, run, start, say):
        self.run, self.say, self.main = run, say, run.runtime.main
        self.name = run.config.name
        self.best_kappa, self.best_loss = start.best_kappa, start.best_loss
        self.seed, self.log_rows = start.seed, start.log_rows
        self.epoch = start.epoch - 1  # the last epoch done
        self.fresh = not start.resumed
        self.writer = checkpoint.BackgroundWriter()
        if self.main and start.resumed:
            atomic.write_text(paths.resolved_config(self.name),
                              json.dumps(dict(run.config.resolved(), seed=self.seed,
                                              precision=run.runtime.precision), indent=2))

    def last_good(self):
        """last.pt if this run wrote it (None for a new run that has not finished an epoch)."""
        return None if self.fresh else paths.resume_checkpoint(self.name)

    def _state(self, epoch):
        return dict(model=self.run.model, config=self.run.config, epoch=epoch, seed=self.seed,
                    preprocessing=self.run.preprocessing, precision=self.run.runtime.precision)

    def wait(self):
        """Join the checkpoint writes in flight (raising their error, e.g. a full disk)."""
        self.writer.wait()

    def end_epoch(self, epoch, lr, metrics):
        self.epoch = epoch
        if not self.main:
            return
        self.writer.wait()  # the previous epoch's files are complete before any moves
        if self.fresh:
            begin_run(self.run.config, self.seed, self.say, self.run.runtime.precision)
            self.fresh = False
        name, marks, files = self.name, [], []
        # One host copy of the weights for every file of this epoch (the optimizer's only
        # for last.pt); written in the background, in this order, last.pt last.
        weights = checkpoint.snapshot(**self._state(epoch))
        kappa = metrics['valid_kappa']  # NaN when the validation set is one level only
        if kappa > self.best_kappa or (math.isnan(kappa) and self.best_kappa == -math.inf):
            self.best_kappa = kappa if not math.isnan(kappa) else self.best_kappa
            files.append((paths.best_kappa_weights(name),
                          dict(weights, best_kappa=self.best_kappa)))
            marks.append('best kappa')
        if metrics['valid_loss'] < self.best_loss:
            self.best_loss = metrics['valid_loss']
            files.append((paths.best_loss_weights(name, epoch, self.best_loss), weights))
            marks.append('best loss')
        if epoch % SAVE_EVERY == 0:
            files.append((paths.epoch_weights(name, epoch), weights))
        self.log_rows.append(dict(epoch=epoch, lr=lr, **{k: f'{metrics[k]:.6g}' for k in
                                                          LOG_COLUMNS if k in metrics}))
        write_log(paths.train_log(name), self.log_rows)
        training_curves(self.log_rows, paths.train_curves(name), name)
        # last.pt goes last: a run killed before it is written redoes the whole epoch.
        files.append((paths.resume_checkpoint(name),
                       dict(weights, best_kappa=self.best_kappa, best_loss=self.best_loss,
                            optimizer=checkpoint.host_copy(self.run.optimizer.state_dict()))))
        self.writer.write(files)
        n_valid = len(self.run.valid_idx)
        self.say(f'epoch {epoch:4d}  train loss {metrics["train_loss"]:.4f}  valid loss '
                 f'{metrics["valid_loss"]:.4f}  kappa {metrics["valid_kappa"]:.4f}  lr {lr:g}  '
                 f'{metrics["seconds"]:.1f}s  {metrics["images_per_s"]:.0f} img/s'
                 + (f'  [{", ".join(marks)}]' if marks else '')
                 + (data.few_images_warning(n_valid) if n_valid else ''))

    def finish(self, max_epochs):
        """weights_final.pt if the schedule is done, and the closing line; returns the result."""
        self.writer.wait()
        if self.main and not self.fresh:
            if lr_for_epoch(self.run.config.cnf['schedule'], self.epoch + 1) == 'stop':
                # As the original: weights_final.pt marks a finished schedule.
                checkpoint.save(paths.final_weights(self.name), **self._state(self.epoch),
                                best_kappa=self.best_kappa)
                how = 'the schedule is done'
            else:
                how = (f'--max_epochs {max_epochs}; continue with --resume and a larger '
                       f'--max_epochs, or none')
            self.attach_feature_stats()
            self.say(f'stopped after epoch {self.epoch} ({how}): best valid kappa '
                     f'{self.best_kappa:.4f}, best valid loss {self.best_loss:.4f}; weights in '
                     f'{paths.run_dir(self.name)}')
        return dict(epoch=self.epoch, best_kappa=self.best_kappa, best_loss=self.best_loss,
                    state_dict=checkpoint.unwrap(self.run.model).state_dict())

    def attach_feature_stats(self):
        """The training photographs' feature statistics, for predict.py's 'unlike the training
        photos' check (`gradability.FeatureStats`), written into weights.pt and
        weights_final.pt: fitted on the training split, the threshold from the validation
        split (the training split's own where there is none)."""
        from retina.gradability import attach_feature_stats
        run = self.run
        if len(run.train_idx) < 2:
            return
        valid = run.valid_idx if len(run.valid_idx) else run.train_idx
        for path in (paths.best_kappa_weights(self.name), paths.final_weights(self.name)):
            if path.is_file():
                attach_feature_stats(path, run.images, run.train_idx, valid, run.runtime)


def average_buffers(model, world):
    """Batch-norm running statistics, averaged over the ranks so that every rank (and the
    checkpoint) holds the same net: each rank's last steps updated them from its own batches."""
    for buffer in checkpoint.unwrap(model).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world


def resumed_config(config, given=()):
    """The config to continue the run of `config.name` with.

    The data folders, the test split and the schedule come from the run itself unless
    given again (`given` names the keys the user passed); a schedule given again replaces
    the rest of the run's.  Any other difference between the config
    now and the one the run was started with is an error naming the keys: a resumed
    run continues as it was started, or it would silently become another run.
    """
    last_path = paths.resume_checkpoint(config.name)
    if not last_path.is_file():
        return config  # resume_state says there is nothing to resume
    saved = checkpoint.config_of(checkpoint.load(last_path))
    if 'schedule' in given:  # a new schedule for the rest of the run is allowed
        saved.cnf['schedule'] = config.cnf['schedule']
    for key in ('train_dir', 'labels', 'hold_out', 'schedule'):
        if key not in given:
            if key in saved.cnf:
                config.cnf[key] = saved.cnf[key]
            else:
                config.cnf.pop(key, None)

    def same(key):
        now, then = config.cnf.get(key), saved.cnf.get(key)
        if key in ('train_dir', 'labels') and now and then:
            return Path(now).resolve() == Path(then).resolve()
        return to_jsonable(now) == to_jsonable(then)

    differ = [f'{key} {saved.cnf.get(key)!r} -> {config.cnf.get(key)!r}'
              for key in sorted(set(config.cnf) | set(saved.cnf)) if not same(key)]
    if to_jsonable(config.layers) != to_jsonable(saved.layers):
        differ.append('layers')
    if differ:
        raise UserError(f'{last_path}: the run of {config.name} was started with other settings '
                        f'({"; ".join(differ)}); --resume continues a run as it was started: '
                        f'restore the config (and pass the same --train_dir/--labels, or none), '
                        f'or start a new run without --resume')
    return config


def resume_state(model, optimizer, name, seed, weights_from, say, precision=None):
    """Load weights/NAME/last.pt into model and optimizer; returns where the run stood."""
    last_path = paths.resume_checkpoint(name)
    if not last_path.is_file():
        raise UserError(f'{last_path}: nothing to resume for {name}; run without --resume')
    state = checkpoint.load(last_path)
    if state['config_name'] != name:
        raise UserError(f'{last_path}: belongs to {state["config_name"]}, not {name}')
    checkpoint.load_exact(model, state, last_path, name)
    optimizer.load_state_dict(state['optimizer'])
    start_epoch = state['epoch'] + 1
    if weights_from:
        say(f'note: --weights_from {weights_from} ignored: --resume continues from {last_path}')
    if 'seed' in state and state['seed'] != seed:
        say(f'note: the run was started with --seed {state["seed"]}; it continues with it')
    if precision and state.get('precision', precision) != precision:  # weights and momentum
        # are fp32 under either precision: only the arithmetic of the steps to come changes
        say(f'note: the run computed in {state["precision"]} until epoch {state["epoch"]}; it '
            f'continues in {precision} (--precision {state["precision"]} keeps it)')
    say(f'resuming {name} at epoch {start_epoch} from {last_path}')
    return Start(epoch=start_epoch, best_kappa=state['best_kappa'],
                 best_loss=state['best_loss'], seed=state.get('seed', seed),
                 log_rows=[r for r in read_log(paths.train_log(name))
                           if int(r['epoch']) < start_epoch], resumed=True)


def fresh_start(model, name, seed, weights_from, say):
    """Start a new run: copy matching weights in (the earlier run moves aside in `begin_run`)."""
    if weights_from:  # read before the move: the file may lie in the earlier run's folder
        state = checkpoint.load(weights_from)
        copied, skipped = checkpoint.load_matching(model, state, weights_from)
        source = state.get('config_name')
        say(f'loaded {len(copied)} parameter(s) from {weights_from}'
            + (f' (weights of {source})' if source and source != name else ''))
        for line in skipped:
            say(f'  skipped {line}')
    return Start(seed=seed)


def begin_run(config, seed, say, precision):
    """The first write of a new run: move an earlier run's files aside, record the config.

    Everything but the lock moves (the lock stays, held, in the run folder), into a
    weights/NAME.earlier-TIME folder of its own.
    """
    name = config.name
    run, held = paths.run_dir(name), paths.run_lock(name).name
    earlier_files = sorted(p for p in run.iterdir() if p.name != held) if run.is_dir() else []
    if earlier_files:
        earlier = atomic.new_folder(paths.earlier_run_dir(name))
        for path in earlier_files:
            path.rename(earlier / path.name)
        say(f'note: moved the earlier run of {name} to {earlier} (use --resume to continue a '
            f'run instead of starting over)')
    atomic.write_text(paths.resolved_config(name),
                      json.dumps(dict(config.resolved(), seed=seed, precision=precision),
                                 indent=2))


def diverged(name, epoch, what, last_path):
    """The UserError for a run that produced NaN: where the last good weights are.

    `last_path` is None for a new run that has not finished an epoch: any last.pt
    in the folder belongs to the earlier run, which is left as it was.
    """
    if last_path is not None and last_path.is_file():
        kept = f'the last good weights are in {last_path} (epoch {epoch - 1})'
    elif last_path is None and paths.resume_checkpoint(name).is_file():
        kept = (f'no epoch completed, so no weights were saved; the earlier run in '
                f'{paths.run_dir(name)} is left as it was')
    else:
        kept = 'no epoch completed, so no weights were saved'
    return UserError(f'{name}: {what} at epoch {epoch}; stopped: {kept}. Lower the learning '
                     f'rate in the schedule')
