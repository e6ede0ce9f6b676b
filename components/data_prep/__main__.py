import sys

from kubellama.components.data_prep.stage import main

sys.exit(main())
