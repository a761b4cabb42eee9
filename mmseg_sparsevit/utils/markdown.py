"""GitHub-style markdown tables: the one writer behind every table the package prints or saves
(benchmark reports, classification sweeps, SegPath summaries, the metric's per-class log)."""
from typing import Any, Optional, Sequence

_RULES = {'left': ':-', 'right': '-:', 'center': '::', None: '--'}


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]],
                   align: Optional[Sequence[Optional[str]]] = None) -> str:
    """A table with columns padded to a common width; cells are formatted with ``str``.

    ``align`` gives one of ``'left'``, ``'right'``, ``'center'`` or None (no marker) per column.
    """
    header = [str(cell) for cell in header]
    rows = [[str(cell) for cell in row] for row in rows]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f'row {i} has {len(row)} cells, header has {len(header)}: {row}')
    align = list(align) if align is not None else [None] * len(header)
    if len(align) != len(header) or any(a not in _RULES for a in align):
        raise ValueError(f'align needs one of {list(_RULES)} per column ({len(header)}), got {align}')
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return '| ' + ' | '.join(cell.ljust(width) for cell, width in zip(cells, widths)) + ' |'

    rule = '|' + '|'.join(_RULES[a][0] + '-' * width + _RULES[a][1] for a, width in zip(align, widths)) + '|'
    return '\n'.join([line(header), rule] + [line(row) for row in rows])
