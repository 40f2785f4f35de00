"""The arithmetic a run computes in: bf16 autocast or fp32 (train_nn.py and transform.py
--precision; its help text, per script, is retina.core.options.precision_help).  Without
torch, so that the scripts' --help stays quick."""
from retina.core.errors import UserError

PRECISIONS = ('auto', 'bf16', 'fp32')


def cpu_has_native_bf16():
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16, as /proc/cpuinfo
    says on Linux): there, oneDNN's bf16 convolutions are about twice as fast as fp32; on
    other CPUs bf16 is emulated and slower.  Unknown (no /proc/cpuinfo) counts as no."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '').split()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def resolve_precision(requested, device):
    """'auto', 'bf16' or 'fp32' on `device` (a torch.device) -> 'bf16' or 'fp32'
    (retina.core.options.PRECISION_AUTO_TRAINING says what 'auto' is)."""
    if requested not in PRECISIONS:
        raise UserError(f'unknown precision {requested!r}; use {", ".join(PRECISIONS)}')
    if requested != 'auto':
        return requested
    return 'bf16' if device.type == 'cuda' or cpu_has_native_bf16() else 'fp32'
