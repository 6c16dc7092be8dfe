import subprocess
import sys
import textwrap


def test_a_role_that_has_finished_ignores_a_late_stop_request():
    # A camera process that finished its frames was SIGTERMed while the interpreter shut down, where
    # CPython restores the default action of signals with a Python handler: it died with -15. After
    # serve() the stop signals are ignored (CPython leaves SIG_IGN in place), so it exits 0.
    script = textwrap.dedent("""
        import os, signal
        from pipeline.transport.service import serve

        class Finite:
            def connect(self): pass
            def run(self, stop): return "done"
            def close(self): pass

        assert serve(Finite()) == "done"
        print(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["True", "True"]
