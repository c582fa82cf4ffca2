import sys

from boincd_containers.cli.main import main

sys.exit(main())
