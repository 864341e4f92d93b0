from shipyard.cli import main

raise SystemExit(main())
