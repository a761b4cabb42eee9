"""Plain markdown tables, shared by the metric's per-class log and the
SegPath summary tool (no prettytable dependency)."""
from typing import Sequence


def markdown_table(header: Sequence[str],
                   rows: Sequence[Sequence[str]]) -> str:
    """GitHub-style table with columns padded to a common width."""
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f'row {i} has {len(row)} cells, '
                             f'header has {len(header)}')
    widths = [
        max(len(str(cell)) for cell in column)
        for column in zip(header, *rows)
    ]

    def line(cells: Sequence[str]) -> str:
        return '| ' + ' | '.join(
            str(cell).ljust(width)
            for cell, width in zip(cells, widths)) + ' |'

    rule = '|' + '|'.join('-' * (width + 2) for width in widths) + '|'
    return '\n'.join([line(header), rule] + [line(row) for row in rows])
