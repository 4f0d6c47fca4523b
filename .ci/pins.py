"""Print `name @ url` for every package in a `pip install --dry-run --report` file except the project itself.

.ci/run feeds these to `uv pip install --no-deps`, so uv installs exactly what pip resolved.
"""

import json
import sys

report = json.load(open(sys.argv[1]))
for item in report["install"]:
    url = item["download_info"]["url"]
    if item["metadata"]["name"] != "edgessl":
        print(f"{item['metadata']['name']} @ {url}")
