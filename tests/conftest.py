"""Tests never reach a model hub: without this each hub lookup waits ~23 s before failing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
