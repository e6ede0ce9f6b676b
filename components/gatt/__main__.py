import sys

from kubellama.components.gatt.stage import main

sys.exit(main())
