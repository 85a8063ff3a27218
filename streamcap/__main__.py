from streamcap.cli import main

raise SystemExit(main())
