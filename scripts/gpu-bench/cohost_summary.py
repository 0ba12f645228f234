"""One line per `bench --cohost` report: the verdict and the figures it rests on."""
import json
import sys

for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
    except (OSError, ValueError) as exc:
        print(path, "unreadable:", exc)
        continue
    sweep = {k: v for k, v in r.get("sweep", {}).items() if k != "rows"}
    fb = {k: r.get("fallback", {}).get(k)
          for k in ("ratio", "decode_s", "normal_decode_s", "notes", "skipped", "error")}
    print(path, "verdict", json.dumps(r.get("verdict")), "| start", r.get("start"), "| idle", r.get("idle_after_sweep"),
          "| first", {k: v for k, v in r.get("first_after_release", {}).items() if "ratio" in k}, "| sweep", sweep,
          "| fallback", fb, "| model", r.get("model", {}).get("placement"), r.get("model", {}).get("budget"))
