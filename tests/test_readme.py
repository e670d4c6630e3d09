"""README.md and .ci/run agree on the test command, and the package needs no optional parts."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    assert install.startswith("pip install -r requirements.txt")
    ci_lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert test in ci_lines


def test_package_imports_without_optional_backends():
    code = (
        "import sys, w2v_stream.shards, w2v_stream.convert, w2v_stream.librispeech,"
        " w2v_stream.report\n"
        "for name in ('poptorch', 'torch', 'matplotlib'): assert name not in sys.modules, name"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
