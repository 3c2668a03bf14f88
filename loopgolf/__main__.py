from loopgolf.cli import main

raise SystemExit(main())
