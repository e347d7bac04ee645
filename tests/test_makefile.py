"""The Makefile's setup: `make demo TORCH=... TRITON=...` (the README's override for a CUDA
build) installs those pins into a .venv made before with others, not the old ones silently."""
import os
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_plan(venv, *overrides: str) -> str:
    """What `make setup` would run (make -n), for a venv at `venv`."""
    result = subprocess.run(["make", "-n", "-C", ROOT, "setup", f"VENV={venv}", *overrides],
                            capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_other_pins_install_again_and_the_same_pins_do_not(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed"
    stamp.write_text("torch==2.13.0 triton==3.7.1\n")
    future = time.time() + 3600  # newer than the Makefile and pyproject.toml, whatever their mtimes
    os.utime(stamp, (future, future))
    assert "pip install" not in setup_plan(venv)
    plan = setup_plan(venv, "TORCH=torch==2.11.0", "TRITON=triton==3.6.0")
    assert '"torch==2.11.0" "triton==3.6.0"' in plan
    # A stamp of the Makefile before it recorded pins (empty) is not a reason to reinstall.
    stamp.write_text("")
    os.utime(stamp, (future, future))
    assert "pip install" not in setup_plan(venv)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_triton_is_installed_on_linux_only(tmp_path):
    """Triton has no macOS or Windows build: pip would fail the whole setup on one."""
    venv = tmp_path / "venv"
    assert '"torch==2.13.0" "triton==3.7.1"' in setup_plan(venv, "UNAME=Linux")
    plan = setup_plan(venv, "UNAME=Darwin")
    assert '"torch==2.13.0"' in plan and "triton==" not in plan
    assert "triton==" not in setup_plan(venv, "UNAME=Linux", "TRITON=")
