"""What the Cloud TPU API accepts and reports: accelerator types, runtime versions, states, stock-out errors.

Facts from Google's Cloud TPU documentation and the TPU API (v2) reference, as of late 2026:
- Generations (AcceleratorConfig.Type): v2, v3, v4, v5p, v5e (spelt `v5litepod` in accelerator types) and v6e.
  The suffix counts TensorCores for v2, v3, v4 and v5p (2 per chip, 8 per host) and chips for v5litepod
  and v6e, whose slices are 1, 4, 8, 16, 32, 64, 128 or 256 chips (2D shapes 1x1 ... 16x16).
- TPU7x (Ironwood) is not offered through the Cloud TPU API (`gcloud compute tpus`) that this launcher
  uses; Google offers it through GKE and Compute Engine.
- JAX runtimes ("software versions"): v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5e),
  tpu-ubuntu2204-base (v4 and older).
"""
import re

_CHIP_COUNTED = ('v5litepod', 'v6e')
_CORE_COUNTED = ('v2', 'v3', 'v4', 'v5p')
_CHIP_SLICES = (1, 4, 8, 16, 32, 64, 128, 256)
_RUNTIME_BY_GENERATION = {'v6e': 'v2-alpha-tpuv6e', 'v5p': 'v2-alpha-tpuv5', 'v5litepod': 'v2-alpha-tpuv5-lite'}
_DEFAULT_RUNTIME = 'tpu-ubuntu2204-base'
# Names people write for a generation whose accelerator types are spelt otherwise.
_ALIASES = {'v5e': 'v5litepod', 'v5lite': 'v5litepod', 'v5litepods': 'v5litepod', 'v6': 'v6e',
            'trillium': 'v6e'}
_TPU7X = re.compile(r'^(tpu7x?|v7x?|ironwood)(-|$)')
_FORM = re.compile(r'^([a-z0-9]+)-(\d+)$')

# TPU VM (node) states, from the TPU API's Node.State.
PREEMPTED_STATES = ('PREEMPTED', 'TERMINATED')   # delete and create again
GONE_STATES = ('DELETING',)                      # wait until it is gone, then create again
# States that need a person: `watch` waits --stuck_timeout for them to clear, then stops with this advice.
STUCK_ADVICE = {
    'REPAIRING': 'Google is repairing it; if it stays so, delete it (`launch_tpu_pod delete`) and run `watch` '
                 'again, which recreates it',
    'UNKNOWN': 'its state is unknown after a failed repair: delete it (`launch_tpu_pod delete`) and run `watch` '
               'again, which recreates it',
    'STOPPED': 'someone stopped it: start it (`gcloud compute tpus tpu-vm start NAME --zone=ZONE`) or delete it '
               '(`launch_tpu_pod delete`), then run `watch` again',
}
# Queued-resource states, from the TPU API's QueuedResourceState.
QUEUED_DEAD_STATES = ('FAILED', 'SUSPENDING', 'SUSPENDED')


def _suggestion(generation: str, size: int) -> str:
  """A correct accelerator type close to `generation-size`, or ''."""
  generation = _ALIASES.get(generation, generation)
  if generation in _CHIP_COUNTED and size in _CHIP_SLICES:
    return f'{generation}-{size}'
  if generation in _CORE_COUNTED and size > 0 and size % 8 == 0:
    return f'{generation}-{size}'
  if generation == 'v5':
    options = [f'v5p-{size}'] if size % 8 == 0 else []
    options += [f'v5litepod-{size}'] if size in _CHIP_SLICES else []
    return ' or '.join(options)
  return ''


def check_accelerator_type(accelerator_type: str) -> str:
  """Returns the accelerator type's generation (e.g. 'v4' for 'v4-32'); raises ValueError naming the right
  spelling for a name the Cloud TPU API does not offer (e.g. 'v5e-16', which is 'v5litepod-16')."""
  name = accelerator_type.strip().lower()
  if _TPU7X.match(name):
    raise ValueError(f'accelerator type {accelerator_type!r}: TPU7x (Ironwood) is not offered through the '
                     'Cloud TPU API (gcloud compute tpus) that this launcher uses; Google offers it through '
                     'GKE and Compute Engine')
  match = _FORM.match(name)
  if not match:
    raise ValueError(f'accelerator type {accelerator_type!r} is not of the form v4-32, v5litepod-16, v6e-16, ...')
  generation, size = match.group(1), int(match.group(2))
  if name == accelerator_type:
    if generation in _CHIP_COUNTED and size in _CHIP_SLICES:
      return generation
    if generation in _CORE_COUNTED and size > 0 and size % 8 == 0:
      return generation
  suggestion = _suggestion(generation, size)
  if suggestion and suggestion != accelerator_type:
    raise ValueError(f'accelerator type {accelerator_type!r} does not exist; did you mean {suggestion}?')
  if generation in _CHIP_COUNTED:
    sizes = ', '.join(f'{generation}-{n}' for n in _CHIP_SLICES)
    raise ValueError(f'accelerator type {accelerator_type!r} does not exist; {generation} slices are {sizes}')
  if generation in _CORE_COUNTED:
    raise ValueError(f'accelerator type {accelerator_type!r} does not exist; a {generation} size counts '
                     f'TensorCores, a multiple of 8 (8 per host), e.g. {generation}-8, {generation}-32')
  raise ValueError(f'accelerator type {accelerator_type!r}: unknown TPU generation {generation!r}; the Cloud TPU '
                   'API offers v2, v3, v4, v5p, v5litepod (v5e) and v6e')


def default_runtime_version(accelerator_type: str) -> str:
  """Google's JAX runtime for this accelerator, e.g. 'tpu-ubuntu2204-base' for v4-32."""
  return _RUNTIME_BY_GENERATION.get(check_accelerator_type(accelerator_type), _DEFAULT_RUNTIME)


# How gcloud reports a zone without capacity for the slice (a stock-out): the TPU API's
# "There is no more capacity in the zone ..." (code 8, RESOURCE_EXHAUSTED) and Compute Engine's wordings.
_STOCK_OUT = re.compile(r'no more capacity|RESOURCE_EXHAUSTED|ZONE_RESOURCE_POOL_EXHAUSTED|'
                        r'insufficient capacity|does not have enough resources available', re.IGNORECASE)


def is_stock_out(stderr: str) -> bool:
  """True when a failed create says the zone has no capacity now, which passes; a quota error (also
  RESOURCE_EXHAUSTED) does not pass by waiting and is not a stock-out."""
  return bool(_STOCK_OUT.search(stderr)) and 'quota' not in stderr.lower()
