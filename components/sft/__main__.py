import sys

from components.sft.stage import main

sys.exit(main())
