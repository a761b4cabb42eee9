"""FeatureStore and load_features on damaged files: an empty, truncated or foreign shard or feature file is
an error naming that file (numpy alone raises EOFError / BadZipFile without a path)."""
import re

import numpy as np
import pytest

from mmseg_sparsevit.classification import FeatureStore, load_features

META = dict(note='synthetic')


def batch(start: int, n: int = 4) -> dict:
    return dict(cls=np.full((n, 4), start, np.float32), patch_mean=np.zeros((n, 4), np.float32),
                label=np.arange(n) % 2, id=np.array([f'img{start + i}' for i in range(n)]),
                split=np.array(['train'] * n), num_kept=np.full(n, 3))


def two_shards(tmp_path) -> FeatureStore:
    store = FeatureStore(str(tmp_path / 'features.npz'), META, num_samples=8)
    assert store.open() == 0
    store.write_shard(0, batch(0))
    store.write_shard(4, batch(4))
    return store


def damage(path: str, how: str) -> None:
    with open(path, 'rb') as f:
        data = f.read()
    new = dict(truncated=data[:len(data) // 2], empty=b'', garbage=b'no numpy archive here\n' * 8)[how]
    with open(path, 'wb') as f:
        f.write(new)


DAMAGE = ['truncated', 'empty', 'garbage']


@pytest.mark.parametrize('how', DAMAGE)
def test_damaged_shard_is_named_on_resume_and_finalize(tmp_path, how):
    store = two_shards(tmp_path)
    shard = store._shard_path(4)
    damage(shard, how)
    message = rf'^{re.escape(shard)}: unreadable feature shard \(.*\); delete it and every later shard'
    with pytest.raises(ValueError, match=message):
        FeatureStore(store.path, META, num_samples=8).open()
    with pytest.raises(ValueError, match=message):
        store.finalize(['a', 'b'])


@pytest.mark.parametrize('how', DAMAGE)
def test_damaged_feature_file_is_named(tmp_path, how):
    store = two_shards(tmp_path)
    store.finalize(['a', 'b'])
    assert load_features(store.path)['label'].tolist() == [0, 1] * 4
    damage(store.path, how)
    message = rf'^{re.escape(store.path)}: unreadable feature file \(.*\); '
    with pytest.raises(ValueError, match=message + r're-extract it'):
        load_features(store.path)
    with pytest.raises(ValueError, match=message + r'pass overwrite=True'):  # a rerun of the extraction
        FeatureStore(store.path, META, num_samples=8).is_finished()


def test_feature_file_lacking_arrays_is_named(tmp_path):
    path = str(tmp_path / 'other.npz')
    np.savez(path, cls=np.zeros((2, 4)))
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: feature file lacks the arrays \['patch_mean', "):
        load_features(path)
