import sys

from components.gatt.stage import main

sys.exit(main())
