"""The SDK docs cannot rot: the quickstart example runs against a real node, and every copy
of it in the docs is the example file, byte for byte."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sdk_quickstart.py"
MARKER = "<!-- sdk-example: examples/sdk_quickstart.py -->"
BLOCK = re.compile(re.escape(MARKER) + r"\n```python\n(.*?)```\n", re.DOTALL)


async def test_the_quickstart_example_runs(standalone: str) -> None:
    env = dict(os.environ)
    # The example imports ``client`` as an installed package would; make the checkout win.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        standalone,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(30):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = stdout.decode()
    assert process.returncode == 0, stderr.decode()
    assert "app found 1 calculator(s)" in output
    assert "2 + 3 = 5" in output
    assert output.rstrip().endswith("done")


@pytest.mark.parametrize("doc", ["docs/sdk.md", "README.md"])
def test_the_docs_show_the_example_file_verbatim(doc: str) -> None:
    text = (ROOT / doc).read_text()
    blocks = BLOCK.findall(text)
    assert blocks, f"{doc} has no example block after {MARKER!r}"
    for block in blocks:
        assert block == EXAMPLE.read_text()
