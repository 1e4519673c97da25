"""Put tests/ on sys.path so user-style plug-ins here import as top-level modules ("user_ou:OUProcess")."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
