"""Linear-probe / KNN evaluation: metrics equal scikit-learn's, KNN is a 20-neighbour vote on centred,
L2-normalised features, C is chosen on val, split fallbacks, and the CLI writes deterministic JSON."""
import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from mmseg_sparsevit.classification import FeatureStore, classification_metrics, knn_probe, linear_probe, make_splits

EVAL_TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'eval_features.py'


def blobs(num_per_class: int, num_classes: int = 3, dim: int = 16, spread: float = 1.5, seed: int = 0):
    """Gaussian clusters that overlap a little, so probes are good but not perfect."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (num_classes, dim))
    y = np.repeat(np.arange(num_classes), num_per_class)
    return centres[y] + rng.normal(0, 1, (len(y), dim)), y


def file_splits(counts):
    """Split names for blobs(sum(counts)) laid out class by class: counts = (train, val, test) per class."""
    per_class = ['train'] * counts[0] + ['val'] * counts[1] + ['test'] * counts[2]
    return np.array(per_class * 3)


@pytest.mark.parametrize('num_classes', [2, 4])
def test_metrics_equal_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    y = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, 40)])
    proba = rng.dirichlet(np.ones(num_classes), len(y))
    pred = proba.argmax(1)
    got = classification_metrics(y, pred, proba)
    auroc = (roc_auc_score(y, proba[:, 1]) if num_classes == 2
             else roc_auc_score(y, proba, multi_class='ovr', average='macro'))
    expected = dict(accuracy=accuracy_score(y, pred), balanced_accuracy=balanced_accuracy_score(y, pred),
                    weighted_f1=f1_score(y, pred, average='weighted'), auroc=auroc)
    assert got == pytest.approx(expected)


def test_auroc_is_nan_when_a_class_is_absent_from_test():
    y, proba = np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3)
    with pytest.warns(UserWarning, match='AUROC undefined'):
        assert np.isnan(classification_metrics(y, y, proba)['auroc'])


def test_knn_is_a_20_neighbour_vote_on_centred_normalised_features():
    x, y = blobs(15, spread=0.6)
    splits = make_splits(file_splits((10, 0, 5)), y)
    result = knn_probe(x, y, splits, num_classes=3)
    assert result['k'] == 20
    train, test = splits['train'], splits['test']
    feats = x - x[train].mean(0)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    dist = ((feats[test, None] - feats[None, train]) ** 2).sum(-1)
    nearest = y[train][np.argsort(dist, axis=1)[:, :20]]
    proba = np.stack([(nearest == c).mean(1) for c in range(3)], 1)
    expected = classification_metrics(y[test], proba.argmax(1), proba)
    assert result['test'] == pytest.approx(expected)


def test_knn_clamps_k_to_the_train_size_with_a_warning():
    x, y = blobs(8)
    splits = make_splits(file_splits((4, 0, 4)), y)
    with pytest.warns(UserWarning, match='only 12 train samples, using k=12'):
        assert knn_probe(x, y, splits, num_classes=3)['k'] == 12


def test_linear_probe_chooses_c_on_val_and_refits_on_train():
    x, y = blobs(20, spread=0.5)
    splits = make_splits(file_splits((10, 5, 5)), y)
    grid = (1e-3, 1e-1, 10.0)
    result = linear_probe(x, y, splits, num_classes=3, c_grid=grid)
    scores = result['val_balanced_accuracy']
    assert set(scores) == {'0.001', '0.1', '10'}
    best = max(scores.values())
    assert result['C'] == min(c for c in grid if scores[f'{c:g}'] == best)  # ties -> stronger regularisation
    scaler = StandardScaler().fit(x[splits['train']])
    clf = LogisticRegression(C=result['C'], max_iter=1000).fit(scaler.transform(x[splits['train']]),
                                                             y[splits['train']])
    test_x = scaler.transform(x[splits['test']])
    expected = classification_metrics(y[splits['test']], clf.predict(test_x), clf.predict_proba(test_x))
    assert result['test'] == pytest.approx(expected)


@pytest.mark.parametrize('names, val_source, test_source', [
    (('train', 'val', 'test'), 'file', 'file'),
    (('train', 'train', 'test'), 'held out', 'file'),
    (('', 'val', ''), 'file', 'held out'),
    (('', '', ''), 'held out', 'held out'),
])
def test_split_fallbacks(names, val_source, test_source):
    y = np.repeat(np.arange(3), 12)
    split = np.array([names[0]] * 6 + [names[1]] * 3 + [names[2]] * 3)[np.tile(np.arange(12), 3)]
    splits = make_splits(split, y, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert splits['source']['val'].startswith(val_source) and splits['source']['test'].startswith(test_source)
    train, select, val, test = (set(splits[k].tolist()) for k in ('train', 'select', 'val', 'test'))
    assert not train & test and not select & val and select <= train
    assert (select | val == train) if val_source == 'held out' else (select == train and not val & train)
    assert len(train | val | test) == 36
    for k in ('val', 'test'):  # stratified: every class present
        assert set(y[splits[k]]) == {0, 1, 2}


def test_unknown_split_name_is_an_error():
    with pytest.raises(ValueError, match=r"unknown split names \['holdout'\]"):
        make_splits(np.array(['train', 'holdout']), np.array([0, 1]))


def test_eval_cli_writes_deterministic_json(tmp_path):
    x, y = blobs(30, spread=1.0)
    split = file_splits((20, 5, 5))
    store = FeatureStore(str(tmp_path / 'features.npz'), dict(note='synthetic'), len(y))
    store.open()
    store.write_shard(0, dict(cls=x.astype(np.float32), patch_mean=x[:, ::-1].astype(np.float32), label=y,
                              id=np.array([f'img{i}' for i in range(len(y))]), split=split,
                              num_kept=np.full(len(y), 7)))
    store.finalize(['a', 'b', 'c'])
    main = runpy.run_path(str(EVAL_TOOL))['main']
    outs = [tmp_path / 'run1.json', tmp_path / 'run2.json']
    for out in outs:
        main([str(tmp_path / 'features.npz'), '--out', str(out), '--c-grid', '0.01', '1'])
    first = json.loads(outs[0].read_text())
    assert first == json.loads(outs[1].read_text())
    assert first['num_samples'] == dict(train=60, val=15, test=15) and first['knn']['k'] == 20
    assert set(first['linear_probe']['test']) == set(first['knn']['test']) == {
        'accuracy', 'balanced_accuracy', 'weighted_f1', 'auroc'}
    assert first['linear_probe']['test']['accuracy'] > 0.6  # separable clusters: far above chance (1/3)


def write_features(path, x, y, split, class_names):
    store = FeatureStore(str(path), dict(note='synthetic'), len(y))
    store.open()
    store.write_shard(0, dict(cls=x.astype(np.float32), patch_mean=x.astype(np.float32), label=y,
                              id=np.array([f'img{i}' for i in range(len(y))]), split=split,
                              num_kept=np.full(len(y), 7)))
    return store.finalize(class_names)


@pytest.mark.parametrize('only_train', [False, True])
def test_eval_cli_names_the_file_when_train_has_one_class(tmp_path, only_train):
    """One class to fit on (in the whole file, or only in its train split): a clear error naming the file
    and the classes, not the solver's traceback."""
    x, y = blobs(30, num_classes=2)
    split = np.array((['train'] * 20 + ['val'] * 5 + ['test'] * 5) * 2)
    y = np.where(split == 'train', 0, y) if only_train else np.zeros_like(y)
    path = write_features(tmp_path / 'one_class.npz', x, y, split, ['a', 'b'])
    main = runpy.run_path(str(EVAL_TOOL))['main']
    message = r"the train split \(40 samples\) holds only class \['a'\] of \['a', 'b'\]; a probe needs at least two"
    with pytest.raises(ValueError, match=rf'^{re.escape(path)}: {message}$'):
        main([path, '--out', str(tmp_path / 'out.json')])
    assert not (tmp_path / 'out.json').exists()


def test_eval_cli_warns_naming_classes_missing_from_a_split(tmp_path):
    """Class 'c' has val and test samples but none in train; class 'b' none in val: each warning names the
    file, the classes and the split; the evaluation still completes."""
    x, y = blobs(30)
    split = file_splits((20, 5, 5))
    split[(y == 2) & (split == 'train')] = 'test'
    split[(y == 1) & (split == 'val')] = 'train'
    path = write_features(tmp_path / 'gaps.npz', x, y, split, ['a', 'b', 'c'])
    main = runpy.run_path(str(EVAL_TOOL))['main']
    with pytest.warns(UserWarning) as caught:
        result = main([path, '--out', str(tmp_path / 'out.json'), '--c-grid', '1'])
    messages = [str(w.message) for w in caught if str(w.message).startswith(path)]
    assert f"{path}: classes ['c'] have no sample in the train split; the probes can never predict them" in messages
    assert f"{path}: classes ['b'] have no sample in the val split; C is chosen without them" in messages
    assert len(messages) == 2 and result['num_samples'] == dict(train=45, val=10, test=35)
