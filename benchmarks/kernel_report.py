"""The static kernel report from the benchmarks folder: same as `python -m fastdae.kernels.report`.

    PYTHONPATH=. python benchmarks/kernel_report.py [--targets sm90,sm80] [--ci] [--unshipped]
"""
from fastdae.kernels.report import main

if __name__ == "__main__":
    raise SystemExit(main())
