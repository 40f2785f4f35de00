"""The run folder weights/NAME/ of a training run: what is written after each epoch and when
(`Keeper`), the log, starting a new run (the earlier one moved aside: `begin_run`),
resuming one (`resumed_config`, `resume_state`), and the message of a run that diverged.
retina/train/loop.py holds the loop; this module holds the policy around it."""
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from retina.core import atomic, paths
from retina.core.errors import UserError
from retina.core.metrics import few_images_warning
from retina.core.plots import training_curves
from retina.model import checkpoint
from retina.model.config import lr_for_epoch, to_jsonable

LOG_COLUMNS = ('epoch', 'train_loss', 'valid_loss', 'valid_kappa', 'lr', 'seconds',
               'images_per_s')
SAVE_EVERY = 5


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
class Start:
    """Where a run starts: epoch 1 of a new run, or the epoch after the one in last.pt."""
    epoch: int = 1
    best_kappa: float = -math.inf
    best_loss: float = math.inf
    seed: int = 0
    log_rows: list = field(default_factory=list)
    resumed: bool = False


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
                    preprocessing=self.run.preprocessing, encoding=self.run.encoding,
                    precision=self.run.runtime.precision)

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
                 + (few_images_warning(n_valid) if n_valid else ''))

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
        photos' check (`feature_stats.FeatureStats`), written into weights.pt and
        weights_final.pt: fitted on the training split, the threshold from the validation
        split (the training split's own where there is none)."""
        from retina.model.feature_stats import attach_feature_stats
        run = self.run
        if len(run.train_idx) < 2:
            return
        valid = run.valid_idx if len(run.valid_idx) else run.train_idx
        for path in (paths.best_kappa_weights(self.name), paths.final_weights(self.name)):
            if path.is_file():
                attach_feature_stats(path, run.images, run.train_idx, valid, run.runtime,
                                     levels=run.levels)


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
