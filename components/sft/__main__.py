import sys

from kubellama.components.sft.stage import main

sys.exit(main())
