import sys

from llmfast.cli import main

sys.exit(main())
