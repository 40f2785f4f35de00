#!/usr/bin/env python
"""Train a network from a config module (e.g. configs/c_512_5x5_32_ram.py)."""
import click

from retina.core.errors import handle_errors
from retina.core.precision import PRECISIONS, PRECISION_HELP
from retina.model import config as config_module


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--cnf', required=True, metavar='CONFIG',
              help='Config module: a path like configs/c_128_5x5_32.py or a name like c_128_5x5_32.')
@click.option('--weights_from', type=click.Path(dir_okay=False),
              help='Start from these weights: every parameter whose name and shape match is '
                   'copied, the rest are listed as skipped (e.g. weights/c_128_5x5_32/weights.pt); '
                   'a released model\'s name (models/index.json, e.g. eyepacs-128) fine-tunes it.')
@click.option('--train_dir', type=click.Path(file_okay=False),
              help="Folder of converted training images [default: the config's train_dir].")
@click.option('--labels', type=click.Path(dir_okay=False),
              help="Labels CSV with columns image,level [default: the config's labels].")
@click.option('--resume', is_flag=True,
              help='Continue the interrupted run of this config from weights/CNF/last.pt, on the '
                   'data folders it was started with; a config changed since is refused, naming '
                   'the keys.')
@click.option('--max_epochs', type=click.IntRange(min=1),
              help='Stop after this many epochs in all (short runs); the schedule still applies.')
@click.option('--device', default='auto', show_default=True,
              help='auto (CUDA if present), cpu, cuda or cuda:N.')
@click.option('--seed', default=0, show_default=True, type=click.IntRange(0, 2 ** 63 - 1),
              help='Seed for sampling, augmentation, dropout and initialisation.')
@click.option('--deterministic', is_flag=True,
              help='Use deterministic algorithms only (reproducible, maybe slower on GPU).')
@click.option('--compile/--no_compile', 'compile_model', default=None,
              help='torch.compile the network and the augmentation [default: on a GPU yes, on '
                   'the CPU no].  A compiler that fails falls back to eager with a warning; '
                   "compiled, the epoch's last, smaller batch is left out (a new shape would "
                   'compile again).')
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
@click.option('--precision', type=click.Choice(PRECISIONS), default='auto', show_default=True,
              help=PRECISION_HELP + '  Recorded in the checkpoints and config.json.')
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
@click.option('--no_progress', is_flag=True, help='No progress bars (for logs).')
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
