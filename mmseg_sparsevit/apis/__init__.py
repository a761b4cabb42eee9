"""Training / testing entry points shared by the command-line tools."""
from .runs import (build_runner, configure_testing, configure_training, load_config,
                   segpath_tag, write_segpath_results)

__all__ = ['build_runner', 'configure_testing', 'configure_training', 'load_config', 'segpath_tag',
           'write_segpath_results']
