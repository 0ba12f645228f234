"""``python app.py`` = ``zimage-ui serve``: the web UI and REST API on http://127.0.0.1:7860."""

import sys

from zimage_ui.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
