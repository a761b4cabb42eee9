"""Resumable on-disk store for per-image embeddings: batch shards while running, one ``.npz`` at the end.

While extraction runs, ``<out>.npz.partial/`` holds ``meta.json`` (what is being extracted) and one
``shard_<start>.npz`` per finished batch, each written to a temporary name and atomically renamed, so
a crash can never leave a half-written shard under a valid name. A new run with the same ``meta``
continues after the last complete shard; different ``meta`` is an error (the stored features would
be mixed). When every sample is done the shards are concatenated into ``<out>.npz`` (again via an
atomic rename) and the partial folder is removed.

The final file is a plain numpy archive (no pickles) with the arrays named in ``FEATURE_KEYS``, the model's
prescribed tile embedding ``embedding`` (``SparseViT.pool``: CLS, patch mean or both, by the preset's
``global_pool``), ``class_names`` and ``meta`` (a JSON string). Files and shards written before ``embedding``
existed stay readable and resumable: :func:`load_features` composes it from ``cls`` and ``patch_mean`` with the
recipe of the architecture their ``meta`` names.
"""
import json
import os
import os.path as osp
import re
import shutil
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from mmengine.logging import print_log

# Per-sample arrays: embeddings (N, C) float32, label (N,) int64, id / split (N,) str, num_kept (N,) int64.
FEATURE_KEYS = ('cls', 'patch_mean', 'label', 'id', 'split', 'num_kept')
# The prescribed embedding (N, D) float32; optional so that runs started before it existed still resume.
EMBEDDING_KEY = 'embedding'
SHARD_PATTERN = re.compile(r'^shard_(\d{9})\.npz$')


def _atomic_savez(path: str, arrays: Dict[str, np.ndarray]) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _meta_diff(stored: Dict[str, Any], meta: Dict[str, Any]) -> List[str]:
    return sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))


def compose_embedding(cls: np.ndarray, patch_mean: np.ndarray, recipe: str) -> np.ndarray:
    """The embedding ``SparseViT.pool`` gives for ``recipe`` ('token', 'avg' or 'token+avg'), from its parts."""
    parts = {'token': [cls], 'avg': [patch_mean], 'token+avg': [cls, patch_mean]}
    if recipe not in parts:
        raise ValueError(f'unknown embedding recipe {recipe!r}; expected one of {list(parts)}')
    return np.concatenate(parts[recipe], axis=1)


def embedding_recipe(meta: Dict[str, Any]) -> Optional[str]:
    """The ``global_pool`` of the architecture an extraction ``meta`` names, or None when it names none."""
    config = meta.get('config')
    if not isinstance(config, dict) or 'arch' not in config:
        return None
    from mmseg_sparsevit.models.presets import get_arch  # torch + timm, needed only for files that lack it
    return get_arch(config['arch'], **config.get('arch_overrides', {})).global_pool


