"""The static kernel report: a compile-and-read tool over the ops in `fastdae/kernels/`, kept out of
the runtime op package (nothing in `fastdae` imports it). `python -m fastdae.kernel_report`."""

from fastdae.kernel_report.report import main

__all__ = ["main"]
