"""Shared test settings and helpers: a small thread count so tests behave the same on 2-core CI."""
import torch

torch.set_num_threads(2)


def assert_one_line_error(excinfo, path):
    """The raised error is one line that names `path`."""
    message = str(excinfo.value)
    assert '\n' not in message and str(path) in message, message
