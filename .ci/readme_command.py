"""Prints the README command marked `<!-- ci: NAME -->` (the first ```bash block after the
marker), so CI runs exactly what the README tells a new user to run."""
import re
import sys
from pathlib import Path

name = sys.argv[1]
text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
match = re.search(rf"<!-- ci: {re.escape(name)} -->.*?```bash\n(.*?)```", text, re.S)
if not match:
    sys.exit(f"README.md has no command marked <!-- ci: {name} -->")
print(match.group(1).strip())
