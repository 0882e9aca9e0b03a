"""Checks the README main job's output: one answer for each PNU test photo, and the summary."""
import re
import sys
from pathlib import Path

log, test_dir = Path(sys.argv[1]).read_text(), Path(sys.argv[2])
photos = sorted(p for p in test_dir.rglob("*") if p.is_file())
answers = re.findall(r"^(\S+): (\S+) \(confidence [0-9.]+, \d+/\d+ votes\)", log, re.M)
answered = {Path(q).resolve() for q, _ in answers}
missing = [p for p in photos if p.resolve() not in answered]
summary = re.search(r"^recognised (\d+) of (\d+) query images", log, re.M)
if missing or not summary or int(summary.group(2)) != len(photos):
    sys.exit(f"main job: {len(answers)} answers for {len(photos)} photos; missing {missing[:3]}; "
             f"summary line {'found' if summary else 'missing'}")
print(f"main job: answered all {len(photos)} test photos; {summary.group(0)}")
