from mistral7b.cli import main

raise SystemExit(main())
