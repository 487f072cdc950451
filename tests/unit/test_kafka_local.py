"""scripts/kafka-local's cluster ids: 22-character base64url UUIDs that never start with "-"
(the storage tool reads a leading "-" as an option, so 1 start in 64 failed before)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kafka-local"


def test_cluster_ids_are_valid_and_never_look_like_options():
    snippet = re.search(r"cid=\"\$\(\"\$PYTHON\" -c '(.*?)'\)\"", SCRIPT.read_text(), re.S)
    assert snippet, "the cluster-id generator is where the test expects it"
    loop = "for _ in range(3000):\n" + "\n".join(
        "    " + ln for ln in snippet.group(1).splitlines()
    )
    out = subprocess.run([sys.executable, "-c", loop], capture_output=True, text=True, check=True)
    ids = out.stdout.split()
    assert len(ids) == 3000 and len(set(ids)) == 3000
    assert all(len(c) == 22 and re.fullmatch(r"[A-Za-z0-9_-]+", c) for c in ids)
    assert not any(c.startswith("-") for c in ids)
