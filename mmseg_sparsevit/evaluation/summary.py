"""Collect per-antigen SegPath result files into the paper's table: MPA, IoU and Dice per cell type plus their
mean over cell types, per run tag."""
import csv
import glob
import math
from pathlib import Path
from typing import Dict, List, Sequence, Union

from mmseg_sparsevit.utils.markdown import markdown_table

from .results import RESULTS_FILENAME, SegPathResult, load_results

PAPER_METRICS = ('MPA', 'IoU', 'Dice')
ID_COLUMNS = ('tag', 'antigen', 'cell_type')
Row = Dict[str, Union[str, float]]


def find_result_files(inputs: Sequence[Union[str, Path]]) -> List[Path]:
    """Result files named by ``inputs``: files, directories (searched recursively for ``segpath_metrics.json``)
    or glob patterns (``**`` allowed). Order is kept, duplicates dropped; an input that matches nothing is an
    error naming it."""
    found: List[Path] = []
    for item in map(str, inputs):
        if glob.has_magic(item):
            matches = [Path(p) for p in sorted(glob.glob(item, recursive=True))]
        else:
            matches = [Path(item)] if Path(item).exists() else []
        paths = []
        for match in matches:
            paths += (sorted(match.rglob(RESULTS_FILENAME)) if match.is_dir() else [match])
        if not paths:
            raise FileNotFoundError(f'{item}: no SegPath result files (expected {RESULTS_FILENAME} files)')
        found += [p for p in paths if p not in found]
    return found


def summarize_results(results: Sequence[SegPathResult], metrics: Sequence[str] = PAPER_METRICS) -> List[Row]:
    """Table rows: one per run, sorted by tag then antigen (ignoring case), and after each tag's runs a row
    ``antigen='mean'`` averaging ``metrics`` over its cell types (a plain mean, so a NaN run shows up as NaN)."""
    if not results:
        raise ValueError('no SegPath results to summarize')
    by_tag: Dict[str, Dict[str, SegPathResult]] = {}
    for result in results:
        missing = [name for name in metrics if name not in result.metrics]
        if missing:
            raise KeyError(f'{result.path}: metrics {missing} missing; it has {sorted(result.metrics)}')
        runs = by_tag.setdefault(result.tag, {})
        if result.antigen in runs:
            raise ValueError(f'two results for antigen "{result.antigen}" with tag "{result.tag}": '
                             f'{runs[result.antigen].path} and {result.path}; give them different tags')
        runs[result.antigen] = result
    rows: List[Row] = []
    for tag in sorted(by_tag):
        runs = [by_tag[tag][antigen] for antigen in sorted(by_tag[tag], key=str.lower)]
        rows += [dict(tag=tag, antigen=run.antigen, cell_type=run.cell_type,
                      **{name: run.metrics[name] for name in metrics}) for run in runs]
        means = {name: math.fsum(run.metrics[name] for run in runs) / len(runs) for name in metrics}
        rows.append(dict(tag=tag, antigen='mean', cell_type=f'{len(runs)} cell types', **means))
    return rows


def rows_to_markdown(rows: Sequence[Row], metrics: Sequence[str] = PAPER_METRICS) -> str:
    """Markdown table in percent with two decimals; the tag column is left out when no run has a tag."""
    ids = [c for c in ID_COLUMNS if c != 'tag' or any(r['tag'] for r in rows)]
    header = ids + [f'{name} (%)' for name in metrics]
    body = [[str(row[c]) for c in ids] + [f'{row[name]:.2f}' for name in metrics] for row in rows]
    return markdown_table(header, body)


def write_csv(rows: Sequence[Row], path: Union[str, Path], metrics: Sequence[str] = PAPER_METRICS) -> None:
    """CSV with all id columns and unrounded percentages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(ID_COLUMNS) + list(metrics))
        writer.writeheader()
        writer.writerows(rows)


def summarize_segpath(inputs: Sequence[Union[str, Path]], metrics: Sequence[str] = PAPER_METRICS) -> List[Row]:
    """Find, load and summarize result files (see :func:`summarize_results`)."""
    return summarize_results([load_results(path) for path in find_result_files(inputs)], metrics)
