"""The naive approach, as a reference for the benchmark: the whole body in memory, every event parsed, then dumped.

Usage: python bench/in_memory_reference.py URL START END OUT_FILE  (credentials in AMP_API_KEY / AMP_SECRET_KEY)
"""

import gzip
import io
import json
import os
import sys
import zipfile

import requests


def main() -> int:
    url, start, end, out_file = sys.argv[1:5]
    auth = (os.environ["AMP_API_KEY"], os.environ["AMP_SECRET_KEY"])
    response = requests.get(url, params={"start": start, "end": end}, auth=auth)
    response.raise_for_status()
    events = []
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        for name in archive.namelist():
            for line in gzip.decompress(archive.read(name)).decode("utf-8").splitlines():
                if line.strip():
                    events.append(json.loads(line))
    with open(out_file, "w", encoding="utf-8") as out:
        json.dump(events, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
