import sys

from tierline_shared.serving.process import main

sys.exit(main("tierline_cloud_node"))
