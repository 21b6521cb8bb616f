"""The CPU-platform tests run snippets in fresh interpreters (verl resolves its platform once per process)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
