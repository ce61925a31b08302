from srdit.cli import main

raise SystemExit(main())
