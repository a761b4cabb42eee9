"""Training / testing entry points shared by the command-line tools."""
from .runs import (add_runner_arguments, build_runner, configure_testing, configure_training,
                   load_config, parse_runner_arguments, segpath_tag, write_segpath_results)

__all__ = [
    'add_runner_arguments', 'build_runner', 'configure_testing', 'configure_training', 'load_config',
    'parse_runner_arguments', 'segpath_tag', 'write_segpath_results'
]
