"""The SegPath result file: one JSON per test run, written by ``tools/test.py`` and read by
``tools/summarize_segpath.py``.

Both sides go through :func:`save_results` / :func:`load_results`, so the format lives in one place. Layout
(see ``docs/metrics.md``)::

    {"config": str, "checkpoint": str, "antigen": str, "cell_type": str,
     "tag": str,                      # optional, groups runs (dense/sparse...)
     "metrics": {name: float | null}} # SegPathMetric output, percent

NaN metric values are stored as ``null`` so the file is strict JSON, and read back as NaN.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Union

RESULTS_FILENAME = 'segpath_metrics.json'

_STR_KEYS = ('config', 'checkpoint', 'antigen', 'cell_type')
_ALLOWED_KEYS = frozenset(_STR_KEYS + ('tag', 'metrics'))


@dataclass(frozen=True)
class SegPathResult:
    """One run's metrics and where they came from."""

    config: str
    checkpoint: str
    antigen: str
    cell_type: str
    metrics: Dict[str, float]
    tag: str = ''
    path: str = field(default='', compare=False)


def _check_metrics(metrics: Any, where: str) -> Dict[str, float]:
    """Validated ``{str: float}`` copy; ``None`` becomes NaN."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f'{where}: "metrics" must be an object of name -> number, got {type(metrics).__name__}')
    checked = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ValueError(f'{where}: metric name {name!r} is not a string')
        if value is None:
            value = math.nan
        # numpy / torch scalars have __float__; bool and str are rejected.
        if isinstance(value, (bool, str)) or not hasattr(value, '__float__'):
            raise ValueError(f'{where}: metric "{name}" must be a number or null, got {value!r}')
        checked[name] = float(value)
    return checked


def save_results(path: Union[str, Path], *, config: str, checkpoint: str, antigen: str, cell_type: str,
                 metrics: Mapping[str, Any], tag: str = '') -> Path:
    """Write one run's result file (parent directories are created).

    ``metrics`` is the dict SegPathMetric returned (numpy/torch scalars are accepted); ``tag`` distinguishes
    runs of the same antigen, e.g. ``'sparse-560'``. Returns the path written.
    """
    path = Path(path)
    for key, value in dict(config=config, checkpoint=checkpoint, antigen=antigen, cell_type=cell_type,
                           tag=tag).items():
        if not isinstance(value, str):
            raise TypeError(f'save_results: "{key}" must be a str, got {type(value).__name__}')
    checked = _check_metrics(metrics, f'save_results({path})')
    record = dict(config=config, checkpoint=checkpoint, antigen=antigen, cell_type=cell_type, tag=tag,
                  metrics={k: None if math.isnan(v) else v for k, v in checked.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + '\n')
    return path


def load_results(path: Union[str, Path]) -> SegPathResult:
    """Read and validate one result file; every error names the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as err:
        raise FileNotFoundError(f'{path}: cannot read result file ({err.strerror})') from err
    except json.JSONDecodeError as err:
        raise ValueError(f'{path}: not valid JSON ({err})') from err
    if not isinstance(record, dict):
        raise ValueError(f'{path}: expected a JSON object, got {type(record).__name__}')
    unknown = sorted(set(record) - _ALLOWED_KEYS)
    if unknown:
        raise ValueError(f'{path}: unknown keys {unknown}; allowed are {sorted(_ALLOWED_KEYS)}')
    for key in _STR_KEYS + ('metrics', ):
        if key not in record:
            raise ValueError(f'{path}: missing key "{key}"')
    for key in _STR_KEYS + ('tag', ):
        if not isinstance(record.get(key, ''), str):
            raise ValueError(f'{path}: "{key}" must be a string, got {record[key]!r}')
    return SegPathResult(**{key: record[key] for key in _STR_KEYS}, tag=record.get('tag', ''), path=str(path),
                         metrics=_check_metrics(record['metrics'], str(path)))
