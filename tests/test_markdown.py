"""The one markdown-table writer: padding, alignment markers and the errors that name the bad row."""
import pytest

from mmseg_sparsevit.utils import markdown_table


def test_columns_are_padded_to_the_widest_cell():
    table = markdown_table(['name', 'n'], [['a', 10], ['long name', 2]])
    assert table.splitlines() == ['| name      | n  |',
                                  '|-----------|----|',
                                  '| a         | 10 |',
                                  '| long name | 2  |']


def test_alignment_markers():
    rule = markdown_table(['a', 'b', 'c', 'd'], [['1', '2', '3', '4']],
                          align=['left', 'right', 'center', None]).splitlines()[1]
    assert rule == '|:--|--:|:-:|---|'


@pytest.mark.parametrize('rows, align, match', [
    ([['1']], None, r'row 0 has 1 cells, header has 2'),
    ([['1', '2']], ['left'], r'align needs one of .* per column \(2\)'),
    ([['1', '2']], ['left', 'middle'], r"align needs one of .*'middle'"),
])
def test_bad_shapes_are_named(rows, align, match):
    with pytest.raises(ValueError, match=match):
        markdown_table(['a', 'b'], rows, align)
