"""The README states results once, written from results/ by `python reproduce.py --readme`."""
import json
import os

import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_results_block_is_the_one_results_gives():
    """Edit a result by hand in the README, or let results/ move on without rewriting the block, and this fails."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    begin, end = readme.index(reproduce.README_BEGIN), readme.index(reproduce.README_END) + len(reproduce.README_END)
    summary = json.load(open(os.path.join(ROOT, reproduce.README_GRID, "summary.json")))
    assert readme[begin:end] == reproduce.readme_block(summary), \
        "README.md's results block is stale: run `python reproduce.py --readme`"


def test_readme_block_carries_every_row_seed_and_claim():
    summary = json.load(open(os.path.join(ROOT, reproduce.README_GRID, "summary.json")))
    block = reproduce.readme_block(summary)
    s3_mimic = summary["macro"][str(summary["seeds"][-1])]["S3|ALL|mimic"][0]
    assert f"{s3_mimic:.3f}" in block  # the last seed's figure, not only the first's
    assert all(c["claim"] in block and c["verdict"] in block for c in summary["claims"])
    assert all(f"| {row} |" in block for row in (*reproduce.ROWS, reproduce.RANDOM))
