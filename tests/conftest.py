"""Test-session settings: no hub downloads, no Ray token auth, one Ray cluster per session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# an empty torch hub: no test may pick up a backbone file the developer's machine happens to hold (LPIPS on or off
# would change what the evaluation computes); the LPIPS tests write their own files under their own TORCH_HOME
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="dudocrop-tests-torch-")
atexit.register(shutil.rmtree, os.environ["TORCH_HOME"], True)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster shared by every test that needs it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except Exception:  # noqa: BLE001 - progress bars are cosmetic
        pass
    yield ray
    ray.shutdown()
