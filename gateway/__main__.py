from gateway._start import main

raise SystemExit(main())
