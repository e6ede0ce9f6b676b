import sys

from components.pretrain.stage import main

sys.exit(main())
