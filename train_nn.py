#!/usr/bin/env python
"""Train a network from a config module (e.g. configs/c_512_5x5_32_ram.py)."""
import click

from retina.core.errors import handle_errors
from retina.core.options import (CONTEXT_SETTINGS, PRECISION_AUTO_TRAINING, cnf_option,
                                 compile_option, device_option, labels_option, no_progress_option,
                                 precision_option, seed_option, train_dir_option, weights_option)
from retina.model import config as config_module


@click.command(context_settings=CONTEXT_SETTINGS)
@cnf_option('The net to train.', required=True)
@weights_option('Start from these weights: every parameter whose name and shape match is copied, '
                'the rest are listed as skipped (e.g. weights/c_128_5x5_32/weights.pt); a '
                'released model fine-tunes.', default_text=None)
@train_dir_option(aliases=('--directory',))
@labels_option("the training labels [default: the config's labels].")
@click.option('--resume', is_flag=True,
              help='Continue the interrupted run of this config from weights/CNF/last.pt, on the '
                   'data folders it was started with; a config changed since is refused, naming '
                   'the keys.')
@click.option('--max_epochs', type=click.IntRange(min=1),
              help='Stop after this many epochs in all (short runs); the schedule still applies.')
@device_option()
@seed_option('of sampling, augmentation, dropout and initialisation.')
@click.option('--deterministic', is_flag=True,
              help='Use deterministic algorithms only (reproducible, maybe slower on GPU).')
@compile_option("The augmentation is compiled too, and the epoch's last, smaller batch is left "
                'out (a new shape would compile again).')
@click.option('--cuda_graphs', is_flag=True,
              help='Compile with CUDA graphs too (torch.compile mode "reduce-overhead"): each '
                   "step's kernels replay from one launch, for small batches (the 512-px "
                   "configs' 32 and 48) that leave a fast GPU waiting on kernel launches.  One "
                   'CUDA GPU, compiled; more GPU memory (a graph per batch shape).  See '
                   'BENCHMARKS.md.')
@click.option('--split_batch', is_flag=True,
              help="Under torchrun: split the config's batch_size_train between the processes "
                   '(the global batch and learning rates exactly as the config says).  Without '
                   'it each process trains on the whole batch_size_train, so N GPUs train on '
                   "N × batch per step with the schedule's learning rates unchanged; for that "
                   'larger batch the linear scaling rule (rates × N in the schedule) is the usual '
                   'starting point.')
@click.option('--cache_on_device', type=click.Choice(['auto', 'yes', 'no']), default='auto',
              show_default=True,
              help='Keep the uint8 image cache in GPU memory (auto: when it fits).')
@precision_option(PRECISION_AUTO_TRAINING,
                  'Weights, batch-norm statistics, the loss and the optimizer state stay fp32 '
                  'either way, so a run can be resumed under another precision.  Recorded in the '
                  'checkpoints and config.json.')
@click.option('--hold_out', type=click.FloatRange(0, 0.5, max_open=True), metavar='FRACTION',
              help='Keep about this fraction of the patients (e.g. 0.15) out of training and '
                   'validation as a test split that nothing is tuned on: a fixed rule on the '
                   'patient id alone (retina.data.labels.held_out: both eyes together, the same '
                   'patients in every folder and run), so that scripts after training can score '
                   "the same patients.  Recorded as the config's hold_out; --resume keeps the "
                   "run's.  [default: the config's hold_out, or none]")
@click.option('--schedule', metavar='EPOCH:RATE,...',
              help="Replace the config's learning-rate schedule, e.g. "
                   "0:0.001,60:0.0001,81:stop (a compressed schedule for a short run on a "
                   'CPU: the same rates, the drop and the stop sooner).  Recorded in '
                   'config.json and the checkpoints.  With --resume it replaces the rest of '
                   "the run's schedule (epochs already trained are kept).  [default: the "
                   "config's schedule]")
@click.option('--summary', is_flag=True,
              help='Print every layer with its output shape and parameter count, then exit.')
@no_progress_option()
@handle_errors(resume_hint='Continue with: python train_nn.py --cnf {cnf} --resume')
def main(cnf, weights_from, train_dir, labels, resume, max_epochs, device, seed, deterministic,
         compile_model, cuda_graphs, split_batch, cache_on_device, precision, hold_out, schedule,
         summary, no_progress):
    """Train the network of config CNF on its train_dir and labels.

    Writes, under weights/CNF/: weights.pt (best validation kappa),
    best/ (each new best validation loss), epochs/ (every 5 epochs),
    weights_final.pt (end of schedule), last.pt (for --resume), log.csv and
    config.json.  A new run (without --resume) moves an earlier run's files
    to weights/CNF.earlier-TIME/ when its own first epoch ends (a run that
    fails sooner leaves them in place).  weights/CNF/run.lock keeps a second
    run of the config out while one runs.  Run under torchrun for several GPUs:
    batch_size_train is then per process (see --split_batch for the learning rate).
    """
    config = config_module.load(cnf)
    given = {k: v for k, v in (('train_dir', train_dir), ('labels', labels),
                               ('hold_out', hold_out)) if v is not None}
    if schedule is not None:
        given['schedule'] = config_module.parse_schedule(schedule)
    config.cnf.update(given)
    if summary:
        from retina.model.nets import format_summary
        click.echo(format_summary(config.build_net(), config.name))
        return
    from retina.train.loop import train
    from retina.train.runs import resumed_config
    if resume:  # the run's own folders and settings, or an error naming what changed
        config = resumed_config(config, given)
        if schedule is not None:
            click.echo(f'note: the rest of the run follows --schedule {schedule}')
    train(config, weights_from=weights_from, resume=resume, max_epochs=max_epochs,
          device=device, seed=seed, deterministic=deterministic, compile_model=compile_model,
          cache_on_device=cache_on_device, progress=not no_progress, echo=click.echo,
          split_batch=split_batch, cuda_graphs=cuda_graphs, precision=precision)


if __name__ == '__main__':
    main()
