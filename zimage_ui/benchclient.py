"""The bench's HTTP clients, each in a process of its own as a browser or ``curl`` is: ``zimage-ui bench --http``
starts them (:func:`run_clients`), so the server's process — its web server, GPU worker and PNG writer — is timed
without client threads competing for its interpreter.

The child (``python -m zimage_ui.benchclient``) reads one JSON plan on stdin — ``{"url", "body", "requests":
[[prompt, seed], ...], "digest": [[prompt, seed], ...]}`` — prints ``ready``, waits for a line ``go``, then posts
each request in turn to ``POST /api/v1/generate`` and prints one JSON line per answer: seconds from sending to the
last byte, status, content type, size, and for the requests listed in ``digest`` the SHA-256 of the decoded pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any


def pixels_digest(png: bytes) -> str:
    """SHA-256 of a PNG's decoded pixels (the same picture gives the same digest whatever its metadata)."""
    import hashlib
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return hashlib.sha256(im.tobytes()).hexdigest()


def _child() -> int:
    import httpx

    plan = json.loads(sys.stdin.readline())
    wanted = {tuple(k) for k in plan.get("digest", [])}
    with httpx.Client(base_url=plan["url"], timeout=3600) as client:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        for prompt, seed in plan["requests"]:
            t0 = time.perf_counter()
            try:
                answer = client.post("/api/v1/generate", json={**plan["body"], "prompt": prompt, "seed": seed})
                content = answer.content
            except httpx.HTTPError as exc:  # reported, not raised: the parent counts failures
                print(json.dumps({"prompt": prompt, "seed": seed, "error": str(exc)[:200]}), flush=True)
                continue
            row: dict[str, Any] = {"prompt": prompt, "seed": seed, "seconds": time.perf_counter() - t0,
                                   "status": answer.status_code, "type": answer.headers.get("content-type"),
                                   "bytes": len(content)}
            if answer.status_code != 200:
                row["error"] = answer.text[:300]
            elif (prompt, seed) in wanted:
                row["digest"] = pixels_digest(content)
            print(json.dumps(row), flush=True)
    print("done", flush=True)
    return 0


def run_clients(url: str, body: dict[str, Any], plans: list[list[tuple[str, int]]],
                digest: list[tuple[str, int]] = (), timeout: float = 3600) -> dict[str, Any]:
    """One client process per plan, all started together once every one has connected (``ready``): returns the
    wall seconds from ``go`` to the last answer and every answer's row (see the module's doc)."""
    procs = [subprocess.Popen([sys.executable, "-m", "zimage_ui.benchclient"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1) for _ in plans]
    try:
        for proc, plan in zip(procs, plans, strict=True):
            proc.stdin.write(json.dumps({"url": url, "body": body, "requests": plan,
                                         "digest": [list(k) for k in digest]}) + "\n")
            proc.stdin.flush()
        for proc in procs:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a bench client did not start (said {line!r})")
        t0 = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        rows: list[dict[str, Any]] = []
        for proc in procs:
            for line in proc.stdout:
                if line.strip() == "done":
                    break
                rows.append(json.loads(line))
        wall = time.perf_counter() - t0
        for proc in procs:
            proc.wait(timeout=timeout)
        return {"wall_s": wall, "rows": rows}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    raise SystemExit(_child())
