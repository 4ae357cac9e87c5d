"""A task plugin that takes a while to import (TIMEBOX_TEST_IMPORT_SECONDS): a fork
server loading it is slow, not hung."""

import os
import time
from typing import Any

time.sleep(float(os.environ.get("TIMEBOX_TEST_IMPORT_SECONDS", "1")))

SPECS: dict[str, Any] = {}
FUNCTIONS: dict[str, Any] = {}
