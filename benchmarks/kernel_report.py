"""The static kernel report from the benchmarks folder: same as `python -m fastdae.kernel_report`.

PYTHONPATH=. python benchmarks/kernel_report.py [--targets sm90,sm80,sm100] [--ci] [--unshipped]
"""

from fastdae.kernel_report import main

if __name__ == "__main__":
    raise SystemExit(main())
