"""The README's offline walkthrough, run as written (paths and port substituted)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def walkthrough() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### Offline walkthrough with the local Hub", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_walkthrough_runs_as_written(demo_folder, tmp_path):
    port = str(free_port())
    script = walkthrough()
    assert "8765" in script and "erasures/demo" in script
    script = script.replace(". .venv/bin/activate\n", "")  # the test runs in the current environment
    script = script.replace("8765", port).replace("/tmp/erasepro-hub", str(tmp_path / "hub"))
    script = script.replace("/tmp/van-gogh-pulled", str(tmp_path / "pulled")).replace("erasures/demo", str(demo_folder))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HOME"] = str(tmp_path / "hf-home")
    result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified: max |ΔW_stored − ΔW_regenerated| = " in result.stdout
    assert "HTTP Request" not in result.stderr  # the Hub client's request log is for -v
    assert re.search(r"demo/van-gogh-erased@[0-9a-f]{40}", result.stdout)
    assert (tmp_path / "pulled" / "pytorch_lora_weights.safetensors").read_bytes() == (
        demo_folder / "pytorch_lora_weights.safetensors"
    ).read_bytes()
    assert not [s for s in (result.stdout + result.stderr).split() if "hf_demo_write_token" in s]


def test_manifest_example_is_valid_and_spells_out_the_defaults():
    from erasepro_hub.manifest import parse_manifest
    from erasepro_hub.manifest.schema import Preserve, Prompts, SolverSettings, TextEncoderSettings

    text = (REPO / "README.md").read_text().split("### The manifest", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    recipe = parse_manifest(block).recipe()
    # the example shows the defaults: a change of default must change the README too
    assert recipe.solver == SolverSettings()
    assert recipe.text_encoder == TextEncoderSettings()
    assert recipe.prompts.misspellings == Prompts.model_fields["misspellings"].default
    assert recipe.preserve.weight == Preserve.model_fields["weight"].default
    assert recipe.preserve.caption_weight == Preserve.model_fields["caption_weight"].default
