"""What the embedded Ray's driver prints: everything but the raylet's worker-pool warning."""

from __future__ import annotations

import io
import threading

from shipyard.runtime.local import POOL_WARNING, LineFilter, without_lines

RAYLET_LINE = (
    "\x1b[33m(raylet)\x1b[0m WARNING: 10 PYTHON worker processes have been started on node: "
    "ab12 with address: 127.0.0.1, which is 5x the maximum expected startup concurrency (2)."
)


def test_the_worker_pool_warning_is_dropped_with_its_newline_and_nothing_else():
    out = io.StringIO()
    stream = LineFilter(out, POOL_WARNING)
    print("step 10/40  loss 3.1", file=stream)
    print(RAYLET_LINE, file=stream)
    print("", file=stream)  # an empty line the program means to print stays
    print("step 20/40  loss 2.7", file=stream)
    assert out.getvalue() == "step 10/40  loss 3.1\n\nstep 20/40  loss 2.7\n"


def test_another_threads_newline_is_not_taken_for_the_dropped_lines():
    out = io.StringIO()
    stream = LineFilter(out, POOL_WARNING)
    stream.write(RAYLET_LINE)  # Ray's listener thread, before its newline
    writer = threading.Thread(target=lambda: stream.write("\n"))
    writer.start()
    writer.join()
    stream.write("\n")
    assert out.getvalue() == "\n"


def test_stdout_is_filtered_only_inside_the_block(capsys):
    with without_lines(POOL_WARNING):
        print(RAYLET_LINE)
        print("kept")
    print(RAYLET_LINE)
    assert capsys.readouterr().out == f"kept\n{RAYLET_LINE}\n"
