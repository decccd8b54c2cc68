import sys

from vfiouser_net.cli import main

sys.exit(main())
