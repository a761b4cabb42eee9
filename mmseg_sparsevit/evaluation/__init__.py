"""SegPath evaluation: pure metric functions, the registered SegPathMetric, the per-run result file and the
cross-antigen summary."""
from .functional import SegAreas, areas_to_metrics, segmentation_areas, sum_areas
from .results import RESULTS_FILENAME, SegPathResult, load_results, save_results
from .segpath_metric import SegPathMetric
from .summary import find_result_files, rows_to_markdown, summarize_results, summarize_segpath, write_csv

__all__ = [
    'SegAreas', 'segmentation_areas', 'sum_areas', 'areas_to_metrics', 'SegPathMetric', 'RESULTS_FILENAME',
    'SegPathResult', 'save_results', 'load_results', 'find_result_files', 'summarize_results', 'rows_to_markdown',
    'write_csv', 'summarize_segpath'
]
