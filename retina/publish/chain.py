"""Release a chain into models/: blend.py's fitted blend over nets released before it, with
its card and an index entry naming the nets and the one predict.py --fast grades with alone.

    python -m retina.release multi-chain --chain multi-128 --chain multi-256 \\
        --blend data/sub_..._blend.pt --figures chain_figures.md --default

The blend must have been fitted on those very nets' features: each of its feature files is
matched to a released net by config and weights fingerprint, and every net must feed it.
"""
import shlex
import sys
from pathlib import Path

import click

from retina.core import atomic
from retina.core.errors import UserError
from retina.model import checkpoint, released

CHAIN_CARD = """# Released chain `{name}`

{summary}

**Not a medical device.** A research reproduction of a 2015 competition solution. It has not
been validated for clinical use; do not use its grades to make decisions about anyone's care.

| | |
| --- | --- |
| file | `models/{file}` (the fitted blend, {kilobytes:.0f} kB, sha256 `{sha256}`) |
| nets | {nets} |
| features | per net, {stats} of its last conv features over {tta} |
| blend | blend.py's {runs}{per_patient}; levels cut at {cuts} |
| fast | `predict.py --fast` grades with `{fast}` alone, on its centred window |

`predict.py` grades with the chain when it is the default, or by `--blend {name}`: each net
computes its features of every photograph over the TTA views above, and the blend scores each
eye{pairing}.

## Figures on held-out patients
{figures}

## Use
```
python predict.py photos/ --blend {name}
python predict.py photos/ --blend {name} --report report.html
python predict.py photos/ --weights_from {fast}
```

## Rebuild
{rebuild}
"""


def release_chain(name, nets, fast, blend, figures, summary, make_default, models_dir):
    """Release blend.py's fitted `blend` over the released `nets` as chain `name`: the blend file
    as models/NAME.pt, a card, and an index entry naming the nets and the --fast one."""
    from retina.blend import fitted
    state = fitted.load(blend)
    models = released.index(models_dir)['models']
    for net in nets:
        if net not in models or 'nets' in models[net]:
            raise UserError(f'--chain {net}: not a released net of {models_dir} (release it '
                            f'first: python -m retina.release {net} --weights ...)')
    fast = fast or nets[-1]
    if fast not in nets:
        raise UserError(f'--fast {fast}: not one of the chain\'s nets ({", ".join(nets)})')
    fingerprints = {net: checkpoint.load_net(models[net]['config'],
                                             released.verified(net, models_dir)).fingerprint
                    for net in nets}
    used = set()
    for entry in fitted.entries(state):
        matching = [net for net in nets if models[net]['config'] == entry['cnf'] and
                    entry['fingerprint'] in (None, fingerprints[net])]
        if not matching:
            raise UserError(f'{blend}: fitted on features of {entry["cnf"]} made with '
                            f'{entry["weights"] or "unrecorded weights"}, which are none of the '
                            f'released nets {", ".join(nets)}; release those weights first')
        used.add(matching[0])
    if set(nets) - used:
        raise UserError(f'{blend}: not fitted on features of {", ".join(sorted(set(nets) - used))}'
                        f'; name only the nets the blend was fitted with')
    target = models_dir / f'{name}.pt'
    atomic.write_bytes(target, Path(blend).read_bytes())
    digest = released.sha256_of(target)
    entries = fitted.entries(state)
    ttas = sorted({f'{e["n_iter"]} views' for e in entries})
    stats = {e['stat'] for e in entries}
    runs = state['runs']
    card = CHAIN_CARD.format(
        name=name, summary=summary or f'The blend of {", ".join(nets)}.', file=target.name,
        kilobytes=target.stat().st_size / 1e3, sha256=digest,
        nets=', '.join(f'`{n}` ({models[n]["config"]}, card `models/{models[n]["card"]}`)'
                       for n in nets),
        stats='the mean and standard deviation' if stats == {'mean', 'std'} else
        f'the {stats.pop()} alone' if len(stats) == 1 else ' and '.join(sorted(stats)),
        tta=' and '.join(ttas) + ' (transform.py --n_iter)',
        runs=f'{len(runs)} run(s) of {sum(len(r["nets"]) for r in runs)} small nets',
        per_patient=' per patient (this eye, the other eye, a right-eye flag)'
        if state['per_patient'] else '',
        pairing=' together with the other eye of its patient where both are among the '
                'photographs, alone otherwise' if state['per_patient'] else '',
        cuts=' '.join(f'{c:.3f}' for c in state['thresholds']), fast=fast,
        figures=Path(figures).read_text() if figures else '(none given)',
        rebuild='```\npython -m retina.release ' + shlex.join(sys.argv[1:]) + '\n```')
    card_path = models_dir / f'{name}.md'
    atomic.write_text(card_path, card)
    released.write_index(models_dir, name, dict(file=target.name, sha256=digest, card=card_path.name,
                                       nets=list(nets), fast=fast,
                                       summary=summary or card.splitlines()[2]), make_default)
    click.echo(f'released chain {name}: {target} (sha256 {digest[:16]}…) over '
               f'{", ".join(nets)}, card {card_path}')
