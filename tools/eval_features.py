"""Linear-probe and KNN (k = 20) evaluation of a feature file written by ``tools/extract_features.py``.

Reports accuracy, balanced accuracy, weighted F1 and macro one-vs-rest AUROC on the test split as JSON
(protocol and split fallbacks: docs/feature_extraction.md). Data a probe cannot be fitted on (one class
only) is an error naming the file; a class missing from a split is a warning naming both.

Example::

    python tools/eval_features.py work_dirs/panda/features/sparse+prune_896.npz \\
        --out work_dirs/panda/eval/sparse+prune_896.json
"""
import argparse
import json
import os
import os.path as osp
from typing import List, Optional

from mmseg_sparsevit.classification.cli import add_eval_args, eval_kwargs
from mmseg_sparsevit.classification.feature_store import load_features
from mmseg_sparsevit.classification.probing import evaluate_features


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('features', help='feature file (.npz)')
    parser.add_argument('--out', help='result JSON (default: next to the features, .eval.json)')
    parser.add_argument('--seed', type=int, default=0, help='seed of held-out splits and the probe')
    add_eval_args(parser)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    data = load_features(args.features)
    result = dict(features=args.features, **evaluate_features(data, **eval_kwargs(args), source=args.features))
    out = args.out or osp.splitext(args.features)[0] + '.eval.json'
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    for probe in ('linear_probe', 'knn'):
        print(probe, json.dumps(result[probe]['test']))
    print(f'wrote {out}')
    return result


if __name__ == '__main__':
    main()