def read_npz(path: str, keys: Sequence[str], what: str, remedy: str,
             optional: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """The arrays ``keys`` (and those of ``optional`` that exist) of the numpy archive ``path``, read in full
    while it is open.

    An empty, truncated or corrupt file (numpy and zipfile raise ``EOFError``, ``BadZipFile``, ...
    without the path) or one lacking a key raises a ``ValueError`` naming the file, ``what`` it is and
    the ``remedy``."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError('a single .npy array, not an .npz archive')
        with data:
            names = data.files
            arrays = {k: data[k] for k in (*keys, *optional) if k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f'{path}: unreadable {what} ({type(err).__name__}: {err}); {remedy}') from err
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f'{path}: {what} lacks the arrays {missing} (has {names}); {remedy}')
    return arrays


def load_features(path: str) -> Dict[str, Any]:
    """Read a finished feature file: the arrays of ``FEATURE_KEYS``, ``embedding``, ``class_names`` and ``meta``
    (dict). A file without ``embedding`` gets it composed by its architecture's recipe (absent if ``meta`` names
    no architecture)."""
    if not osp.isfile(path):
        hint = ' (extraction unfinished: resume it)' if osp.isdir(f'{path}.partial') else ''
        raise FileNotFoundError(f'feature file not found: {path}{hint}')
    out: Dict[str, Any] = read_npz(path, FEATURE_KEYS + ('class_names', 'meta'), 'feature file',
                                   're-extract it (--overwrite)', optional=(EMBEDDING_KEY,))
    out['meta'] = json.loads(str(out['meta']))
    recipe = embedding_recipe(out['meta'])
    if EMBEDDING_KEY not in out and recipe is not None:
        out[EMBEDDING_KEY] = compose_embedding(out['cls'], out['patch_mean'], recipe)
    return out


class FeatureStore:
    """Writer side of the format above for a run over ``num_samples`` samples described by ``meta``.

    ``meta`` must be JSON-serialisable and identify everything that changes the features (model,
    weights, input size, mode, the ordered sample ids), because resumption trusts it.
    """

    def __init__(self, path: str, meta: Dict[str, Any], num_samples: int, overwrite: bool = False) -> None:
        if not path.endswith('.npz'):
            raise ValueError(f'feature file must end with .npz, got {path}')
        self.path = path
        self.partial_dir = f'{path}.partial'
        self.meta = json.loads(json.dumps(meta))  # normalise tuples to lists for comparison
        self.num_samples = num_samples
        if overwrite:
            for stale in (path, f'{path}.tmp'):
                if osp.exists(stale):
                    os.remove(stale)
            shutil.rmtree(self.partial_dir, ignore_errors=True)

    def is_finished(self) -> bool:
        """True when the final file exists for the same ``meta`` (else an error if it differs)."""
        if not osp.isfile(self.path):
            return False
        stored = read_npz(self.path, ('meta',), 'feature file', 'pass overwrite=True (--overwrite)')['meta']
        diff = _meta_diff(json.loads(str(stored)), self.meta)
        if diff:
            raise ValueError(f'{self.path} exists with different settings {diff}; '
                             'pass overwrite=True (--overwrite) or choose another output')
        return True

    def _shard_starts(self) -> List[int]:
        starts = []
        for name in os.listdir(self.partial_dir):
            match = SHARD_PATTERN.match(name)
            if match:
                starts.append(int(match.group(1)))
            elif name.endswith('.tmp'):  # an interrupted write; its batch is simply redone
                os.remove(osp.join(self.partial_dir, name))
        return sorted(starts)

    def _shard_path(self, start: int) -> str:
        return osp.join(self.partial_dir, f'shard_{start:09d}.npz')

    def _read_shard(self, start: int, keys: Sequence[str], optional: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        return read_npz(self._shard_path(start), keys, 'feature shard',
                        'delete it and every later shard to redo those batches, or pass overwrite=True (--overwrite)',
                        optional)

    def open(self) -> int:
        """Prepare the partial folder; return how many leading samples are already stored."""
        meta_file = osp.join(self.partial_dir, 'meta.json')
        if not osp.isdir(self.partial_dir):
            os.makedirs(self.partial_dir)
        if not osp.isfile(meta_file):
            with open(f'{meta_file}.tmp', 'w') as f:
                json.dump(self.meta, f, indent=1)
            os.replace(f'{meta_file}.tmp', meta_file)
            return 0
        with open(meta_file) as f:
            diff = _meta_diff(json.load(f), self.meta)
        if diff:
            raise ValueError(f'{self.partial_dir} holds an unfinished extraction with different settings '
                             f'{diff}; pass overwrite=True (--overwrite) to discard it')
        done = 0
        for start in self._shard_starts():
            if start != done:
                raise RuntimeError(f'{self.partial_dir}: shard {self._shard_path(start)} does not continue '
                                   f'at sample {done}; the folder was modified, use overwrite')
            done += len(self._read_shard(start, ('label',))['label'])
        if done > self.num_samples:
            raise RuntimeError(f'{self.partial_dir} holds {done} samples but the dataset has {self.num_samples}')
        if done:
            print_log(f'resuming {self.path}: {done}/{self.num_samples} samples already extracted',
                      logger='current')
        return done

    def write_shard(self, start: int, arrays: Dict[str, np.ndarray]) -> None:
        """Store samples ``start .. start + len`` (the batch just computed) atomically."""
        missing = [k for k in FEATURE_KEYS if k not in arrays]
        if missing:
            raise KeyError(f'shard arrays lack {missing}')
        _atomic_savez(self._shard_path(start), {k: arrays[k] for k in (*FEATURE_KEYS, EMBEDDING_KEY) if k in arrays})

    def finalize(self, class_names: List[str]) -> str:
        """Concatenate the shards into ``path``, check the sample count, remove the partial folder.

        ``embedding`` is stored only when every shard has it (shards of a run begun before it existed lack it;
        :func:`load_features` composes it for such files)."""
        keys = (*FEATURE_KEYS, EMBEDDING_KEY)
        parts: Dict[str, List[np.ndarray]] = {k: [] for k in keys}
        for start in self._shard_starts():
            shard = self._read_shard(start, FEATURE_KEYS, optional=(EMBEDDING_KEY,))
            for k in keys:
                if k in shard:
                    parts[k].append(shard[k])
        if len(parts[EMBEDDING_KEY]) != len(parts['label']):
            del parts[EMBEDDING_KEY]
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        if len(arrays['label']) != self.num_samples:
            raise RuntimeError(f'{self.partial_dir}: {len(arrays["label"])} of {self.num_samples} samples '
                               'stored; extraction is not finished')
        arrays['class_names'] = np.asarray(class_names, dtype=str)
        arrays['meta'] = np.asarray(json.dumps(self.meta, sort_keys=True))
        _atomic_savez(self.path, arrays)
        shutil.rmtree(self.partial_dir)
        print_log(f'wrote {self.num_samples} embeddings to {self.path}', logger='current')
        return self.path
