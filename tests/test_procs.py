"""dudocrop.procs against real processes: a grandchild is in the tree, a killed one is not alive."""

import os
import subprocess
import sys
import time

from dudocrop.procs import alive, cmdline, tree


def test_tree_alive_and_cmdline_follow_real_processes():
    # a child that starts a grandchild and prints its pid
    code = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'MARK'])\n"
            "print(g.pid, flush=True)\ntime.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert {child.pid, grandchild} <= tree(os.getpid())
        assert tree(child.pid) == {child.pid, grandchild}
        assert "MARK" in cmdline(grandchild) and "MARK" not in cmdline(os.getpid())
        assert alive(grandchild)
        os.kill(grandchild, 9)
        t0 = time.time()
        while alive(grandchild) and time.time() - t0 < 10:  # a zombie until its parent reaps it: not alive
            time.sleep(0.05)
        assert not alive(grandchild)
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid)
