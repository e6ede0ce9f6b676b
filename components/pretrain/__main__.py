import sys

from kubellama.components.pretrain.stage import main

sys.exit(main())
