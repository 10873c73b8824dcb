"""Makes docs/demo-report.png, the picture of the demo's report in README.md.

    .venv/bin/python docs/screenshot_demo.py     # needs Debian's chromium and playwright (requirements-dev.txt)

Runs `fetch_data.py --demo` into a temporary folder and photographs its report in headless Chromium, offline.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "demo-report.png"


def main() -> int:
    with tempfile.TemporaryDirectory(dir=ROOT / "docs") as work:
        data, logs = Path(work) / "data", Path(work) / "logs"
        subprocess.run([sys.executable, str(ROOT / "fetch_data.py"), "--demo", "--quiet", "--data-dir", str(data),
                        "--log-dir", str(logs)], check=True, stdout=subprocess.DEVNULL)
        page_url = (data / "report.html").as_uri()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900}, offline=True)
            page.goto(page_url)
            page.wait_for_selector("body[data-hours-drawn]")
            page.screenshot(path=str(TARGET), full_page=False)
            browser.close()
    print(TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
