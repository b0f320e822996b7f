from fastdae.kernel_report.report import main

raise SystemExit(main())
