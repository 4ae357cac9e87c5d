"""A task module that takes a while to import (TIMEBOX_TEST_IMPORT_SECONDS): a fork
server loading it is slow, not hung."""

import os
import time

from examples.tasks import echo  # noqa: F401  (served from here too)

time.sleep(float(os.environ.get("TIMEBOX_TEST_IMPORT_SECONDS", "1")))
